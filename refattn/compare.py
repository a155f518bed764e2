r"""``refattn compare torch|jax``: check a framework's own attention against refattn.

The framework's *own* functions run over a grid of cases (shapes, n_q ≠ n_k, d_v ≠ d_k, masks,
additive bias, causal alignment, GQA, fully masked rows, large logits, custom scale) in float64,
float32, float16 and bfloat16:

* torch: ``F.scaled_dot_product_attention`` on the default dispatch and on every SDPA backend
  the device has, chosen with ``torch.nn.attention.sdpa_kernel`` (CPU: math and the CPU flash
  kernel; ``--device cuda``: math, flash, memory-efficient and cuDNN);
  ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` against
  ``refattn.multi_head_attention`` / ``refattn.transformer_encoder_layer`` (float64 and float32:
  refattn's layers run in those).
* JAX: ``jax.nn.dot_product_attention`` (outputs, gradients and the logsumexp it returns with
  ``return_residual=True``), and ``flax.linen.dot_product_attention`` when flax is installed.

Every output and gradient is checked against refattn's float64 result **for the same rounded
inputs** with the FlashAttention rule of :mod:`refattn.testing`: error ≤ 2 × the error of a
plain implementation in that dtype + 2 eps(dtype) max|reference|. The plain implementation is
:func:`refattn.testing.lowp_attention_vjp_baseline` for SDPA (the worst of its three textbook
softmax-VJP forms) and refattn's own float32 run for layers; float64 rows allow 3 × a plain
float64 error estimated from float32 (:func:`refattn.testing.float64_baseline_error`); the
floor of a parameter gradient is relative to the largest gradient of its affine map. A row is
``pass``, ``warn`` (above the allowed error but within 4 × of it: an accuracy gap, not a
semantic mismatch; it fails only with ``--strict``), ``FAIL`` or ``n/a``.

Semantic differences (what a framework does on fully masked rows, how ``is_causal`` aligns when
n_q ≠ n_k, what a boolean mask means) are **probed**: each is computed and the framework's
behaviour classified from its actual output. Known behaviours that differ from refattn are
reported, not failed; an unrecognized behaviour, or an error above the allowed one, is a failure
and the exit status is 1. Cases a backend does not support are reported as ``n/a``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import math
import sys
import time
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np  # the comparison harness works on host copies; refattn ops run on NumPy

from . import _tree
from ._version import __version__
from .ops import scaled_dot_product_attention
from .ops.masks import causal_mask
from .testing import (
    SOFTMAX_VJP_FORMS,
    AttentionTolerance,
    attention_tolerance,
    float64_baseline_error,
    lowp_attention_baseline,
    lowp_attention_vjp_baseline,
    machine_epsilon,
    max_abs_error,
    round_to_dtype,
    run_in_dtype,
)

__all__ = [
    "ATTENTION_CASES",
    "DTYPES",
    "LAYER_CASES",
    "AttentionCase",
    "CompareReport",
    "Probe",
    "Row",
    "add_arguments",
    "classify_masked_rows",
    "compare",
    "make_inputs",
    "print_report",
    "run",
]

FRAMEWORKS = ("torch", "jax")
DTYPES = ("float64", "float32", "float16", "bfloat16")
LAYER_DTYPES = ("float64", "float32")
FACTOR = 2.0
FLOOR_ULPS = 2.0
#: errors above the allowed one but within this multiple of it are "warn" (an accuracy gap, not
#: a semantic mismatch: those are orders of magnitude larger); --strict fails them too
WARN_FACTOR = 4.0


# ----------------------------------------------------------------------------- the grid


@dataclass(frozen=True)
class AttentionCase:
    """One attention problem of the grid (refattn layout ``(B, H, n, d)``)."""

    name: str
    batch: int = 2
    h_q: int = 2
    h_kv: int = 2
    n_q: int = 16
    n_k: int = 16
    d: int = 16
    d_v: int = 16
    #: None, "random" (about 25% masked, every row keeps a key) or "fully_masked_rows"
    mask: str | None = None
    bias: bool = False
    #: None, "upper_left" (the framework's is_causal), "lower_right_mask" (an explicit boolean
    #: mask), "lower_right_bias" (torch's causal_lower_right attention bias)
    causal: str | None = None
    scale: float | None = None
    logit_scale: float = 1.0
    quick: bool = False

    @property
    def seed(self) -> int:
        return zlib.crc32(self.name.encode())


ATTENTION_CASES = (
    AttentionCase("basic", quick=True),
    AttentionCase("cross_nq12_nk20_dv8", n_q=12, n_k=20, d_v=8),
    AttentionCase("bool_mask", mask="random"),
    AttentionCase("bias", bias=True),
    AttentionCase("causal_upper_left_nq12_nk20", n_q=12, n_k=20, causal="upper_left", quick=True),
    AttentionCase(
        "causal_lower_right_mask_nq12_nk20", n_q=12, n_k=20, causal="lower_right_mask", quick=True
    ),
    AttentionCase("causal_lower_right_bias_nq12_nk20", n_q=12, n_k=20, causal="lower_right_bias"),
    AttentionCase("gqa_4q_2kv_causal", h_q=4, h_kv=2, causal="upper_left", quick=True),
    AttentionCase("fully_masked_rows", mask="fully_masked_rows", quick=True),
    AttentionCase("scale_0.3", scale=0.3),
    AttentionCase("large_logits_x8", logit_scale=8.0),
)


@dataclass
class Inputs:
    """Float64 host inputs of a case, and refattn's options for it."""

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    cotangent: np.ndarray
    mask: np.ndarray | None  # (B, 1, n_q, n_k), True = attend, without the causal part
    bias: np.ndarray | None  # (1, 1, n_q, n_k)
    options: dict[str, Any]  # refattn options except bias
    dead_rows: np.ndarray  # (B, H, n_q) rows with no key left (mask AND causal)


def make_inputs(case: AttentionCase) -> Inputs:
    """Seeded float64 inputs for ``case``."""
    rng = np.random.default_rng(case.seed)
    b, hq, hkv = case.batch, case.h_q, case.h_kv
    q = rng.standard_normal((b, hq, case.n_q, case.d)) * case.logit_scale
    k = rng.standard_normal((b, hkv, case.n_k, case.d))
    v = rng.standard_normal((b, hkv, case.n_k, case.d_v))
    cotangent = rng.standard_normal((b, hq, case.n_q, case.d_v))
    mask = None
    if case.mask is not None:
        mask = rng.random((b, 1, case.n_q, case.n_k)) > 0.25
        mask[..., np.arange(case.n_q), np.arange(case.n_q) % case.n_k] = True
        if case.mask == "fully_masked_rows":
            mask[..., 1, :] = False
            mask[..., case.n_q - 2, :] = False
    bias = rng.standard_normal((1, 1, case.n_q, case.n_k)) if case.bias else None
    options: dict[str, Any] = {}
    if mask is not None:
        options["mask"] = mask
    keep = np.ones((b, hq, case.n_q, case.n_k), dtype=bool) if mask is None else mask
    if case.causal is not None:
        alignment = "upper_left" if case.causal == "upper_left" else "lower_right"
        options["is_causal"] = True
        options["causal_alignment"] = alignment
        keep = keep & causal_mask(case.n_q, case.n_k, alignment)
    if case.scale is not None:
        options["scale"] = case.scale
    dead = ~np.broadcast_to(keep, (b, hq, case.n_q, case.n_k)).any(axis=-1)
    return Inputs(q, k, v, cotangent, mask, bias, options, dead)


