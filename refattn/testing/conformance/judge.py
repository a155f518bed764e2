"""Judging a kernel: refattn's float64 answer for the same rounded inputs, the plain
implementation's errors, the FlashAttention rule on every quantity, and the report."""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np  # the harness works on host copies; refattn's reference runs on NumPy

from ...ops.sdpa import scaled_dot_product_attention
from ..baselines import (
    SOFTMAX_VJP_FORMS,
    lowp_attention_baseline,
    lowp_attention_vjp_baseline,
    run_in_dtype,
)
from ..dtypes import machine_epsilon, round_to_dtype
from ..tolerance import attention_tolerance, max_abs_error
from .catalogue import CASES, Case, Inputs, inputs
from .kernels import Kernel, call

FACTOR = 2.0
FLOOR_ULPS = 2.0
#: errors past the allowed one but within this multiple of it are "warn" (an accuracy gap, as in
#: ``refattn compare``: semantic mismatches are orders of magnitude larger); ``strict`` fails them
WARN_FACTOR = 4.0
GRADIENTS = ("dq", "dk", "dv", "dsinks")


# ----------------------------------------------------------------------------- results


@dataclass
class Result:
    """One (kernel, case, dtype) row: ``status`` "pass", "warn", "FAIL", "skipped" (or "n/a"
    in ``refattn compare``), the output's error and allowed error, the worst other quantity's
    (by error/allowed) and a note."""

    case: str
    dtype: str
    status: str = "pass"
    out_error: float = math.nan
    out_allowed: float = math.nan
    worst: str = ""
    worst_error: float = math.nan
    worst_allowed: float = math.nan
    note: str = ""
    kernel: str = ""

    def add_note(self, note: str) -> None:
        self.note = f"{self.note}; {note}" if self.note else note


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


# ----------------------------------------------------------------------------- running


def cases(kernel: Kernel) -> list[Any]:
    """``(case, dtype)`` pairs for ``pytest.mark.parametrize``: every case the kernel can run
    (the others are left out; :func:`run` reports them as skipped), ids ``case-dtype``."""
    pairs = [(c, d) for c in CASES if not kernel.lacks(c) for d in kernel.dtypes]
    try:
        import pytest
    except ImportError:  # plain tuples without pytest
        return pairs
    return [pytest.param(c, d, id=f"{c.name}-{d}") for c, d in pairs]


def run(kernel: Kernel, *, dtypes: Iterable[str] | None = None, strict: bool = False) -> Report:
    """Every case and dtype (``kernel.dtypes`` by default): a :class:`Report` (``strict``:
    "warn" rows are failures)."""
    report = Report(kernel.name)
    for case in CASES:
        for dtype in dtypes or kernel.dtypes:
            lacks = kernel.lacks(case)
            if lacks:
                note = f"lacks {', '.join(lacks)}"
                report.results.append(Result(case.name, dtype, "skipped", note=note))
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
    """Run ``kernel`` on ``case`` in ``dtype`` and judge every quantity by the rule.

    Rows that see no key are checked (output 0, LSE -inf, zero gradients) when the kernel
    declares "fully_masked_rows"; otherwise they get a zero cotangent and are left out of the
    output and LSE (the note says so). ``kernel.computes_in`` rows are judged by that dtype's
    rule: its plain errors, its epsilon.
    """
    exclude = "fully_masked_rows" not in kernel.features and bool(inputs_of(case).dead.any())
    data, rounded, reference, baseline = expected(case, dtype, exclude)
    judged = kernel.computes_in.get(dtype, dtype)
    result = Result(case.name, dtype, kernel=kernel.name)
    if judged != dtype:
        baseline = expected(case, judged, exclude)[3]
        result.add_note(f"judged as {judged}: it computes in {judged} for {dtype} inputs")
    out, lse, grads = call(kernel, rounded, data.options, dtype)
    candidates = {"out": out}
    references = {"out": reference["out"]}
    if lse is not None:
        candidates["lse"], references["lse"] = lse, reference["lse"]
    live = ~data.dead
    if exclude:
        candidates = {name: x[live] for name, x in candidates.items()}
        references = {name: x[live] for name, x in references.items()}
        result.add_note("rows that see no key left out (not declared)")
    elif "lse" in candidates:  # rows that see no key must be -inf, and only those
        dead = np.isneginf(reference["lse"])
        if not np.array_equal(np.isneginf(lse), dead):
            result.status = "FAIL"
            result.add_note("lse: -inf exactly on the rows that see no key expected")
        candidates["lse"] = np.where(dead, 0.0, lse)
        references["lse"] = np.where(dead, 0.0, reference["lse"])
    for name, grad in zip(GRADIENTS, grads or (), strict=False):
        candidates[name], references[name] = grad, reference[name]
    candidates = {name: _as_dtype(x, judged) for name, x in candidates.items()}
    return judge(result, candidates, references, baseline, strict=strict)


