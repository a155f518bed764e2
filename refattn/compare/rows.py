"""Framework-neutral SDPA rows and semantic probes over conformance kernels (see
:mod:`refattn.compare`): the probes classify what a kernel does on fully masked rows, how its
``is_causal`` aligns, what its boolean mask means and the precision its float64 path computes
in; the kernel's declaration is set from what they observed, and every row is
:func:`refattn.testing.conformance.evaluate` on a catalogue case."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np  # the comparison harness works on host copies; refattn ops run on NumPy

from ..ops import scaled_dot_product_attention
from ..testing import conformance, machine_epsilon
from ..testing.conformance import Case, Kernel
from .cases import DTYPES
from .references import (
    MASKED_ROWS_DETAIL,
    ROW_BEHAVIOURS,
    behaviour_status,
    classify_lse,
    classify_masked_rows,
    uniform_rows,
)
from .report import CompareReport, Probe, Row

UNSUPPORTED = (
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


def is_unsupported(exc: BaseException) -> bool:
    """Whether ``exc`` is a framework saying it cannot run this case (not a bug)."""
    kinds = (RuntimeError, NotImplementedError, ValueError, TypeError)
    return isinstance(exc, kinds) and any(s in str(exc) for s in UNSUPPORTED)


def unsupported_note(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"unsupported: {text[0][:90]}" if text else f"unsupported: {type(exc).__name__}"


# ----------------------------------------------------------------------------- rows


def attention_rows(
    report: CompareReport,
    kernels: list[Kernel],
    cases: list[Case],
    dtypes: tuple[str, ...],
    behaviours: dict[str, str],
) -> None:
    """Every kernel on every case and dtype, appended as rows: the cases a kernel lacks a
    feature for, and those its framework refuses, are "n/a". ``behaviours`` maps a kernel to
    what its fully masked rows were probed to give (the row's note says it)."""
    for kernel in kernels:
        for case in cases:
            lacks = kernel.lacks(case)
            if lacks:
                note = f"lacks {', '.join(lacks)}"
                report.rows.append(Row(case.name, "-", "n/a", note=note, kernel=kernel.name))
                continue
            dead = conformance.inputs(case).dead.any()
            for dtype in dtypes:
                try:
                    row = conformance.evaluate(kernel, case, dtype)
                except Exception as exc:
                    if not is_unsupported(exc):
                        raise
                    row = Row(case.name, dtype, "n/a", note=unsupported_note(exc))
                    row.kernel = kernel.name
                if dead and row.status != "n/a":
                    behaviour = behaviours.get(kernel.name, "zero")
                    row.add_note(
                        "fully masked rows: 0, as refattn"
                        if behaviour == "zero"
                        else f"fully masked rows: {behaviour} (known difference; left out)"
                    )
                report.rows.append(row)


# ----------------------------------------------------------------------------- probes


def _outputs(
    kernel: Kernel, name: str, dtype: str, **options: Any
) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any], Any]:
    """The kernel's output and LSE on catalogue case ``name`` in ``dtype`` (``options``
    replace the case's), its rounded inputs and the case's inputs."""
    data, rounded, _, _ = conformance.expected(conformance.case(name), dtype)
    out, lse, _ = conformance.call(kernel, rounded, {**data.options, **options}, dtype, grads=False)
    return out, lse, rounded, data


def probe_dtype(kernel: Kernel, name: str = "basic") -> str | None:
    """The first of float64, float32, float16, bfloat16 that ``kernel`` runs case ``name`` in."""
    for dtype in DTYPES:
        if dtype not in kernel.dtypes:
            continue
        try:
            _outputs(kernel, name, dtype)
        except Exception as exc:
            if not is_unsupported(exc):
                raise
            continue
        return dtype
    return None


def attention_probes(
    report: CompareReport, kernels: list[Kernel]
) -> tuple[list[Kernel], dict[str, str]]:
    """Probe every kernel's semantics; return the kernels declared from what was observed
    ("fully_masked_rows" when those rows are refattn's, ``computes_in`` float32 when the float64
    path computes in float32) and each kernel's fully-masked-row behaviour."""
    declared, behaviours = [], {}
    for kernel in kernels:
        dtype = probe_dtype(kernel, "fully_masked_rows")
        if dtype is None:
            declared.append(kernel)
            continue
        out, lse, rounded, data = _outputs(kernel, "fully_masked_rows", dtype)
        observed = classify_masked_rows(
            out[data.dead], uniform_rows(rounded["v"], data.dead), dtype
        )
        behaviours[kernel.name] = observed
        report.probes.append(
            Probe(
                kernel.name,
                "fully masked rows (bool mask)",
                "zero",
                observed,
                behaviour_status(observed, "zero", ROW_BEHAVIOURS),
                f"{dtype}: {MASKED_ROWS_DETAIL.get(observed, 'unrecognized output')}",
            )
        )
        zero_lse = True
        if lse is not None:
            seen = classify_lse(lse[data.dead])
            zero_lse = seen == "-inf"
            report.probes.append(
                Probe(
                    kernel.name,
                    "logsumexp of fully masked rows",
                    "-inf",
                    seen,
                    behaviour_status(seen, "-inf", ("-inf", "large finite negative", "nan")),
                    "the masked scores are a large finite negative number, not -inf"
                    if seen == "large finite negative"
                    else "",
                )
            )
        report.probes.append(_alignment_probe(kernel, dtype))
        report.probes.append(_mask_meaning_probe(kernel, dtype))
        precision = _precision_probe(kernel)
        report.probes.append(precision)
        features = set(kernel.features) - {"fully_masked_rows"}
        if observed == "zero" and zero_lse:
            features.add("fully_masked_rows")
        computes_in = {"float64": "float32"} if precision.observed == "float32" else {}
        declared.append(dataclasses.replace(kernel, features=features, computes_in=computes_in))
    return declared, behaviours


