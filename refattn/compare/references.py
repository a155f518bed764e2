"""refattn's side of a comparison: the float64 reference for the same rounded inputs, the plain
baselines' errors, the FlashAttention rule applied to a row, and the classification of what a
framework returns on fully masked rows."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np  # the comparison harness works on host copies; refattn ops run on NumPy

from .. import _tree
from ..testing import (
    AttentionTolerance,
    attention_tolerance,
    float64_baseline_error,
    machine_epsilon,
    round_to_dtype,
    run_in_dtype,
)
from ..testing.conformance import plain_errors, reference_results, to_float64_errors
from .cases import FACTOR, FLOOR_ULPS, WARN_FACTOR, AttentionCase, Inputs, make_inputs
from .report import Row

# ----------------------------------------------------------------------------- classification


def classify_masked_rows(rows: np.ndarray, uniform: np.ndarray, dtype: str) -> str:
    """What an implementation returned for fully masked query rows.

    ``rows`` (m, d_v): its output on those rows; ``uniform`` (m, d_v): the plain average of the
    values over all keys (what a softmax over equal scores gives). Returns "zero" (refattn),
    "nan", "uniform_average" or "other".
    """
    rows = np.asarray(rows, dtype=np.float64)
    if rows.size == 0:
        return "zero"
    if np.isnan(rows).all():
        return "nan"
    if (rows == 0).all():
        return "zero"
    tol = max(16 * machine_epsilon(dtype), 1e-4) * max(1.0, float(np.abs(uniform).max()))
    if np.isfinite(rows).all() and np.abs(rows - uniform).max() <= tol:
        return "uniform_average"
    return "other"


def classify_lse(values: np.ndarray) -> str:
    values = np.asarray(values, dtype=np.float64)
    if np.isneginf(values).all():
        return "-inf"
    if np.isnan(values).all():
        return "nan"
    if np.isfinite(values).all() and (values <= -1e30).all():
        return "large finite negative"
    return "other"


def behaviour_status(observed: str, refattn: str, recognized: tuple[str, ...]) -> str:
    if observed == "n/a":
        return "n/a"
    if observed == refattn:
        return "same"
    return "differs (known)" if observed in recognized else "UNEXPECTED"


ROW_BEHAVIOURS = ("zero", "nan", "uniform_average")
MASKED_ROWS_DETAIL = {
    "zero": "output 0, as refattn",
    "nan": "NaN output; refattn gives 0",
    "uniform_average": "the plain average of all values (a softmax over equal scores); "
    "refattn gives 0",
}


def uniform_rows(inputs: Inputs, v: np.ndarray) -> np.ndarray:
    """The all-keys average of ``v`` for every dead row, (m, d_v)."""
    g = inputs.q.shape[1] // v.shape[1]
    mean = v.mean(axis=2)  # (B, Hkv, d_v)
    per_head = np.repeat(mean, g, axis=1)  # (B, Hq, d_v)
    b_idx, h_idx, _ = np.nonzero(inputs.dead_rows)
    return per_head[b_idx, h_idx]


# ----------------------------------------------------------------------------- references


@dataclass
class Reference:
    """refattn's float64 answer for rounded inputs, and the plain implementation's errors.

    ``base_errors`` maps "out", "dq", "dk", "dv", "lse" to the plain implementation's max error
    in the case's dtype: the largest over the three textbook softmax-VJP forms
    (:func:`refattn.testing.lowp_attention_vjp_baseline`'s ``softmax_vjp``), and for float64 the
    float32 errors scaled by eps64/eps32 (:func:`refattn.testing.float64_baseline_error`).
    Fully masked rows are exact in both, so errors over all rows are errors over live rows.
    """

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    cotangent: np.ndarray
    bias: np.ndarray | None
    out: np.ndarray
    grads: tuple[np.ndarray, ...]
    lse: np.ndarray
    base_errors: dict[str, float]


class References:
    """Lazily computed :class:`Reference` per (case, dtype, whether dead rows get a cotangent)."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, str, bool], Reference] = {}
        self._inputs: dict[str, Inputs] = {}

    def inputs(self, case: AttentionCase) -> Inputs:
        if case.name not in self._inputs:
            self._inputs[case.name] = make_inputs(case)
        return self._inputs[case.name]

    def get(self, case: AttentionCase, dtype: str, zero_dead_rows: bool = False) -> Reference:
        key = (case.name, dtype, zero_dead_rows)
        if key not in self._cache:
            self._cache[key] = self._compute(self.inputs(case), dtype, zero_dead_rows)
        return self._cache[key]

    @staticmethod
    def _compute(inputs: Inputs, dtype: str, zero_dead_rows: bool) -> Reference:
        q, k, v, ct = (rounded(x, dtype) for x in (inputs.q, inputs.k, inputs.v, inputs.cotangent))
        if zero_dead_rows:
            ct = ct * ~inputs.dead_rows[..., None]
        options = dict(inputs.options)
        bias = None
        if inputs.bias is not None:
            bias = rounded(inputs.bias, dtype)
            options["bias"] = bias
        found = reference_results(q, k, v, ct, options)
        if dtype == "float64":
            q32, k32, v32, ct32 = (rounded(x, "float32") for x in (q, k, v, ct))
            o32 = {key: rounded(val, "float32") for key, val in options.items()}
            ref32 = reference_results(q32, k32, v32, ct32, o32)
            errors = to_float64_errors(plain_errors(q32, k32, v32, ct32, o32, "float32", ref32))
        else:
            errors = plain_errors(q, k, v, ct, options, dtype, found)
        grads = (found["dq"], found["dk"], found["dv"])
        return Reference(q, k, v, ct, bias, found["out"], grads, found["lse"], errors)


def evaluate(
    row: Row,
    candidates: dict[str, Any],
    references: dict[str, Any],
    baselines: dict[str, Any],
    scales: dict[str, float] | None = None,
) -> Row:
    """Fill ``row`` from the FlashAttention rule on every quantity (``out`` and the rest).

    ``scales`` gives the floor's magnitude for some quantities (see :func:`parameter_scales`).
    """
    worst_ratio = -1.0
    scales = scales or {}
    for name, cand in candidates.items():
        tol = layer_tolerance(cand, references[name], baselines[name], scales.get(name))
        if name == "out":
            row.out_error, row.out_allowed = tol.error, tol.allowed
        elif tol.ratio > worst_ratio:
            worst_ratio = tol.ratio
            row.grad_error, row.grad_allowed, row.grad_name = tol.error, tol.allowed, name
        if not tol.passed:
            warn = tol.error <= WARN_FACTOR * tol.allowed
            if row.status != "FAIL":
                row.status = "warn" if warn else "FAIL"
            row.note = join_notes(
                row.note,
                f"{name} error {tol.error:.3g} = {tol.ratio:.2g}x allowed"
                + (f" (within {WARN_FACTOR:g}x: accuracy, not semantics)" if warn else ""),
            )
    return row


def parameter_scales(references: dict[str, Any]) -> dict[str, float]:
    """Floor magnitudes for parameter gradients: the largest gradient of the same map.

    A bias gradient is the column sum of the upstream gradient whose products with the inputs
    form the weight gradient, so its rounding noise is on the scale of that map's gradients,
    even when it is analytically 0 (attention's key bias, by the softmax's shift invariance).
    """
    groups: dict[str, float] = {}
    for name, ref in references.items():
        if name.startswith("dparams."):
            parent = name.rsplit(".", 1)[0]
            finite = np.abs(ref[np.isfinite(ref)])
            groups[parent] = max(groups.get(parent, 0.0), float(finite.max(initial=0.0)))
    return {
        name: groups[name.rsplit(".", 1)[0]] for name in references if name.startswith("dparams.")
    }


def join_notes(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


def tree_quantities(prefix: str, tree: Any) -> dict[str, Any]:
    return {
        f"{prefix}.{path}" if path else prefix: leaf
        for path, leaf in _tree.leaves_with_paths(tree)
        if leaf is not None
    }


def rounded(tree: Any, dtype: str) -> Any:
    """Floating leaves rounded to ``dtype`` and stored as float64 (exactly)."""

    def one(x: Any) -> Any:
        if isinstance(x, np.ndarray) and np.issubdtype(x.dtype, np.floating):
            return np.asarray(round_to_dtype(x, dtype)).astype(np.float64)
        return x

    return _tree.map_leaves(one, tree)


def layer_baseline(
    op: Any, params: Any, xs: list[np.ndarray], ct: np.ndarray, options: dict[str, Any], dtype: str
) -> tuple[Any, Any]:
    """The plain implementation's output and gradients, or for float64 their errors.

    float32: refattn's own float32 run. float64 has no independent plain implementation, so
    the error model of a backward-stable computation is used: its error is proportional to the
    unit roundoff, so a plain float64 implementation's error is estimated as the float32 run's
    error (against float64 on the same float32 inputs) times eps64 / eps32 = 2**-29. These
    errors come back as floats in place of arrays.
    """
    if dtype != "float64":
        return run_in_dtype(op, params, *xs, dtype=dtype, cotangent=ct, **options)
    p32, xs32, ct32 = rounded(params, "float32"), rounded(xs, "float32"), rounded(ct, "float32")
    o32 = {k: rounded(v, "float32") for k, v in options.items()}
    ref = run_in_dtype(op, p32, *xs32, dtype="float64", cotangent=ct32, **o32)
    run32 = run_in_dtype(op, p32, *xs32, dtype="float32", cotangent=ct32, **o32)
    error = float64_baseline_error
    out_err = error(run32[0], ref[0])
    grad_errs = tuple(
        _tree.replace_leaves(
            r, [error(b, rr) for b, rr in zip(_tree.leaves(bb), _tree.leaves(r), strict=True)]
        )
        for bb, r in zip(run32[1], ref[1], strict=True)
    )
    return out_err, grad_errs


def layer_tolerance(cand: Any, ref: Any, base: Any, scale: float | None) -> AttentionTolerance:
    return attention_tolerance(
        cand, ref, base, factor=FACTOR, floor_ulps=FLOOR_ULPS, floor_scale=scale
    )


def as_dtype(dtype: str) -> Callable[[np.ndarray], np.ndarray]:
    return lambda x: x.astype(dtype)