# ----------------------------------------------------------------------------- results


@dataclass
class Row:
    """One line of the table: one implementation on one case in one dtype."""

    case: str
    impl: str
    dtype: str
    out_error: float = math.nan
    out_allowed: float = math.nan
    grad_error: float = math.nan
    grad_allowed: float = math.nan
    grad_name: str = ""
    status: str = "pass"  # pass | warn | FAIL | n/a
    note: str = ""


@dataclass
class Probe:
    """A probed semantic: what refattn does, what the framework was observed to do."""

    function: str
    behaviour: str
    refattn: str
    observed: str
    status: str  # same | differs (known) | UNEXPECTED | n/a
    detail: str = ""


@dataclass
class CompareReport:
    framework: str
    device: str
    rows: list[Row] = field(default_factory=list)
    probes: list[Probe] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    strict: bool = False  #: warn rows count as failures

    @property
    def failures(self) -> list[Row]:
        bad = ("FAIL", "warn") if self.strict else ("FAIL",)
        return [r for r in self.rows if r.status in bad]

    @property
    def unexpected(self) -> list[Probe]:
        return [p for p in self.probes if p.status == "UNEXPECTED"]

    @property
    def ok(self) -> bool:
        return not self.failures and not self.unexpected

    def probe(self, function: str, behaviour: str) -> Probe:
        """The probe of ``behaviour`` for ``function`` (KeyError if it was not run)."""
        for p in self.probes:
            if p.function == function and p.behaviour == behaviour:
                return p
        raise KeyError(f"no probe {function!r} / {behaviour!r}")


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


def _classify_lse(values: np.ndarray) -> str:
    values = np.asarray(values, dtype=np.float64)
    if np.isneginf(values).all():
        return "-inf"
    if np.isnan(values).all():
        return "nan"
    if np.isfinite(values).all() and (values <= -1e30).all():
        return "large finite negative"
    return "other"


def _status(observed: str, refattn: str, recognized: tuple[str, ...]) -> str:
    if observed == "n/a":
        return "n/a"
    if observed == refattn:
        return "same"
    return "differs (known)" if observed in recognized else "UNEXPECTED"


_ROW_BEHAVIOURS = ("zero", "nan", "uniform_average")
_MASKED_ROWS_DETAIL = {
    "zero": "output 0, as refattn",
    "nan": "NaN output; refattn gives 0",
    "uniform_average": "the plain average of all values (a softmax over equal scores); "
    "refattn gives 0",
}


def _uniform_rows(inputs: Inputs, v: np.ndarray) -> np.ndarray:
    """The all-keys average of ``v`` for every dead row, (m, d_v)."""
    g = inputs.q.shape[1] // v.shape[1]
    mean = v.mean(axis=2)  # (B, Hkv, d_v)
    per_head = np.repeat(mean, g, axis=1)  # (B, Hq, d_v)
    b_idx, h_idx, _ = np.nonzero(inputs.dead_rows)
    return per_head[b_idx, h_idx]


# ----------------------------------------------------------------------------- references


@dataclass
class _Reference:
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