def _probe_tolerance(dtype: str, scale: float) -> float:
    """Probes tell apart behaviours that differ by O(1): a loose, dtype-aware tolerance."""
    return max(64 * machine_epsilon(dtype), 1e-4) * max(1.0, scale)


def _precision_probe(kernel: Kernel) -> Probe:
    """Does the float64 path compute in float64? (JAX's softmax always runs in float32.)"""
    behaviour = "precision of float64 inputs"
    try:
        out = _outputs(kernel, "basic", "float64")[0]
    except Exception as exc:
        if not is_unsupported(exc):
            raise
        return Probe(kernel.name, behaviour, "float64", "n/a", "n/a", "no float64 path")
    ref = conformance.expected(conformance.case("basic"), "float64")[2]["out"]
    rel = float(np.abs(out - ref).max()) / float(np.abs(ref).max())
    observed = "float64" if rel < 1e-12 else ("float32" if rel < 1e-5 else "other")
    detail = f"max error {rel:.1e} relative to max|out|"
    if observed == "float32":
        detail += "; its float64 rows are judged by the float32 rule"
    return Probe(
        kernel.name,
        behaviour,
        "float64",
        observed,
        behaviour_status(observed, "float64", ("float64", "float32")),
        detail,
    )


def _alignment_probe(kernel: Kernel, dtype: str) -> Probe:
    """Which causal alignment the framework's is_causal uses when n_q < n_k."""
    behaviour = "is_causal alignment (n_q < n_k)"
    if not getattr(kernel.fn, "native_is_causal", True):
        return Probe(kernel.name, behaviour, "upper_left", "n/a", "n/a", "no is_causal")
    try:
        out, _, r, _ = _outputs(kernel, "causal_nq12_nk20", dtype)
    except Exception as exc:
        if not is_unsupported(exc):
            raise
        return Probe(kernel.name, behaviour, "upper_left", "n/a", "n/a")
    errors = {}
    for alignment in ("upper_left", "lower_right"):
        expected = scaled_dot_product_attention(
            r["q"], r["k"], r["v"], is_causal=True, causal_alignment=alignment
        )
        errors[alignment] = float(np.abs(out - expected).max())
    tol = _probe_tolerance(dtype, float(np.abs(r["v"]).max()))
    observed = "other"
    for alignment, err in errors.items():
        if err <= tol and min(e for a, e in errors.items() if a != alignment) > tol:
            observed = alignment
    return Probe(
        kernel.name,
        behaviour,
        "upper_left",
        observed,
        behaviour_status(observed, "upper_left", ("upper_left", "lower_right")),
        f"refattn's default; refattn takes causal_alignment='lower_right' for the other "
        f"(errors: {', '.join(f'{a} {e:.1e}' for a, e in errors.items())})",
    )


def _mask_meaning_probe(kernel: Kernel, dtype: str) -> Probe:
    """Whether a boolean mask's True means attend or ignore."""
    data, r, reference, _ = conformance.expected(conformance.case("mask"), dtype)
    mask = data.options["mask"]
    out = _outputs(kernel, "mask", dtype)[0]
    tol = _probe_tolerance(dtype, float(np.abs(r["v"]).max()))
    err_attend = np.abs(out - reference["out"]).max()
    inverse = ~mask
    n_q = mask.shape[-2]
    inverse[..., np.arange(n_q), np.arange(n_q)] = True  # no empty rows
    expected_ignore = scaled_dot_product_attention(r["q"], r["k"], r["v"], mask=inverse)
    out_ignore = _outputs(kernel, "mask", dtype, mask=~inverse)[0]
    err_ignore = np.abs(out_ignore - expected_ignore).max()
    observed = "other"
    if err_attend <= tol:
        observed = "True = attend"
    elif err_ignore <= tol:
        observed = "True = ignore"
    return Probe(
        kernel.name,
        "boolean mask meaning",
        "True = attend",
        observed,
        behaviour_status(observed, "True = attend", ("True = attend", "True = ignore")),
        "" if observed == "True = attend" else "convert with refattn.from_torch_mha_masks",
    )
