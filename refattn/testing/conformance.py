r"""A conformance suite for any attention kernel: refattn's float64 answers and the FlashAttention
rule, over a documented case catalogue.

A kernel is any function with refattn's calling convention (below), in torch, JAX or NumPy (a
C kernel behind DLPack is a NumPy function that converts), wrapped in a :class:`Kernel` that
declares the features it has. :func:`run` calls it on every case of :data:`CASES` whose
features it declares and every dtype it lists, compares its output, LSE (if it returns one) and
gradients with refattn's float64 result for the same rounded inputs, and prints a table; the
cases it lacks are reported as skipped. In a test suite::

    KERNEL = conformance.Kernel(my_attention, framework="torch", features={"causal", "gqa"})

    @pytest.mark.parametrize("case, dtype", conformance.cases(KERNEL))
    def test_conforms(case, dtype):
        conformance.check(KERNEL, case, dtype)

**The calling convention.** ``fn(q, k, v, **options)`` with ``q (B, Hq, n_q, d)``,
``k (B, Hkv, n_k, d)``, ``v (B, Hkv, n_k, d_v)`` (``layout="BSHD"`` swaps axes 1 and 2 of
inputs and output) in the framework's arrays, returning ``out`` like ``q`` with ``d_v``, or
``(out, lse)`` with ``lse (B, Hq, n_q)``. A case passes only the options it uses, with refattn's
meanings (:func:`refattn.scaled_dot_product_attention`):

==================  =======================================================================
option              meaning
==================  =======================================================================
``is_causal``       True; with ``causal_alignment`` "upper_left" (torch, JAX) or
                    "lower_right" (FlashAttention: ``j <= i + n_k - n_q``)
``mask``            bool ``(B, 1, n_q, n_k)``, True = attend
``scale``           a float (default ``1/sqrt(d)``)
``window``          ``(left, right)``: keys ``i + o - left <= j <= i + o + right``, ``o`` the
                    alignment's offset (FlashAttention's ``window_size``)
``softcap``         ``c``: scores ``c tanh(s / c)`` (Gemma 2, FlashAttention's ``softcap``)
``sinks``           ``(Hq,)`` sink logits in each row's denominator (gpt-oss); differentiated
``query_lengths``,  ``(B,)`` ints: a padded batch, each sequence aligned on its own lengths
``key_lengths``     (FlashAttention's varlen rule under "lower_right")
==================  =======================================================================

**Features** (what a kernel declares; a case runs when it needs only declared ones): "mask",
"fully_masked_rows" (rows that see no key give output 0, LSE -inf, zero gradients, refattn's
choice), "causal" (upper-left), "causal_lower_right", "gqa", "cross" (``n_q != n_k``), "d_v"
(``d_v != d``), "scale", "window", "softcap", "sinks", "varlen", "extreme_logits" (scores of
about ±300), "lse" (the kernel returns the LSE), "grad" (torch/JAX autodiff, or ``vjp``).

**The rule** (:func:`refattn.testing.assert_attention_close`): each quantity's error against
the float64 reference may be at most ``factor`` (2) times a plain implementation's error in the
same dtype, plus 2 ulps of the reference's magnitude. The plain errors are those of
:func:`refattn.testing.lowp_attention_baseline` and its VJP (the worst of the three textbook
softmax-VJP forms), given the window, lengths and causal masks as one explicit boolean mask;
for softcap and sinks, which the plain baseline has no form of, refattn's float32 kernel's error
scaled by ``eps(dtype) / eps(float32)`` (the error of a backward-stable computation is
proportional to the unit roundoff); for float64 candidates, the float32 errors scaled by
``eps64 / eps32`` (:func:`refattn.testing.float64_baseline_error`). A quantity over its allowed
error but within :data:`WARN_FACTOR` times it is "warn" (an accuracy gap, not a wrong
semantics), a failure only with ``strict=True``.
"""

from __future__ import annotations

import math
import sys
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np  # the harness works on host copies; refattn's reference runs on NumPy

from ..ops.sdpa import scaled_dot_product_attention
from .baselines import (
    SOFTMAX_VJP_FORMS,
    lowp_attention_baseline,
    lowp_attention_vjp_baseline,
    run_in_dtype,
)
from .dtypes import machine_epsilon, round_to_dtype
from .tolerance import attention_tolerance, max_abs_error