class _References:
    """Lazily computed :class:`_Reference` per (case, dtype, whether dead rows get a cotangent)."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, str, bool], _Reference] = {}
        self._inputs: dict[str, Inputs] = {}

    def inputs(self, case: AttentionCase) -> Inputs:
        if case.name not in self._inputs:
            self._inputs[case.name] = make_inputs(case)
        return self._inputs[case.name]

    def get(self, case: AttentionCase, dtype: str, zero_dead_rows: bool = False) -> _Reference:
        key = (case.name, dtype, zero_dead_rows)
        if key not in self._cache:
            self._cache[key] = self._compute(self.inputs(case), dtype, zero_dead_rows)
        return self._cache[key]

    @staticmethod
    def _compute(inputs: Inputs, dtype: str, zero_dead_rows: bool) -> _Reference:
        q, k, v, ct = (_rounded(x, dtype) for x in (inputs.q, inputs.k, inputs.v, inputs.cotangent))
        if zero_dead_rows:
            ct = ct * ~inputs.dead_rows[..., None]
        options = dict(inputs.options)
        bias = None
        if inputs.bias is not None:
            bias = _rounded(inputs.bias, dtype)
            options["bias"] = bias
        ref = _reference_results(q, k, v, ct, options)
        if dtype == "float64":
            q32, k32, v32, ct32 = (_rounded(x, "float32") for x in (q, k, v, ct))
            o32 = {key: _rounded(val, "float32") for key, val in options.items()}
            ref32 = _reference_results(q32, k32, v32, ct32, o32)
            errors = _plain_errors(q32, k32, v32, ct32, o32, "float32", ref32)
            scale = machine_epsilon("float64") / machine_epsilon("float32")
            errors = {name: err * scale for name, err in errors.items()}
        else:
            errors = _plain_errors(q, k, v, ct, options, dtype, ref)
        return _Reference(q, k, v, ct, bias, *ref, errors)


def _reference_results(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, ct: np.ndarray, options: dict[str, Any]
) -> tuple[np.ndarray, tuple[np.ndarray, ...], np.ndarray]:
    """refattn float64: ``(out, (dq, dk, dv), lse)``."""
    sdpa = scaled_dot_product_attention
    out, grads = run_in_dtype(sdpa, q, k, v, dtype="float64", cotangent=ct, **options)
    _, lse = sdpa(q, k, v, return_lse=True, **options)
    return out, tuple(grads), lse


def _plain_errors(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    ct: np.ndarray,
    options: dict[str, Any],
    dtype: str,
    ref: tuple[np.ndarray, tuple[np.ndarray, ...], np.ndarray],
) -> dict[str, float]:
    """The plain implementation's max errors in ``dtype`` (worst of the softmax-VJP forms)."""
    ref_out, ref_grads, ref_lse = ref
    _, lse = lowp_attention_baseline(q, k, v, dtype=dtype, return_lse=True, **options)
    errors = {"lse": max_abs_error(lse, ref_lse)}
    for form in SOFTMAX_VJP_FORMS:
        out, grads = lowp_attention_vjp_baseline(
            q, k, v, ct, dtype=dtype, softmax_vjp=form, **options
        )
        pairs = zip(("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *ref_grads), strict=True)
        for name, b, r in pairs:
            errors[name] = max(errors.get(name, 0.0), max_abs_error(b, r))
    return errors


def _evaluate(
    row: Row,
    candidates: dict[str, Any],
    references: dict[str, Any],
    baselines: dict[str, Any],
    scales: dict[str, float] | None = None,
) -> Row:
    """Fill ``row`` from the FlashAttention rule on every quantity (``out`` and the rest).

    ``scales`` gives the floor's magnitude for some quantities (see :func:`_parameter_scales`).
    """
    worst_ratio = -1.0
    scales = scales or {}
    for name, cand in candidates.items():
        tol = _tolerance(cand, references[name], baselines[name], scales.get(name))
        if name == "out":
            row.out_error, row.out_allowed = tol.error, tol.allowed
        elif tol.ratio > worst_ratio:
            worst_ratio = tol.ratio
            row.grad_error, row.grad_allowed, row.grad_name = tol.error, tol.allowed, name
        if not tol.passed:
            warn = tol.error <= WARN_FACTOR * tol.allowed
            if row.status != "FAIL":
                row.status = "warn" if warn else "FAIL"
            row.note = _join(
                row.note,
                f"{name} error {tol.error:.3g} = {tol.ratio:.2g}x allowed"
                + (f" (within {WARN_FACTOR:g}x: accuracy, not semantics)" if warn else ""),
            )
    return row


def _parameter_scales(references: dict[str, Any]) -> dict[str, float]:
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


def _join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


def _tree_quantities(prefix: str, tree: Any) -> dict[str, Any]:
    return {
        f"{prefix}.{path}" if path else prefix: leaf
        for path, leaf in _tree.leaves_with_paths(tree)
        if leaf is not None
    }


# ----------------------------------------------------------------------------- torch


def _torch_dtype(torch: Any, dtype: str) -> Any:
    return getattr(torch, dtype)


def _torch_to_numpy(t: Any) -> np.ndarray:
    """A host NumPy array in the tensor's own dtype (bfloat16 through ml_dtypes)."""
    from .interop.dlpack import from_dlpack

    return np.asarray(from_dlpack(t.detach().cpu().contiguous(), copy=True))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the frameworks' warnings (kernel-selection notes, causal_lower_right's NaN note)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


class _TorchSDPA:
    """``F.scaled_dot_product_attention`` on one backend."""

    def __init__(self, torch: Any, backend: str, device: str) -> None:
        self.torch = torch
        self.backend = backend
        self.device = device
        self.name = f"torch F.sdpa[{backend}]"

    def unsupported(self, case: AttentionCase) -> str:
        """Why ``case`` cannot be expressed with this function ("" when it can)."""
        return ""

    def context(self) -> Any:
        if self.backend == "default":
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        enum = {
            "math": SDPBackend.MATH,
            "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION,
        }[self.backend]
        return sdpa_kernel([enum])

    def run(
        self,
        case: AttentionCase,
        inputs: Inputs,
        ref: _Reference,
        dtype: str,
        *,
        mask: np.ndarray | None = None,
        want_grads: bool = True,
    ) -> tuple[np.ndarray, Any, None]:
        """``(out, (dq, dk, dv) or None, None)`` on the reference's rounded inputs.

        ``mask`` overrides the case's boolean mask (the probes use it). torch's SDPA returns no
        logsumexp, hence the None.
        """
        torch = self.torch
        import torch.nn.functional as F

        tdtype = _torch_dtype(torch, dtype)

        def leaf(x: np.ndarray) -> Any:
            t = torch.from_numpy(np.ascontiguousarray(x)).to(device=self.device, dtype=tdtype)
            return t.requires_grad_(want_grads)

        q, k, v = leaf(ref.q), leaf(ref.k), leaf(ref.v)
        kwargs: dict[str, Any] = {}
        attn_mask: Any = None
        keep = inputs.mask if mask is None else mask
        if case.causal == "lower_right_mask":
            causal = causal_mask(case.n_q, case.n_k, "lower_right")
            keep = causal if keep is None else keep & causal
        if keep is not None:
            attn_mask = torch.from_numpy(np.ascontiguousarray(keep)).to(self.device)
        if ref.bias is not None:
            attn_mask = torch.from_numpy(ref.bias).to(device=self.device, dtype=tdtype)
        if case.causal == "lower_right_bias":
            from torch.nn.attention.bias import causal_lower_right

            with _quiet():
                attn_mask = causal_lower_right(case.n_q, case.n_k)
        if case.causal == "upper_left":
            kwargs["is_causal"] = True
        if case.h_q != case.h_kv:
            kwargs["enable_gqa"] = True
        if case.scale is not None:
            kwargs["scale"] = case.scale
        with _quiet(), self.context():
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, **kwargs)
            if not want_grads:
                return _torch_to_numpy(out), None, None
            ct = torch.from_numpy(ref.cotangent).to(device=self.device, dtype=tdtype)
            out.backward(ct)
        return _torch_to_numpy(out), tuple(_torch_to_numpy(t.grad) for t in (q, k, v)), None


_UNSUPPORTED = (
    "No available kernel",
    "No viable backend",
    "not implemented",
    "Not implemented",
    "not supported",
    "Unsupported",
    "unsupported",
    "does not support",
    "only supports",
)


def _unsupported(exc: BaseException) -> bool:
    """Whether ``exc`` is a framework saying it cannot run this case (not a bug)."""
    kinds = (RuntimeError, NotImplementedError, ValueError, TypeError)
    return isinstance(exc, kinds) and any(s in str(exc) for s in _UNSUPPORTED)


def _reference_quantities(
    ref: _Reference, live: np.ndarray, with_lse: bool
) -> tuple[dict[str, Any], dict[str, float]]:
    """The reference (``out`` and ``lse`` on live rows only) and baseline error per quantity."""
    references = {"out": ref.out[live], "dq": ref.grads[0], "dk": ref.grads[1], "dv": ref.grads[2]}
    if with_lse:
        references["lse"] = ref.lse[live]
    return references, {name: ref.base_errors[name] for name in references}


def _attention_rows(
    report: CompareReport,
    impls: list[Any],
    cases: list[AttentionCase],
    dtypes: tuple[str, ...],
    refs: _References,
    precision: dict[str, str],
) -> None:
    """Run every implementation on every case and dtype, appending table rows.

    ``precision`` maps an implementation to the precision its float64 path was probed to
    compute in; float64 rows of an implementation that computes in float32 are judged by the
    float32 rule (its documented behaviour, reported as a known difference).
    """
    for impl in impls:
        for case in cases:
            reason = impl.unsupported(case)
            if reason:
                report.rows.append(Row(case.name, impl.name, "-", status="n/a", note=reason))
                continue
            inputs = refs.inputs(case)
            for dtype in dtypes:
                report.rows.append(_attention_row(impl, case, inputs, dtype, refs, precision))


