"""refattn's side of a comparison beyond the conformance suite: the classification of what a
framework returns on fully masked rows, and the references, baselines and floors of the layer
rows (the SDPA rows are :func:`refattn.testing.conformance.evaluate`'s)."""

from __future__ import annotations

from typing import Any

import numpy as np  # the comparison harness works on host copies; refattn ops run on NumPy

from .. import _tree
from ..testing import (
    float64_baseline_error,
    machine_epsilon,
    round_to_dtype,
    run_in_dtype,
)

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


def uniform_rows(v: np.ndarray, dead: np.ndarray) -> np.ndarray:
    """The all-keys average of ``v (B, Hkv, n_k, d_v)`` for every row of ``dead (B, Hq, n_q)``
    (True: the row sees no key), ``(m, d_v)``."""
    g = dead.shape[1] // v.shape[1]
    per_head = np.repeat(v.mean(axis=2), g, axis=1)  # (B, Hq, d_v)
    b_idx, h_idx, _ = np.nonzero(dead)
    return per_head[b_idx, h_idx]


# ----------------------------------------------------------------------------- references


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