__all__ = [
    "CASES",
    "DTYPES",
    "FEATURES",
    "Case",
    "Kernel",
    "Report",
    "cases",
    "check",
    "jax_kernel",
    "run",
    "torch_sdpa_kernel",
]

DTYPES = ("float64", "float32", "float16", "bfloat16")
FEATURES = frozenset(
    {
        "mask",
        "fully_masked_rows",
        "causal",
        "causal_lower_right",
        "gqa",
        "cross",
        "d_v",
        "scale",
        "window",
        "softcap",
        "sinks",
        "varlen",
        "extreme_logits",
        "lse",
        "grad",
    }
)
FACTOR = 2.0
FLOOR_ULPS = 2.0
#: errors past the allowed one but within this multiple of it are "warn" (an accuracy gap, as in
#: ``refattn compare``: semantic mismatches are orders of magnitude larger); ``strict`` fails them
WARN_FACTOR = 4.0


# ----------------------------------------------------------------------------- the catalogue


@dataclass(frozen=True)
class Case:
    """One problem of the catalogue: shapes, the options passed to the kernel, the features it
    needs (module docstring)."""

    name: str
    needs: frozenset[str] = frozenset()
    batch: int = 2
    h_q: int = 2
    h_kv: int = 2
    n_q: int = 16
    n_k: int = 16
    d: int = 16
    d_v: int = 16
    mask: str | None = None  # None, "random" or "dead_rows" (two rows see nothing)
    causal: str | None = None  # None, "upper_left", "lower_right"
    window: tuple[int | None, int | None] | None = None
    softcap: float | None = None
    sinks: bool = False
    query_lengths: tuple[int, ...] | None = None
    key_lengths: tuple[int, ...] | None = None
    scale: float | None = None
    logit_scale: float = 1.0

    @property
    def seed(self) -> int:
        return zlib.crc32(self.name.encode())

    def options(self) -> dict[str, Any]:
        """The kernel's keyword options for this case (arrays are added by :func:`inputs`)."""
        options: dict[str, Any] = {}
        if self.causal is not None:
            options.update(is_causal=True, causal_alignment=self.causal)
        for name in ("window", "softcap", "scale", "query_lengths", "key_lengths"):
            if getattr(self, name) is not None:
                options[name] = getattr(self, name)
        return options


def _case(name: str, needs: Iterable[str] = (), **fields: Any) -> Case:
    return Case(name, frozenset(needs), **fields)


#: the catalogue (docs/reference.md has it as a table)
CASES: tuple[Case, ...] = (
    _case("basic"),
    _case("cross_nq12_nk20", ("cross",), n_q=12, n_k=20),
    _case("d_v8", ("d_v",), d_v=8),
    _case("gqa_4q_2kv", ("gqa",), h_q=4, h_kv=2),
    _case("mask", ("mask",), mask="random"),
    _case("fully_masked_rows", ("mask", "fully_masked_rows"), mask="dead_rows"),
    _case("causal", ("causal",), causal="upper_left"),
    _case("causal_nq12_nk20", ("causal", "cross"), n_q=12, n_k=20, causal="upper_left"),
    _case(
        "causal_lower_right_nq12_nk20",
        ("causal_lower_right", "cross"),
        n_q=12,
        n_k=20,
        causal="lower_right",
    ),
    _case("causal_gqa", ("causal", "gqa"), h_q=4, h_kv=1, causal="upper_left"),
    _case("window_3_3", ("window",), window=(3, 3)),
    _case(
        "window_causal_lower_right",
        ("window", "causal_lower_right", "cross"),
        n_q=12,
        n_k=20,
        causal="lower_right",
        window=(5, 0),
    ),
    _case("softcap_5", ("softcap",), softcap=5.0, logit_scale=3.0),
    _case("sinks", ("sinks",), sinks=True),
    _case(
        "sinks_causal_gqa",
        ("sinks", "causal", "gqa"),
        h_q=4,
        h_kv=2,
        sinks=True,
        causal="upper_left",
    ),
    _case(
        "varlen_causal_lower_right",
        ("varlen", "causal_lower_right", "fully_masked_rows"),  # padded rows see nothing
        causal="lower_right",
        query_lengths=(16, 5),
        key_lengths=(16, 9),
    ),
    _case("scale_0.3", ("scale",), scale=0.3),
    _case("extreme_logits", ("extreme_logits",), logit_scale=18.0),
)