def _attention_row(
    impl: Any,
    case: AttentionCase,
    inputs: Inputs,
    dtype: str,
    refs: _References,
    precision: dict[str, str],
) -> Row:
    row = Row(case.name, impl.name, dtype)
    try:
        ref = refs.get(case, dtype)
        behaviour = "zero"
        if inputs.dead_rows.any():
            out, _, _ = impl.run(case, inputs, ref, dtype)
            rows = out[inputs.dead_rows]
            behaviour = classify_masked_rows(rows, _uniform_rows(inputs, ref.v), dtype)
            if behaviour != "zero":
                ref = refs.get(case, dtype, zero_dead_rows=True)
        out, grads, lse = impl.run(case, inputs, ref, dtype)
    except Exception as exc:
        if not _unsupported(exc):
            raise
        row.status, row.note = "n/a", _first_line(exc)
        return row
    live = ~inputs.dead_rows
    candidates = {"out": out[live], "dq": grads[0], "dk": grads[1], "dv": grads[2]}
    if lse is not None:
        candidates["lse"] = lse[live]
    references, baselines = _reference_quantities(ref, live, lse is not None)
    judged = precision.get(impl.name, "float64") if dtype == "float64" else dtype
    if judged != dtype:
        # judged as `judged`: the plain error of that precision (computation only) as baseline
        ref_j = refs.get(case, judged, zero_dead_rows=behaviour != "zero")
        _, bases_j = _reference_quantities(ref_j, live, lse is not None)
        baselines = {name: bases_j[name] for name in candidates}
        candidates = {name: c.astype(judged) for name, c in candidates.items()}
        row.note = f"judged as {judged}: it computes in {judged} for float64 inputs (known)"
    if behaviour != "zero":
        row.note = _join(row.note, f"fully masked rows: {behaviour} (known difference; excluded)")
        if behaviour == "nan" and not all(np.isfinite(g).all() for g in grads):
            row.note += ", NaN gradients follow from them"
            for name in ("dq", "dk", "dv"):
                candidates.pop(name)
        elif behaviour not in _ROW_BEHAVIOURS:
            row.status = "FAIL"
            row.note = f"fully masked rows: unrecognized output ({behaviour})"
    _evaluate(row, candidates, references, baselines)
    if behaviour == "zero" and inputs.dead_rows.any():
        row.note = _join(row.note, "fully masked rows: 0, as refattn")
    return row


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"unsupported: {text[0][:90]}" if text else f"unsupported: {type(exc).__name__}"


def _probe_case(name: str) -> AttentionCase:
    """The grid case a probe runs on (probes reuse grid shapes: JAX compiles once for both)."""
    return next(c for c in ATTENTION_CASES if c.name == name)


def _attention_probes(report: CompareReport, impls: list[Any], refs: _References) -> dict[str, str]:
    """Probe every implementation's semantics; return the float64 precision of those that
    compute in less (implementation name -> "float32")."""
    precision: dict[str, str] = {}
    dead_case = _probe_case("fully_masked_rows")
    dead_inputs = refs.inputs(dead_case)
    for impl in impls:
        dtype = _probe_dtype(impl, dead_case, dead_inputs, refs)
        if dtype is None:
            continue
        ref = refs.get(dead_case, dtype)
        out, _, lse = impl.run(dead_case, dead_inputs, ref, dtype, want_grads=False)
        observed = classify_masked_rows(
            out[dead_inputs.dead_rows], _uniform_rows(dead_inputs, ref.v), dtype
        )
        report.probes.append(
            Probe(
                impl.name,
                "fully masked rows (bool mask)",
                "zero",
                observed,
                _status(observed, "zero", _ROW_BEHAVIOURS),
                f"{dtype}: {_MASKED_ROWS_DETAIL.get(observed, 'unrecognized output')}",
            )
        )
        if lse is not None:
            observed = _classify_lse(lse[dead_inputs.dead_rows])
            report.probes.append(
                Probe(
                    impl.name,
                    "logsumexp of fully masked rows",
                    "-inf",
                    observed,
                    _status(observed, "-inf", ("-inf", "large finite negative", "nan")),
                    "the masked scores are a large finite negative number, not -inf"
                    if observed == "large finite negative"
                    else "",
                )
            )
        report.probes.append(_alignment_probe(impl, refs, dtype))
        report.probes.append(_mask_meaning_probe(impl, refs, dtype))
        probe = _precision_probe(impl, refs)
        report.probes.append(probe)
        if probe.observed == "float32":
            precision[impl.name] = "float32"
    return precision


def _probe_tolerance(dtype: str, scale: float) -> float:
    """Probes tell apart behaviours that differ by O(1): a loose, dtype-aware tolerance."""
    return max(64 * machine_epsilon(dtype), 1e-4) * max(1.0, scale)


def _precision_probe(impl: Any, refs: _References) -> Probe:
    """Does the float64 path compute in float64? (JAX's softmax always runs in float32.)"""
    case = _probe_case("basic")
    inputs = refs.inputs(case)
    ref = refs.get(case, "float64")
    behaviour = "precision of float64 inputs"
    try:
        out = impl.run(case, inputs, ref, "float64", want_grads=False)[0]
    except Exception as exc:
        if not _unsupported(exc):
            raise
        return Probe(impl.name, behaviour, "float64", "n/a", "n/a", "no float64 path")
    rel = float(np.abs(out - ref.out).max()) / float(np.abs(ref.out).max())
    observed = "float64" if rel < 1e-12 else ("float32" if rel < 1e-5 else "other")
    detail = f"max error {rel:.1e} relative to max|out|"
    if observed == "float32":
        detail += "; its float64 rows are judged by the float32 rule"
    return Probe(
        impl.name,
        behaviour,
        "float64",
        observed,
        _status(observed, "float64", ("float64", "float32")),
        detail,
    )


def _probe_dtype(impl: Any, case: AttentionCase, inputs: Inputs, refs: _References) -> str | None:
    """The first of float64, float32, float16, bfloat16 that ``impl`` runs ``case`` in."""
    for dtype in DTYPES:
        try:
            impl.run(case, inputs, refs.get(case, dtype), dtype, want_grads=False)
        except Exception as exc:
            if not _unsupported(exc):
                raise
            continue
        return dtype
    return None


def _alignment_probe(impl: Any, refs: _References, dtype: str) -> Probe:
    """Which causal alignment the framework's is_causal uses when n_q < n_k."""
    case = _probe_case("causal_upper_left_nq12_nk20")
    inputs = refs.inputs(case)
    ref = refs.get(case, dtype)
    if getattr(impl, "is_flax", False):
        return Probe(
            impl.name, "is_causal alignment (n_q < n_k)", "upper_left", "n/a", "n/a", "no is_causal"
        )
    try:
        out = impl.run(case, inputs, ref, dtype, want_grads=False)[0]
    except Exception as exc:
        if not _unsupported(exc):
            raise
        return Probe(impl.name, "is_causal alignment (n_q < n_k)", "upper_left", "n/a", "n/a")
    errors = {}
    for alignment in ("upper_left", "lower_right"):
        expected = scaled_dot_product_attention(
            ref.q, ref.k, ref.v, is_causal=True, causal_alignment=alignment
        )
        errors[alignment] = float(np.abs(out.astype(np.float64) - expected).max())
    tol = _probe_tolerance(dtype, float(np.abs(ref.v).max()))
    observed = "other"
    for alignment, err in errors.items():
        if err <= tol and min(e for a, e in errors.items() if a != alignment) > tol:
            observed = alignment
    return Probe(
        impl.name,
        "is_causal alignment (n_q < n_k)",
        "upper_left",
        observed,
        _status(observed, "upper_left", ("upper_left", "lower_right")),
        f"refattn's default; refattn takes causal_alignment='lower_right' for the other "
        f"(errors: {', '.join(f'{a} {e:.1e}' for a, e in errors.items())})",
    )