def judge(
    result: Result,
    candidates: dict[str, Any],
    references: dict[str, Any],
    baselines: dict[str, Any],
    *,
    strict: bool = False,
    scales: dict[str, float] | None = None,
) -> Result:
    """Fill ``result`` from the FlashAttention rule on every quantity: ``out`` and the worst
    other by error/allowed, "warn" within :data:`WARN_FACTOR` of the allowed error (a failure
    with ``strict``), "FAIL" past it. ``candidates`` are in their own dtype (the rule takes its
    epsilon); ``scales`` gives a floor magnitude per quantity
    (:func:`~refattn.testing.attention_tolerance`'s ``floor_scale``). Shared with
    ``refattn compare``'s layer rows."""
    worst_ratio = -1.0
    scales = scales or {}
    for name, cand in candidates.items():
        tol = attention_tolerance(
            cand,
            references[name],
            baselines[name],
            factor=FACTOR,
            floor_ulps=FLOOR_ULPS,
            floor_scale=scales.get(name),
        )
        if not np.isfinite(tol.error):  # NaN from the candidate: never a pass
            tol_passed, ratio = False, math.inf
        else:
            tol_passed, ratio = tol.passed, tol.ratio
        if name == "out":
            result.out_error, result.out_allowed = tol.error, tol.allowed
        elif ratio > worst_ratio:
            worst_ratio = ratio
            result.worst, result.worst_error, result.worst_allowed = name, tol.error, tol.allowed
        if not tol_passed:
            warn = not strict and tol.error <= WARN_FACTOR * tol.allowed
            if result.status != "FAIL":
                result.status = "warn" if warn else "FAIL"
            result.add_note(
                f"{name} error {tol.error:.3g} = {ratio:.3g}x allowed"
                + (f" (within {WARN_FACTOR:g}x: accuracy, not semantics)" if warn else "")
            )
    return result


# ----------------------------------------------------------------------------- the reference


@functools.cache
def inputs_of(case: Case) -> Inputs:
    """:func:`~refattn.testing.conformance.catalogue.inputs`, computed once per case."""
    return inputs(case)


@functools.lru_cache(maxsize=256)
def expected(
    case: Case, dtype: str, exclude_dead_rows: bool = False
) -> tuple[Inputs, dict[str, Any], dict[str, np.ndarray], dict[str, float]]:
    """``(inputs, rounded arrays, reference, plain errors)`` of ``case`` in ``dtype``: the
    inputs rounded to ``dtype`` (held in float64), refattn's float64 answer for them, and the
    plain implementation's max error per quantity (:mod:`refattn.testing.conformance`).
    ``exclude_dead_rows`` zeroes the cotangent of the rows that see no key."""
    data = inputs_of(case)
    rounded = {name: _rounded(x, dtype) for name, x in data.arrays.items()}
    if exclude_dead_rows:
        rounded["cotangent"] = rounded["cotangent"] * ~data.dead[..., None]
    reference = _reference(data, rounded)
    return data, rounded, reference, _baseline_errors(case, data, rounded, dtype, reference)


def reference_results(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    cotangent: np.ndarray,
    options: dict[str, Any],
    sinks: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """refattn's float64 answer: ``out``, ``lse`` and the gradients ``dq``, ``dk``, ``dv``
    (``dsinks`` with sinks) for the output's ``cotangent``."""
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
    baseline takes (mask, bias, causal, scale)."""
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


def _options(data: Inputs, r: dict[str, Any]) -> dict[str, Any]:
    """refattn's options for the rounded arrays: the case's, with the rounded bias."""
    return data.options if r["bias"] is None else {**data.options, "bias": r["bias"]}


def _reference(data: Inputs, r: dict[str, Any]) -> dict[str, np.ndarray]:
    return reference_results(r["q"], r["k"], r["v"], r["cotangent"], _options(data, r), r["sinks"])


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
        options: dict[str, Any] = {"mask": data.keep}
        options.update({k: data.options[k] for k in ("scale",) if k in data.options})
        if r["bias"] is not None:
            options["bias"] = r["bias"]
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
        **_options(data, f32),
    )
    ref32 = _reference(data, r32)
    scale = machine_epsilon(dtype) / machine_epsilon("float32")
    found = {"out": out, "lse": lse}
    found.update(
        {n: g for n, g in zip(("dq", "dk", "dv", None, "dsinks"), grads, strict=False) if n}
    )
    return {name: max_abs_error(x, ref32[name]) * scale for name, x in found.items()}