@dataclass
class Inputs:
    """Float64 host inputs of a case: arrays, the options with their arrays, the explicit keep
    mask (every masking rule as one boolean array) and the rows that see no key."""

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    sinks: np.ndarray | None
    cotangent: np.ndarray
    options: dict[str, Any]
    keep: np.ndarray  # (B, 1, n_q, n_k)
    dead: np.ndarray  # (B, Hq, n_q)


def inputs(case: Case) -> Inputs:
    """Seeded float64 inputs of ``case`` (the same on every machine)."""
    rng = np.random.default_rng(case.seed)
    b, hq, hkv, n_q, n_k = case.batch, case.h_q, case.h_kv, case.n_q, case.n_k
    q = rng.standard_normal((b, hq, n_q, case.d)) * case.logit_scale
    k = rng.standard_normal((b, hkv, n_k, case.d))
    v = rng.standard_normal((b, hkv, n_k, case.d_v))
    cotangent = rng.standard_normal((b, hq, n_q, case.d_v))
    sinks = rng.standard_normal(hq) if case.sinks else None
    options = case.options()
    keep = np.ones((b, 1, n_q, n_k), dtype=bool)
    if case.mask is not None:
        mask = rng.random((b, 1, n_q, n_k)) > 0.25
        mask[..., np.arange(n_q), np.arange(n_q) % n_k] = True
        if case.mask == "dead_rows":
            mask[..., 1, :] = False
            mask[..., n_q - 2, :] = False
        options["mask"] = mask
        keep &= mask
    keep &= _structured_keep(case)
    if case.query_lengths is not None:  # padded query rows see nothing
        keep &= (
            np.arange(n_q)[None, None, :, None] < np.array(case.query_lengths)[:, None, None, None]
        )
    dead = np.broadcast_to(~keep.any(axis=-1), (b, hq, n_q)).copy()
    return Inputs(q, k, v, sinks, cotangent, options, keep, dead)


def _structured_keep(case: Case) -> np.ndarray:
    """Causal, window and key lengths as a ``(B, 1, n_q, n_k)`` mask, from FlashAttention's
    definitions (``attention_ref``'s ``construct_local_mask``): written out here, not taken from
    refattn's kernels."""
    b, n_q, n_k = case.batch, case.n_q, case.n_k
    q_len = np.array(case.query_lengths or (n_q,) * b)[:, None, None, None]
    k_len = np.array(case.key_lengths or (n_k,) * b)[:, None, None, None]
    offset = (k_len - q_len) if case.causal == "lower_right" else 0
    if case.causal is None and case.window is not None:
        offset = 0
    i = np.arange(n_q)[None, None, :, None]
    j = np.arange(n_k)[None, None, None, :]
    keep = np.broadcast_to(j < k_len, (b, 1, n_q, n_k)).copy()
    if case.causal is not None:
        keep &= j <= i + offset
    if case.window is not None:
        left, right = case.window
        if left is not None:
            keep &= j >= i + offset - left
        if right is not None:
            keep &= j <= i + offset + right
    return keep


# ----------------------------------------------------------------------------- kernels