def _mask_meaning_probe(impl: Any, refs: _References, dtype: str) -> Probe:
    """Whether a boolean mask's True means attend or ignore."""
    case = _probe_case("bool_mask")
    inputs = refs.inputs(case)
    ref = refs.get(case, dtype)
    mask = inputs.mask
    out = impl.run(case, inputs, ref, dtype, want_grads=False, mask=mask)[0]
    tol = _probe_tolerance(dtype, float(np.abs(ref.v).max()))
    err_attend = np.abs(out.astype(np.float64) - ref.out).max()
    inverse = ~mask
    inverse[..., np.arange(case.n_q), np.arange(case.n_q)] = True  # no empty rows
    expected_ignore = scaled_dot_product_attention(ref.q, ref.k, ref.v, mask=inverse)
    out_ignore = impl.run(case, inputs, ref, dtype, want_grads=False, mask=~inverse)[0]
    err_ignore = np.abs(out_ignore.astype(np.float64) - expected_ignore).max()
    observed = "other"
    if err_attend <= tol:
        observed = "True = attend"
    elif err_ignore <= tol:
        observed = "True = ignore"
    return Probe(
        impl.name,
        "boolean mask meaning",
        "True = attend",
        observed,
        _status(observed, "True = attend", ("True = attend", "True = ignore")),
        "" if observed == "True = attend" else "convert with refattn.from_torch_mha_masks",
    )


def _torch_mha_probes(torch: Any) -> list[Probe]:
    """nn.MultiheadAttention: the meaning of boolean masks, and fully masked rows."""
    name = "torch nn.MultiheadAttention"
    torch.manual_seed(0)
    e, h, n = 8, 2, 5
    mha = torch.nn.MultiheadAttention(e, h, batch_first=True, dtype=torch.float64)
    mha.train()
    x = torch.randn(1, n, e, dtype=torch.float64)
    rng = np.random.default_rng(1)
    m = rng.random((n, n)) > 0.5
    m[:, 0], m[:, 1] = True, False  # every row has both values
    mask = torch.from_numpy(m)
    with _quiet():
        _, w = mha(x, x, x, attn_mask=mask, need_weights=True, average_attn_weights=False)
    w = w.detach().numpy()[0]  # (h, n, n)
    if (w[:, m] == 0).all() and (w[:, ~m] > 0).all():
        meaning = "True = ignore"
    elif (w[:, ~m] == 0).all() and (w[:, m] > 0).all():
        meaning = "True = attend"
    else:
        meaning = "other"
    probes = [
        Probe(
            name,
            "boolean attn_mask meaning",
            "True = attend",
            meaning,
            _status(meaning, "True = attend", ("True = attend", "True = ignore")),
            "convert torch masks with refattn.from_torch_mha_masks"
            if meaning == "True = ignore"
            else "",
        )
    ]
    dead = torch.zeros(n, n, dtype=torch.bool)
    dead[2] = True  # ignore every key of query 2
    with torch.no_grad():  # a nonzero out bias, so that "attention output 0" is not output 0
        mha.out_proj.bias.copy_(torch.randn(e, dtype=torch.float64))
        w_v = mha.in_proj_weight[2 * e :].numpy()
        b_v = mha.in_proj_bias[2 * e :].numpy()
        uniform = (x.numpy()[0] @ w_v.T + b_v).mean(axis=0)  # all-keys average, every head
        w_o, b_o = mha.out_proj.weight.numpy(), mha.out_proj.bias.numpy()
    for need_weights in (False, True):
        with _quiet():
            out, _ = mha(x, x, x, attn_mask=dead, need_weights=need_weights)
        row = out.detach().numpy()[0, 2]
        # undo the output projection: the heads' attention output for that row
        heads = np.linalg.solve(w_o, row - b_o) if np.isfinite(row).all() else row
        observed = classify_masked_rows(heads[None], uniform[None], "float64")
        if observed == "other" and np.abs(heads).max() < 1e-12:
            observed = "zero"
        probes.append(
            Probe(
                name,
                f"fully masked rows (need_weights={need_weights})",
                "zero",
                observed,
                _status(observed, "zero", _ROW_BEHAVIOURS),
                _MASKED_ROWS_DETAIL.get(observed, "unrecognized output"),
            )
        )
    return probes


def _torch_backends(torch: Any, device: str, refs: _References) -> tuple[list[str], list[str]]:
    """SDPA backends that run at least one dtype on ``device``, and notes on the others."""
    names = ["default", "math", "flash", "efficient", "cudnn"]
    case = _probe_case("basic")
    inputs = refs.inputs(case)
    available, notes = [], []
    for name in names:
        impl = _TorchSDPA(torch, name, device)
        if _probe_dtype(impl, case, inputs, refs) is None:
            notes.append(f"torch SDPA backend {name!r} is not available on {device}")
        else:
            available.append(name)
    return available, notes


# ----------------------------------------------------------------------------- torch layers


def _layer_op(name: str) -> Any:
    """``refattn.<name>`` if refattn has it (the layers land separately), else None."""
    import refattn

    op = getattr(refattn, name, None)
    if op is None:
        from ._op import registered_ops
        from .checks import all_cases

        all_cases()
        op = registered_ops().get(name)
    return op


def _t2n(t: Any) -> np.ndarray:
    return t.detach().cpu().double().numpy()


def _mha_params_from_torch(mha: Any, grads: bool = False) -> dict[str, Any]:
    """refattn's MHA tree from a torch module: ``(d_in, d_out)`` weights (torch stores the
    transpose), the packed ``in_proj_weight`` split in three. ``grads`` reads ``.grad``."""

    def get(p: Any) -> np.ndarray | None:
        if p is None:
            return None
        return _t2n(p.grad if grads else p)

    e = mha.embed_dim
    if mha._qkv_same_embed_dim:
        w = get(mha.in_proj_weight)
        ws = [w[:e], w[e : 2 * e], w[2 * e :]]
    else:
        ws = [get(mha.q_proj_weight), get(mha.k_proj_weight), get(mha.v_proj_weight)]
    b = get(mha.in_proj_bias)
    bs = [None, None, None] if b is None else [b[:e], b[e : 2 * e], b[2 * e :]]
    params: dict[str, Any] = {}
    for key, w_i, b_i in zip(("query", "key", "value"), ws, bs, strict=True):
        params[key] = {"weight": np.ascontiguousarray(w_i.T)}
        if b_i is not None:
            params[key]["bias"] = b_i
    params["out"] = {"weight": np.ascontiguousarray(get(mha.out_proj.weight).T)}
    if mha.out_proj.bias is not None:
        params["out"]["bias"] = get(mha.out_proj.bias)
    return params


def _linear_from_torch(lin: Any, grads: bool = False) -> dict[str, Any]:
    w = lin.weight.grad if grads else lin.weight
    out = {"weight": np.ascontiguousarray(_t2n(w).T)}
    if lin.bias is not None:
        out["bias"] = _t2n(lin.bias.grad if grads else lin.bias)
    return out