@dataclass
class Kernel:
    """An attention function under test, and what it declares.

    ``fn(q, k, v, **options)`` (module docstring). ``framework`` is "torch", "jax" or "numpy"
    (arrays are passed as that library's, gradients come from its autodiff; a NumPy kernel gives
    them through ``vjp(q, k, v, d_out, **options) -> (dq, dk, dv)``, or declares no "grad").
    ``device`` is torch's or JAX's device string.
    """

    fn: Callable[..., Any]
    framework: str = "torch"
    features: Iterable[str] = ()
    dtypes: tuple[str, ...] = ("float32",)
    layout: str = "BHSD"
    name: str | None = None
    vjp: Callable[..., Any] | None = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        self.features = frozenset(self.features)
        unknown = sorted(self.features - FEATURES)
        if unknown:
            raise ValueError(
                f"refattn.testing.conformance: unknown features {unknown}; known: "
                f"{sorted(FEATURES)}"
            )
        if self.framework not in ("torch", "jax", "numpy"):
            raise ValueError(
                "refattn.testing.conformance: framework must be 'torch', 'jax' or 'numpy', got "
                f"{self.framework!r}"
            )
        bad = [d for d in self.dtypes if d not in DTYPES]
        if bad:
            raise ValueError(
                f"refattn.testing.conformance: dtypes must be among {DTYPES}, got {bad}"
            )
        if self.layout not in ("BHSD", "BSHD"):
            raise ValueError(
                f"refattn.testing.conformance: layout must be 'BHSD' or 'BSHD', got {self.layout!r}"
            )
        if self.name is None:
            self.name = getattr(self.fn, "__name__", "kernel")

    def lacks(self, case: Case) -> list[str]:
        """The features ``case`` needs that the kernel does not declare."""
        return sorted(case.needs - self.features)


def cases(kernel: Kernel) -> list[Any]:
    """``(case, dtype)`` pairs for ``pytest.mark.parametrize``: every case the kernel can run
    (the others are left out; :func:`run` reports them as skipped), ids ``case-dtype``."""
    pairs = [(c, d) for c in CASES if not kernel.lacks(c) for d in kernel.dtypes]
    try:
        import pytest
    except ImportError:  # plain tuples without pytest
        return pairs
    return [pytest.param(c, d, id=f"{c.name}-{d}") for c, d in pairs]


# ----------------------------------------------------------------------------- evaluation


@dataclass
class Result:
    """One (case, dtype) row: ``status`` "pass", "warn", "FAIL" or "skipped", the output's
    error and allowed error, the worst other quantity's (by error/allowed) and a note."""

    case: str
    dtype: str
    status: str
    out_error: float = math.nan
    out_allowed: float = math.nan
    worst: str = ""
    worst_error: float = math.nan
    worst_allowed: float = math.nan
    note: str = ""


@dataclass
class Report:
    """The results of :func:`run`, printable as a table."""

    kernel: str
    results: list[Result] = field(default_factory=list)

    @property
    def failures(self) -> list[Result]:
        return [r for r in self.results if r.status == "FAIL"]

    def table(self) -> str:
        head = f"conformance of {self.kernel}\n"
        cols = f"{'case':34} {'dtype':9} {'status':8} {'out err/allowed':>22} {'worst other':>32}"
        lines = [head + cols, "-" * len(cols)]
        for r in self.results:
            if r.status == "skipped":
                lines.append(f"{r.case:34} {r.dtype:9} {'skipped':8} {r.note}")
                continue
            out = f"{r.out_error:.2e}/{r.out_allowed:.2e}"
            worst = f"{r.worst} {r.worst_error:.2e}/{r.worst_allowed:.2e}" if r.worst else ""
            line = f"{r.case:34} {r.dtype:9} {r.status:8} {out:>22} {worst:>32}"
            lines.append(line + (f"  {r.note}" if r.note else ""))
        count = {s: sum(r.status == s for r in self.results) for s in ("pass", "warn", "skipped")}
        lines.append(
            f"{count['pass']} passed, {count['warn']} warned, {len(self.failures)} failed, "
            f"{count['skipped']} skipped"
        )
        return "\n".join(lines)

    def print(self, stream: IO[str] | None = None) -> None:
        print(self.table(), file=stream or sys.stdout)


def run(kernel: Kernel, *, dtypes: Iterable[str] | None = None, strict: bool = False) -> Report:
    """Every case and dtype (``kernel.dtypes`` by default): a :class:`Report` (``strict``:
    "warn" rows are failures)."""
    report = Report(kernel.name)
    for case in CASES:
        for dtype in dtypes or kernel.dtypes:
            lacks = kernel.lacks(case)
            if lacks:
                report.results.append(
                    Result(case.name, dtype, "skipped", note=f"lacks {', '.join(lacks)}")
                )
                continue
            report.results.append(evaluate(kernel, case, dtype, strict=strict))
    return report


def check(kernel: Kernel, case: Case, dtype: str, *, strict: bool = False) -> Result:
    """:func:`evaluate` one case and raise AssertionError (with the row) if it fails."""
    result = evaluate(kernel, case, dtype, strict=strict)
    if result.status == "FAIL":
        raise AssertionError(
            f"{kernel.name} on {case.name} ({dtype}): {result.status}: output error "
            f"{result.out_error:.3g} (allowed {result.out_allowed:.3g}); {result.worst} error "
            f"{result.worst_error:.3g} (allowed {result.worst_allowed:.3g}). {result.note}"
        )
    return result


def evaluate(kernel: Kernel, case: Case, dtype: str, *, strict: bool = False) -> Result:
    """Run ``kernel`` on ``case`` in ``dtype`` and judge every quantity by the rule."""
    data = inputs(case)
    rounded = {
        name: _rounded(getattr(data, name), dtype) for name in ("q", "k", "v", "sinks", "cotangent")
    }
    reference = _reference(data, rounded)
    baseline = _baseline_errors(case, data, rounded, dtype, reference)
    out, lse, grads = _call(kernel, case, data, rounded, dtype)
    candidates = {"out": out}
    if lse is not None:
        candidates["lse"] = lse
    if grads is not None:
        candidates.update(zip(("dq", "dk", "dv", "dsinks"), grads, strict=False))
    result = Result(case.name, dtype, "pass")
    worst_ratio = -1.0
    for name, cand in candidates.items():
        ref = reference[name]
        if name == "lse":  # rows that see no key must be -inf, and only those
            dead = np.isneginf(ref)
            if not np.array_equal(np.isneginf(cand), dead):
                result.status = "FAIL"
                result.note += "lse: -inf exactly on the rows that see no key expected; "
            cand, ref = np.where(dead, 0.0, cand), np.where(dead, 0.0, ref)
        tol = attention_tolerance(
            _as_dtype(cand, dtype), ref, baseline[name], factor=FACTOR, floor_ulps=FLOOR_ULPS
        )
        if name == "out":
            result.out_error, result.out_allowed = tol.error, tol.allowed
        elif tol.ratio > worst_ratio:
            worst_ratio = tol.ratio
            result.worst, result.worst_error, result.worst_allowed = name, tol.error, tol.allowed
        if not tol.passed:
            warn = not strict and tol.error <= WARN_FACTOR * tol.allowed
            if result.status != "FAIL":
                result.status = "warn" if warn else "FAIL"
            result.note += f"{name} {tol.ratio:.3g}x allowed; "
    return result


def _rounded(x: np.ndarray | None, dtype: str) -> np.ndarray | None:
    """``x`` rounded to ``dtype``, held in float64 (float64 stays as it is)."""
    if x is None or dtype == "float64":
        return x
    return np.asarray(round_to_dtype(x, dtype), dtype=np.float64)


def _as_dtype(x: np.ndarray, dtype: str) -> Any:
    """The candidate's values in its own dtype (exact: they came from it), so that the rule
    takes that dtype's epsilon; bfloat16 through ``ml_dtypes`` (JAX's) or torch."""
    if dtype != "bfloat16":
        return np.asarray(x, dtype=dtype)
    try:
        import ml_dtypes
    except ImportError:
        import torch

        return torch.from_numpy(np.ascontiguousarray(x)).to(torch.bfloat16)
    return np.asarray(x).astype(ml_dtypes.bfloat16)