def _norm_from_torch(norm: Any, grads: bool = False) -> dict[str, Any]:
    pick = (lambda p: p.grad) if grads else (lambda p: p)
    return {"weight": _t2n(pick(norm.weight)), "bias": _t2n(pick(norm.bias))}


def _encoder_params_from_torch(layer: Any, grads: bool = False) -> dict[str, Any]:
    return {
        "self_attn": _mha_params_from_torch(layer.self_attn, grads),
        "norm1": _norm_from_torch(layer.norm1, grads),
        "norm2": _norm_from_torch(layer.norm2, grads),
        "linear1": _linear_from_torch(layer.linear1, grads),
        "linear2": _linear_from_torch(layer.linear2, grads),
    }


def _round_module(torch: Any, module: Any, dtype: str, device: str) -> Any:
    """Round a float64 module's parameters to ``dtype`` in place, then move it to ``dtype``."""
    tdtype = _torch_dtype(torch, dtype)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.to(tdtype).to(torch.float64))
    return module.to(device=device, dtype=tdtype)


@dataclass(frozen=True)
class _LayerCase:
    name: str
    kind: str  # "mha" or "encoder"
    batch: int = 2
    n_q: int = 7
    n_k: int = 7
    d_model: int = 16
    n_heads: int = 4
    kdim: int | None = None
    vdim: int | None = None
    attn_mask: str | None = None  # "bool" (torch: True = ignore) | "float"
    key_padding: bool = False
    norm_first: bool = False
    activation: str = "relu"
    quick: bool = False

    @property
    def seed(self) -> int:
        return zlib.crc32(self.name.encode())


LAYER_CASES = (
    _LayerCase("mha_self_bool_mask", "mha", attn_mask="bool", quick=True),
    _LayerCase("mha_key_padding", "mha", key_padding=True),
    _LayerCase("mha_float_mask", "mha", attn_mask="float"),
    _LayerCase("mha_cross_kdim12_vdim10", "mha", n_q=5, n_k=9, kdim=12, vdim=10),
    _LayerCase("encoder_post_ln_relu", "encoder", key_padding=True, quick=True),
    _LayerCase("encoder_pre_ln_gelu", "encoder", norm_first=True, activation="gelu"),
)


def _torch_layer_masks(case: _LayerCase, rng: np.random.Generator) -> tuple[Any, Any]:
    attn_mask = key_padding = None
    if case.attn_mask == "bool":
        attn_mask = rng.random((case.n_q, case.n_k)) < 0.3  # True = ignore (torch)
        attn_mask[np.arange(case.n_q), np.arange(case.n_q) % case.n_k] = False
    elif case.attn_mask == "float":
        attn_mask = rng.standard_normal((case.n_q, case.n_k))
    if case.key_padding:
        key_padding = np.zeros((case.batch, case.n_k), dtype=bool)
        key_padding[-1, -2:] = True  # the last two keys of the last batch are padding
    return attn_mask, key_padding


def _torch_layer_row(torch: Any, case: _LayerCase, dtype: str, device: str, op: Any) -> Row:
    import refattn

    rng = np.random.default_rng(case.seed)
    torch.manual_seed(case.seed)
    f64 = torch.float64
    tdtype = _torch_dtype(torch, dtype)
    d, h = case.d_model, case.n_heads
    if case.kind == "mha":
        module = torch.nn.MultiheadAttention(
            d, h, batch_first=True, kdim=case.kdim, vdim=case.vdim, dtype=f64
        )
        shapes = [
            (case.batch, case.n_q, d),
            (case.batch, case.n_k, case.kdim or d),
            (case.batch, case.n_k, case.vdim or d),
        ]
        impl = "torch nn.MultiheadAttention"
    else:
        module = torch.nn.TransformerEncoderLayer(
            d,
            h,
            dim_feedforward=2 * d,
            dropout=0.0,
            activation=case.activation,
            batch_first=True,
            norm_first=case.norm_first,
            dtype=f64,
        )
        shapes = [(case.batch, case.n_q, d)]
        impl = "torch nn.TransformerEncoderLayer"
    module.train()  # dropout is 0; train mode keeps torch off its fused inference fast path
    _round_module(torch, module, dtype, device)
    xs = [
        np.asarray(round_to_dtype(rng.standard_normal(s), dtype), dtype=np.float64) for s in shapes
    ]
    attn_mask, key_padding = _torch_layer_masks(case, rng)
    if attn_mask is not None and attn_mask.dtype != bool:
        attn_mask = np.asarray(round_to_dtype(attn_mask, dtype), dtype=np.float64)
    ct = np.asarray(
        round_to_dtype(rng.standard_normal((case.batch, case.n_q, d)), dtype), dtype=np.float64
    )
    mask, bias = refattn.from_torch_mha_masks(attn_mask, key_padding)
    grads_of = _mha_params_from_torch if case.kind == "mha" else _encoder_params_from_torch
    params = grads_of(module)
    options: dict[str, Any] = {"n_heads": h, "mask": mask}
    if case.kind == "mha":
        options["bias"] = bias
    else:
        options.update(norm_first=case.norm_first, activation=case.activation)
    ref_out, ref_grads = run_in_dtype(op, params, *xs, dtype="float64", cotangent=ct, **options)
    base_out, base_grads = _layer_baseline(op, params, xs, ct, options, dtype)
    leaves = [torch.from_numpy(x).to(device=device, dtype=tdtype).requires_grad_() for x in xs]
    t_mask = None if attn_mask is None else torch.from_numpy(attn_mask).to(device)
    if t_mask is not None and t_mask.is_floating_point():
        t_mask = t_mask.to(tdtype)
    t_kpm = None if key_padding is None else torch.from_numpy(key_padding).to(device)
    with _quiet():
        if case.kind == "mha":
            out, _ = module(*leaves, attn_mask=t_mask, key_padding_mask=t_kpm, need_weights=False)
        else:
            out = module(leaves[0], src_mask=t_mask, src_key_padding_mask=t_kpm)
        out.backward(torch.from_numpy(ct).to(device=device, dtype=tdtype))
    cand_grads = (grads_of(module, grads=True), *(_t2n(x.grad) for x in leaves))
    names = ("dparams", "dquery", "dkey", "dvalue") if case.kind == "mha" else ("dparams", "dx")
    candidates = {"out": _torch_to_numpy(out)}
    references = {"out": ref_out}
    baselines = {"out": base_out}
    for name, c, r, b in zip(names, cand_grads, ref_grads, base_grads, strict=True):
        candidates.update(_tree_quantities(name, _tree.map_leaves(_as(dtype), c)))
        references.update(_tree_quantities(name, r))
        baselines.update(_tree_quantities(name, b))
    row = Row(case.name, impl, dtype)
    return _evaluate(row, candidates, references, baselines, _parameter_scales(references))