def reference_results(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    cotangent: np.ndarray,
    options: dict[str, Any],
    sinks: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """refattn's float64 answer: ``out``, ``lse`` and the gradients ``dq``, ``dk``, ``dv``
    (``dsinks`` with sinks) for the output's ``cotangent``. Shared with ``refattn compare``."""
    primals = (q, k, v) if sinks is None else (q, k, v, None, sinks)
    (out, lse), grads = run_in_dtype(
        scaled_dot_product_attention,
        *primals,
        dtype="float64",
        cotangent=(cotangent, None),
        return_lse=True,
        **options,
    )
    result = {"out": out, "lse": lse}
    result.update(
        {n: g for n, g in zip(("dq", "dk", "dv", None, "dsinks"), grads, strict=False) if n}
    )
    return result


def plain_errors(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    cotangent: np.ndarray,
    options: dict[str, Any],
    dtype: str,
    reference: dict[str, np.ndarray],
) -> dict[str, float]:
    """The plain implementation's max error per quantity in ``dtype`` (float32 or lower):
    :func:`~refattn.testing.lowp_attention_vjp_baseline`, the worst of its softmax-VJP forms,
    and :func:`~refattn.testing.lowp_attention_baseline`'s LSE. ``options`` are the ones the
    baseline takes (mask, bias, causal, scale). Shared with ``refattn compare``."""
    _, lse = lowp_attention_baseline(q, k, v, dtype=dtype, return_lse=True, **options)
    errors = {"lse": max_abs_error(lse, reference["lse"])}
    for form in SOFTMAX_VJP_FORMS:
        out, grads = lowp_attention_vjp_baseline(
            q, k, v, cotangent, dtype=dtype, softmax_vjp=form, **options
        )
        for name, x in zip(("out", "dq", "dk", "dv"), (out, *grads), strict=True):
            errors[name] = max(errors.get(name, 0.0), max_abs_error(x, reference[name]))
    return errors


def to_float64_errors(errors_float32: dict[str, float]) -> dict[str, float]:
    """A plain float64 implementation's errors, estimated from float32 ones measured on
    float32-rounded inputs (``eps64 / eps32`` times:
    :func:`~refattn.testing.float64_baseline_error`'s argument)."""
    scale = machine_epsilon("float64") / machine_epsilon("float32")
    return {name: err * scale for name, err in errors_float32.items()}


def _reference(data: Inputs, r: dict[str, Any]) -> dict[str, np.ndarray]:
    return reference_results(r["q"], r["k"], r["v"], r["cotangent"], data.options, r["sinks"])


def _baseline_errors(
    case: Case, data: Inputs, r: dict[str, Any], dtype: str, reference: dict[str, np.ndarray]
) -> dict[str, float]:
    """The plain implementation's max error per quantity in ``dtype`` (module docstring)."""
    if dtype == "float64":
        r32 = {name: _rounded(x, "float32") for name, x in r.items()}
        return to_float64_errors(
            _baseline_errors(case, data, r32, "float32", _reference(data, r32))
        )
    if case.softcap is None and not case.sinks:  # every masking rule as one explicit mask
        options = {
            "mask": data.keep,
            **{k: data.options[k] for k in ("scale",) if k in data.options},
        }
        return plain_errors(r["q"], r["k"], r["v"], r["cotangent"], options, dtype, reference)
    # no plain form: refattn's float32 kernel's error, scaled to the dtype's unit roundoff
    r32 = {name: _rounded(x, "float32") for name, x in r.items()}
    f32 = {n: None if x is None else np.asarray(x, dtype=np.float32) for n, x in r32.items()}
    primals = (f32["q"], f32["k"], f32["v"])
    if f32["sinks"] is not None:
        primals = (*primals, None, f32["sinks"])
    (out, lse), grads = run_in_dtype(
        scaled_dot_product_attention,
        *primals,
        dtype="float32",
        cotangent=(f32["cotangent"], None),
        return_lse=True,
        **data.options,
    )
    ref32 = _reference(data, r32)
    scale = machine_epsilon(dtype) / machine_epsilon("float32")
    found = {"out": out, "lse": lse}
    found.update(
        {n: g for n, g in zip(("dq", "dk", "dv", None, "dsinks"), grads, strict=False) if n}
    )
    return {name: max_abs_error(x, ref32[name]) * scale for name, x in found.items()}


# ----------------------------------------------------------------------------- calling kernels


def _call(
    kernel: Kernel, case: Case, data: Inputs, r: dict[str, Any], dtype: str
) -> tuple[np.ndarray, np.ndarray | None, tuple[np.ndarray, ...] | None]:
    """``(out, lse or None, grads or None)`` of the kernel, as float64 host arrays in refattn's
    layout."""
    call = {"torch": _call_torch, "jax": _call_jax, "numpy": _call_numpy}[kernel.framework]
    return call(kernel, case, data, r, dtype)


def _swap(x: Any) -> Any:
    """BHSD <-> BSHD (axes 1 and 2), for any array library."""
    return x.transpose(1, 2) if hasattr(x, "requires_grad") else _np_like_swap(x)


def _np_like_swap(x: Any) -> Any:
    import array_api_compat

    xp = array_api_compat.array_namespace(x)
    return xp.permute_dims(x, (0, 2, 1, 3))


def _split_result(result: Any) -> tuple[Any, Any]:
    return (result[0], result[1]) if isinstance(result, tuple) else (result, None)


def _call_torch(
    kernel: Kernel, case: Case, data: Inputs, r: dict[str, Any], dtype: str
) -> tuple[np.ndarray, np.ndarray | None, tuple[np.ndarray, ...] | None]:
    import torch

    tdtype = getattr(torch, dtype)

    def tensor(x: np.ndarray, grad: bool) -> Any:
        t = torch.from_numpy(np.ascontiguousarray(x)).to(device=kernel.device, dtype=tdtype)
        return t.requires_grad_(grad)

    grad = "grad" in kernel.features
    q, k, v = (tensor(r[n], grad) for n in ("q", "k", "v"))
    options = dict(data.options)
    if "mask" in options:
        options["mask"] = torch.from_numpy(options["mask"]).to(kernel.device)
    sinks = None
    if r["sinks"] is not None:
        sinks = options["sinks"] = tensor(r["sinks"], grad)
    args = (q, k, v) if kernel.layout == "BHSD" else tuple(_swap(x) for x in (q, k, v))
    out, lse = _split_result(kernel.fn(*args, **options))
    if kernel.layout == "BSHD":
        out = _swap(out)

    def host(t: Any) -> np.ndarray:
        return t.detach().to(device="cpu", dtype=torch.float64).numpy()

    grads = None
    if grad:
        ct = tensor(r["cotangent"], False)
        leaves = [q, k, v] + ([sinks] if sinks is not None else [])
        grads = tuple(host(g) for g in torch.autograd.grad(out, leaves, ct, allow_unused=False))
    return host(out), None if lse is None else host(lse), grads


def _call_jax(
    kernel: Kernel, case: Case, data: Inputs, r: dict[str, Any], dtype: str
) -> tuple[np.ndarray, np.ndarray | None, tuple[np.ndarray, ...] | None]:
    import jax
    import jax.numpy as jnp

    jdtype = getattr(jnp, dtype)
    arrays = [jnp.asarray(r[n], dtype=jdtype) for n in ("q", "k", "v")]
    if r["sinks"] is not None:
        arrays.append(jnp.asarray(r["sinks"], dtype=jdtype))
    options = {k: v for k, v in data.options.items()}
    if "mask" in options:
        options["mask"] = jnp.asarray(options["mask"])

    def f(*xs: Any) -> Any:
        q, k, v = xs[:3] if kernel.layout == "BHSD" else tuple(_swap(x) for x in xs[:3])
        extra = {"sinks": xs[3]} if len(xs) > 3 else {}
        out, lse = _split_result(kernel.fn(q, k, v, **options, **extra))
        return (out if kernel.layout == "BHSD" else _swap(out)), lse

    def host(x: Any) -> np.ndarray:
        return np.asarray(
            jnp.asarray(x, dtype=jnp.float32 if dtype != "float64" else jnp.float64),
            dtype=np.float64,
        )

    if "grad" not in kernel.features:
        out, lse = f(*arrays)
        return host(out), None if lse is None else host(lse), None
    (out, lse), pullback = jax.vjp(f, *arrays)
    ct = jnp.asarray(r["cotangent"], dtype=jdtype)
    grads = pullback((ct, None if lse is None else jnp.zeros_like(lse)))
    return host(out), None if lse is None else host(lse), tuple(host(g) for g in grads)


def _call_numpy(
    kernel: Kernel, case: Case, data: Inputs, r: dict[str, Any], dtype: str
) -> tuple[np.ndarray, np.ndarray | None, tuple[np.ndarray, ...] | None]:
    if dtype == "bfloat16":
        raise ValueError("refattn.testing.conformance: NumPy has no bfloat16; list other dtypes")
    arrays = [np.asarray(r[n], dtype=dtype) for n in ("q", "k", "v")]
    options = dict(data.options)
    if r["sinks"] is not None:
        options["sinks"] = np.asarray(r["sinks"], dtype=dtype)
    args = arrays if kernel.layout == "BHSD" else [x.transpose(0, 2, 1, 3) for x in arrays]
    out, lse = _split_result(kernel.fn(*args, **options))
    out = np.asarray(out if kernel.layout == "BHSD" else out.transpose(0, 2, 1, 3))
    grads = None
    if "grad" in kernel.features:
        if kernel.vjp is None:
            raise ValueError(
                f"refattn.testing.conformance: {kernel.name} declares 'grad' but gives no vjp"
            )
        ct = np.asarray(r["cotangent"], dtype=dtype)
        ct = ct if kernel.layout == "BHSD" else ct.transpose(0, 2, 1, 3)
        found = kernel.vjp(*args, ct, **options)
        if kernel.layout == "BSHD":
            found = tuple(g.transpose(0, 2, 1, 3) if g.ndim == 4 else g for g in found)
        grads = tuple(np.asarray(g, dtype=np.float64) for g in found)
    lse = None if lse is None else np.asarray(lse, dtype=np.float64)
    return np.asarray(out, dtype=np.float64), lse, grads


# ----------------------------------------------------------------------------- ready kernels


def torch_sdpa_kernel(
    backend: str = "default", *, dtypes: tuple[str, ...] = ("float32",)
) -> Kernel:
    """``torch.nn.functional.scaled_dot_product_attention`` (``backend`` "default" or "math"),
    adapted to the calling convention: masks as ``attn_mask``, "lower_right" through torch's
    ``causal_lower_right`` bias, GQA with ``enable_gqa``."""

    def sdpa(q: Any, k: Any, v: Any, **options: Any) -> Any:
        import contextlib

        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        kwargs: dict[str, Any] = {"enable_gqa": q.shape[1] != k.shape[1]}
        if "scale" in options:
            kwargs["scale"] = options["scale"]
        mask = options.get("mask")
        if options.get("is_causal"):
            if options.get("causal_alignment", "upper_left") == "upper_left" and mask is None:
                kwargs["is_causal"] = True
            else:
                import torch

                n_q, n_k = q.shape[2], k.shape[2]
                offset = n_k - n_q if options.get("causal_alignment") == "lower_right" else 0
                causal = torch.ones(n_q, n_k, dtype=torch.bool).tril(offset)
                mask = causal if mask is None else mask & causal
        context = (
            contextlib.nullcontext() if backend == "default" else sdpa_kernel([SDPBackend.MATH])
        )
        with context:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kwargs)

    sdpa.__name__ = f"torch F.sdpa[{backend}]"
    features = {
        "mask",
        "causal",
        "causal_lower_right",
        "gqa",
        "cross",
        "d_v",
        "scale",
        "extreme_logits",
        "grad",
        "fully_masked_rows",
    }
    return Kernel(sdpa, framework="torch", features=features, dtypes=dtypes)


def jax_kernel(*, dtypes: tuple[str, ...] = ("float32",)) -> Kernel:
    """``jax.nn.dot_product_attention`` (XLA), adapted: its ``(B, S, H, D)`` layout, masks,
    upper-left causal, ``local_window_size``. Its fully masked rows are the average of all
    values (not refattn's 0), so "fully_masked_rows" is not declared."""

    def attention(q: Any, k: Any, v: Any, **options: Any) -> Any:
        import jax

        mask = options.get("mask")
        kwargs: dict[str, Any] = {"is_causal": bool(options.get("is_causal"))}
        if "scale" in options:
            kwargs["scale"] = options["scale"]
        if "window" in options:
            kwargs["local_window_size"] = options["window"]
        if mask is not None:
            kwargs["mask"] = mask
        return jax.nn.dot_product_attention(q, k, v, implementation="xla", **kwargs)

    attention.__name__ = "jax.nn.dot_product_attention"
    features = {"mask", "causal", "gqa", "cross", "scale", "window", "extreme_logits", "grad"}
    return Kernel(attention, framework="jax", features=features, dtypes=dtypes, layout="BSHD")