def _rounded(tree: Any, dtype: str) -> Any:
    """Floating leaves rounded to ``dtype`` and stored as float64 (exactly)."""

    def one(x: Any) -> Any:
        if isinstance(x, np.ndarray) and np.issubdtype(x.dtype, np.floating):
            return np.asarray(round_to_dtype(x, dtype)).astype(np.float64)
        return x

    return _tree.map_leaves(one, tree)


def _layer_baseline(
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
    p32, xs32, ct32 = _rounded(params, "float32"), _rounded(xs, "float32"), _rounded(ct, "float32")
    o32 = {k: _rounded(v, "float32") for k, v in options.items()}
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


def _tolerance(cand: Any, ref: Any, base: Any, scale: float | None) -> AttentionTolerance:
    return attention_tolerance(
        cand, ref, base, factor=FACTOR, floor_ulps=FLOOR_ULPS, floor_scale=scale
    )


def _as(dtype: str) -> Callable[[np.ndarray], np.ndarray]:
    return lambda x: x.astype(dtype)


def _torch_layer_rows(
    report: CompareReport, torch: Any, device: str, quick: bool, dtypes: tuple[str, ...]
) -> None:
    for kind, op_name, module in (
        ("mha", "multi_head_attention", "nn.MultiheadAttention"),
        ("encoder", "transformer_encoder_layer", "nn.TransformerEncoderLayer"),
    ):
        op = _layer_op(op_name)
        if op is None:
            report.notes.append(
                f"torch {module}: skipped, this refattn has no {op_name} (the layers issue adds it)"
            )
            continue
        for case in LAYER_CASES:
            if case.kind != kind or (quick and not case.quick):
                continue
            for dtype in (d for d in LAYER_DTYPES if d in dtypes):
                report.rows.append(_torch_layer_row(torch, case, dtype, device, op))


def _compare_torch(
    report: CompareReport, device: str, quick: bool, dtypes: tuple[str, ...]
) -> None:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise _Unavailable("torch reports no CUDA device (torch.cuda.is_available() is False)")
    report.notes.append(f"torch {torch.__version__}")
    refs = _References()
    backends, notes = _torch_backends(torch, device, refs)
    report.notes.extend(notes)
    impls = [_TorchSDPA(torch, b, device) for b in backends]
    precision = _attention_probes(report, impls, refs)
    report.probes.extend(_torch_mha_probes(torch))
    cases = [c for c in ATTENTION_CASES if c.quick or not quick]
    if quick:  # the quick grid: the default dispatch and the math backend only
        impls = [i for i in impls if i.backend in ("default", "math")] or impls[:1]
    _attention_rows(report, impls, cases, dtypes, refs, precision)
    _torch_layer_rows(report, torch, device, quick, dtypes)


# ----------------------------------------------------------------------------- JAX


class _JaxAttention:
    """``jax.nn.dot_product_attention`` (or flax's) in JAX's (B, T, N, H) layout.

    Each call is one jitted function of ``(q, k, v, cotangent, mask, bias)`` returning the
    output, the gradients and the logsumexp (``return_residual=True``), so that cases with the
    same shapes share one compilation: an absent mask is passed as all-True, an absent bias as
    zeros (both exact no-ops).
    """

    def __init__(self, name: str, fn: Any, device: Any, implementation: str | None) -> None:
        self.name = name
        self.fn = fn
        self.device = device
        self.implementation = implementation
        self.is_flax = name.startswith("flax")
        self._jitted: dict[tuple[Any, ...], Any] = {}
        self._eager_dtypes: set[str] = set()

    def unsupported(self, case: AttentionCase) -> str:
        """Why ``case`` cannot be expressed with this function ("" when it can)."""
        if case.causal == "lower_right_bias":
            return "torch's causal_lower_right bias; the lower_right_mask case covers JAX"
        if case.d_v != case.d:
            return "requires d_v == d_k"
        if self.is_flax and case.h_q != case.h_kv:
            return "flax.linen.dot_product_attention has no GQA"
        return ""

    def _function(self, is_causal: bool, scale: float | None) -> Any:
        key = (is_causal, scale)
        if key not in self._jitted:
            import jax
            import jax.numpy as jnp

            fn, flax = self.fn, self.is_flax
            extra = {} if self.implementation is None else {"implementation": self.implementation}

            def forward(q: Any, k: Any, v: Any, mask: Any, bias: Any) -> Any:
                if flax:  # flax scales q by 1/sqrt(d) itself and has no is_causal (mask has it)
                    if scale is not None:
                        q = q * (scale * math.sqrt(q.shape[-1]))
                    return fn(q, k, v, bias=bias, mask=mask), None
                return fn(
                    q,
                    k,
                    v,
                    bias=bias,
                    mask=mask,
                    scale=scale,
                    is_causal=is_causal,
                    return_residual=True,
                    **extra,
                )

            def run(q: Any, k: Any, v: Any, ct: Any, mask: Any, bias: Any) -> Any:
                (out, lse), pullback = jax.vjp(
                    lambda a, b, c: forward(a, b, c, mask, bias), q, k, v
                )
                grads = pullback((ct, None if lse is None else jnp.zeros_like(lse)))
                return out, grads, lse

            self._jitted[key] = (jax.jit(run), run)
        return self._jitted[key]

    def run(
        self,
        case: AttentionCase,
        inputs: Inputs,
        ref: _Reference,
        dtype: str,
        *,
        mask: np.ndarray | None = None,
        want_grads: bool = True,
    ) -> tuple[np.ndarray, Any, Any]:
        """``(out, (dq, dk, dv), lse)`` in refattn's layout on the reference's rounded inputs."""
        import jax
        import jax.numpy as jnp

        keep = inputs.mask if mask is None else mask
        causal = case.causal
        if causal == "lower_right_mask" or (self.is_flax and causal == "upper_left"):
            alignment = "upper_left" if causal == "upper_left" else "lower_right"
            c = causal_mask(case.n_q, case.n_k, alignment)
            keep = c if keep is None else keep & c
        full = (case.batch, 1, case.n_q, case.n_k)
        keep = np.ones(full, dtype=bool) if keep is None else np.broadcast_to(keep, full)
        bias = np.zeros((1, 1, case.n_q, case.n_k)) if ref.bias is None else ref.bias

        with jax.enable_x64(True):

            def put(x: np.ndarray, dt: Any = dtype) -> Any:
                return jax.device_put(jnp.asarray(x, dtype=dt), self.device)

            q, k, v, ct = (put(np.swapaxes(x, 1, 2)) for x in (ref.q, ref.k, ref.v, ref.cotangent))
            jitted, eager = self._function(causal == "upper_left" and not self.is_flax, case.scale)
            args = (q, k, v, ct, put(keep, bool), put(bias))
            if dtype in self._eager_dtypes:
                out, grads, lse = eager(*args)
            else:
                try:
                    out, grads, lse = jitted(*args)
                except ValueError as exc:
                    # float16 on the CPU: JAX asks dot_general for an F16_F16_F32 precision the
                    # CPU lacks; eagerly JAX catches that and falls back, under jit it cannot.
                    if "not supported by dot_general" not in str(exc):
                        raise
                    self._eager_dtypes.add(dtype)
                    out, grads, lse = eager(*args)
            out = _from_jax(out)
            grads = tuple(_from_jax(g) for g in grads) if want_grads else None
            lse = None if lse is None else _from_jax(lse)  # (B, T, N) -> (B, N, T)
        return out, grads, lse


def _from_jax(x: Any) -> np.ndarray:
    return np.swapaxes(np.asarray(x), 1, 2)


def _compare_jax(report: CompareReport, device: str, quick: bool, dtypes: tuple[str, ...]) -> None:
    import jax

    report.notes.append(f"jax {jax.__version__}")
    if device == "cuda":
        try:
            dev = jax.devices("gpu")[0]
        except RuntimeError as exc:
            raise _Unavailable(f"JAX sees no GPU ({_first_line(exc)})") from None
        implementations: list[str | None] = ["xla", "cudnn"]
    else:
        dev = jax.devices("cpu")[0]
        implementations = [None]
    impls = [
        _JaxAttention(
            f"jax.nn.dot_product_attention[{impl or 'default'}]",
            jax.nn.dot_product_attention,
            dev,
            impl,
        )
        for impl in implementations
    ]
    if importlib.util.find_spec("flax") is not None:
        import flax.linen

        impls.append(
            _JaxAttention(
                "flax.linen.dot_product_attention", flax.linen.dot_product_attention, dev, None
            )
        )
    else:
        report.notes.append("flax is not installed: flax.linen.dot_product_attention skipped")
    refs = _References()
    precision = _attention_probes(report, impls, refs)
    cases = [c for c in ATTENTION_CASES if c.quick or not quick]
    _attention_rows(report, impls, cases, dtypes, refs, precision)


# ----------------------------------------------------------------------------- driver


class _Unavailable(RuntimeError):
    """The framework or device cannot be used (exit status 2)."""


def compare(
    framework: str,
    *,
    device: str = "cpu",
    quick: bool = False,
    dtypes: tuple[str, ...] = DTYPES,
    strict: bool = False,
) -> CompareReport:
    """Run the comparison and return the report (see the module docstring).

    Raises ImportError when ``framework`` is not installed, and RuntimeError when ``device`` is
    "cuda" and the framework sees no GPU.
    """
    if framework not in FRAMEWORKS:
        raise ValueError(f"refattn compare: framework must be 'torch' or 'jax', got {framework!r}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"refattn compare: device must be 'cpu' or 'cuda', got {device!r}")
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        raise ValueError(f"refattn compare: dtypes must be among {DTYPES}, got {bad}")
    start = time.perf_counter()
    report = CompareReport(framework, device, strict=strict)
    runner = _compare_torch if framework == "torch" else _compare_jax
    runner(report, device, quick, tuple(dtypes))
    report.seconds = time.perf_counter() - start
    return report


def _fmt(x: float) -> str:
    return "" if math.isnan(x) else f"{x:.2e}"


def print_report(report: CompareReport, stream: IO[str] | None = None) -> None:
    """The table, the probed semantic differences, and a summary line."""
    out = stream or sys.stdout
    print(
        f"refattn {__version__} compare {report.framework} on {report.device} "
        f"({', '.join(report.notes[:1])}); reference: refattn float64 on the same rounded "
        f"inputs; allowed = {FACTOR:g} x plain-implementation error + {FLOOR_ULPS:g} eps "
        "max|ref|",
        file=out,
    )
    w_case = max([len("case"), *(len(r.case) for r in report.rows)])
    w_impl = max([len("implementation"), *(len(r.impl) for r in report.rows)])
    header = (
        f"{'case':<{w_case}}  {'implementation':<{w_impl}}  {'dtype':<8}  {'out err':>9}  "
        f"{'allowed':>9}  {'grad err':>9}  {'allowed':>9}  {'worst':<6}  {'status':<6}  note"
    )
    print(header, file=out)
    print("-" * len(header), file=out)
    for r in report.rows:
        print(
            f"{r.case:<{w_case}}  {r.impl:<{w_impl}}  {r.dtype:<8}  {_fmt(r.out_error):>9}  "
            f"{_fmt(r.out_allowed):>9}  {_fmt(r.grad_error):>9}  {_fmt(r.grad_allowed):>9}  "
            f"{r.grad_name[:6]:<6}  {r.status:<6}  {r.note}",
            file=out,
        )
    print("\nKnown semantic differences (probed from the framework's actual output):", file=out)
    w_fn = max([len("function"), *(len(p.function) for p in report.probes)])
    w_b = max([len("behaviour"), *(len(p.behaviour) for p in report.probes)])
    w_o = max([len("observed"), *(len(p.observed) for p in report.probes)])
    print(
        f"{'function':<{w_fn}}  {'behaviour':<{w_b}}  {'refattn':<14}  {'observed':<{w_o}}  "
        f"{'status':<16}  detail",
        file=out,
    )
    for p in report.probes:
        print(
            f"{p.function:<{w_fn}}  {p.behaviour:<{w_b}}  {p.refattn:<14}  "
            f"{p.observed:<{w_o}}  {p.status:<16}  {p.detail}",
            file=out,
        )
    for note in report.notes[1:]:
        print(f"note: {note}", file=out)
    counts = {s: sum(r.status == s for r in report.rows) for s in ("pass", "warn", "FAIL", "n/a")}
    differs = sum(p.status == "differs (known)" for p in report.probes)
    print(
        f"\n{len(report.rows)} rows: {counts['pass']} pass, {counts['warn']} warn, "
        f"{counts['FAIL']} FAIL, "
        f"{counts['n/a']} n/a; {len(report.probes)} probes: {differs} known differences, "
        f"{len(report.unexpected)} unexpected; {report.seconds:.1f} s",
        file=out,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``refattn compare``: ``torch|jax [--device cpu|cuda] [--quick]``."""
    parser.add_argument("framework", choices=FRAMEWORKS, help="the framework to check")
    parser.add_argument(
        "--device",
        default="cpu",
        choices=["cpu", "cuda"],
        help="where the framework runs (refattn's float64 reference always runs on the CPU)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a small grid (a few seconds; used by the tests)"
    )
    parser.add_argument(
        "--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES), help="dtypes to run"
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help=f"fail on 'warn' rows too (errors within {WARN_FACTOR:g}x of the allowed one)",
    )


def run(args: argparse.Namespace, stream: IO[str] | None = None) -> int:
    """``refattn compare``: print the report; 0 if all pass, 1 on a mismatch, 2 if unavailable."""
    try:
        report = compare(
            args.framework,
            device=args.device,
            quick=args.quick,
            dtypes=tuple(getattr(args, "dtypes", DTYPES)),
            strict=getattr(args, "strict", False),
        )
    except ImportError as exc:
        print(f"refattn compare: {args.framework} is not installed ({exc})", file=sys.stderr)
        return 2
    except _Unavailable as exc:
        print(f"refattn compare: {exc}", file=sys.stderr)
        return 2
    print_report(report, stream)
    return 0 if report.ok else 1


def main(argv: list[str] | None = None) -> int:
    """``python -m refattn.compare torch|jax``."""
    parser = argparse.ArgumentParser(prog="refattn compare", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
