"""Framework-neutral SDPA rows and semantic probes, run over any adapter (see
:mod:`refattn.compare`): every case and dtype, fully masked rows classified, unsupported cases
reported as ``n/a``; probes of fully-masked-row output, causal alignment, mask meaning and the
precision a float64 path computes in."""

from __future__ import annotations

from typing import Any

import numpy as np  # the comparison harness works on host copies; refattn ops run on NumPy

from ..ops import scaled_dot_product_attention
from ..testing import (
    machine_epsilon,
)
from .cases import ATTENTION_CASES, DTYPES, AttentionCase, Inputs
from .references import (
    MASKED_ROWS_DETAIL,
    ROW_BEHAVIOURS,
    Reference,
    References,
    behaviour_status,
    classify_lse,
    classify_masked_rows,
    evaluate,
    join_notes,
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


def _reference_quantities(
    ref: Reference, live: np.ndarray, with_lse: bool
) -> tuple[dict[str, Any], dict[str, float]]:
    """The reference (``out`` and ``lse`` on live rows only) and baseline error per quantity."""
    references = {"out": ref.out[live], "dq": ref.grads[0], "dk": ref.grads[1], "dv": ref.grads[2]}
    if with_lse:
        references["lse"] = ref.lse[live]
    return references, {name: ref.base_errors[name] for name in references}


def attention_rows(
    report: CompareReport,
    impls: list[Any],
    cases: list[AttentionCase],
    dtypes: tuple[str, ...],
    refs: References,
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
    refs: References,
    precision: dict[str, str],
) -> Row:
    row = Row(case.name, impl.name, dtype)
    try:
        ref = refs.get(case, dtype)
        behaviour = "zero"
        if inputs.dead_rows.any():
            out, _, _ = impl.run(case, inputs, ref, dtype)
            rows = out[inputs.dead_rows]
            behaviour = classify_masked_rows(rows, uniform_rows(inputs, ref.v), dtype)
            if behaviour != "zero":
                ref = refs.get(case, dtype, zero_dead_rows=True)
        out, grads, lse = impl.run(case, inputs, ref, dtype)
    except Exception as exc:
        if not is_unsupported(exc):
            raise
        row.status, row.note = "n/a", unsupported_note(exc)
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
        row.note = join_notes(
            row.note, f"fully masked rows: {behaviour} (known difference; excluded)"
        )
        if behaviour == "nan" and not all(np.isfinite(g).all() for g in grads):
            row.note += ", NaN gradients follow from them"
            for name in ("dq", "dk", "dv"):
                candidates.pop(name)
        elif behaviour not in ROW_BEHAVIOURS:
            row.status = "FAIL"
            row.note = f"fully masked rows: unrecognized output ({behaviour})"
    evaluate(row, candidates, references, baselines)
    if behaviour == "zero" and inputs.dead_rows.any():
        row.note = join_notes(row.note, "fully masked rows: 0, as refattn")
    return row


def unsupported_note(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"unsupported: {text[0][:90]}" if text else f"unsupported: {type(exc).__name__}"


def probe_case(name: str) -> AttentionCase:
    """The grid case a probe runs on (probes reuse grid shapes: JAX compiles once for both)."""
    return next(c for c in ATTENTION_CASES if c.name == name)


def attention_probes(report: CompareReport, impls: list[Any], refs: References) -> dict[str, str]:
    """Probe every implementation's semantics; return the float64 precision of those that
    compute in less (implementation name -> "float32")."""
    precision: dict[str, str] = {}
    dead_case = probe_case("fully_masked_rows")
    dead_inputs = refs.inputs(dead_case)
    for impl in impls:
        dtype = probe_dtype(impl, dead_case, dead_inputs, refs)
        if dtype is None:
            continue
        ref = refs.get(dead_case, dtype)
        out, _, lse = impl.run(dead_case, dead_inputs, ref, dtype, want_grads=False)
        observed = classify_masked_rows(
            out[dead_inputs.dead_rows], uniform_rows(dead_inputs, ref.v), dtype
        )
        report.probes.append(
            Probe(
                impl.name,
                "fully masked rows (bool mask)",
                "zero",
                observed,
                behaviour_status(observed, "zero", ROW_BEHAVIOURS),
                f"{dtype}: {MASKED_ROWS_DETAIL.get(observed, 'unrecognized output')}",
            )
        )
        if lse is not None:
            observed = classify_lse(lse[dead_inputs.dead_rows])
            report.probes.append(
                Probe(
                    impl.name,
                    "logsumexp of fully masked rows",
                    "-inf",
                    observed,
                    behaviour_status(observed, "-inf", ("-inf", "large finite negative", "nan")),
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


def _precision_probe(impl: Any, refs: References) -> Probe:
    """Does the float64 path compute in float64? (JAX's softmax always runs in float32.)"""
    case = probe_case("basic")
    inputs = refs.inputs(case)
    ref = refs.get(case, "float64")
    behaviour = "precision of float64 inputs"
    try:
        out = impl.run(case, inputs, ref, "float64", want_grads=False)[0]
    except Exception as exc:
        if not is_unsupported(exc):
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
        behaviour_status(observed, "float64", ("float64", "float32")),
        detail,
    )


def probe_dtype(impl: Any, case: AttentionCase, inputs: Inputs, refs: References) -> str | None:
    """The first of float64, float32, float16, bfloat16 that ``impl`` runs ``case`` in."""
    for dtype in DTYPES:
        try:
            impl.run(case, inputs, refs.get(case, dtype), dtype, want_grads=False)
        except Exception as exc:
            if not is_unsupported(exc):
                raise
            continue
        return dtype
    return None


def _alignment_probe(impl: Any, refs: References, dtype: str) -> Probe:
    """Which causal alignment the framework's is_causal uses when n_q < n_k."""
    case = probe_case("causal_upper_left_nq12_nk20")
    inputs = refs.inputs(case)
    ref = refs.get(case, dtype)
    if getattr(impl, "is_flax", False):
        return Probe(
            impl.name, "is_causal alignment (n_q < n_k)", "upper_left", "n/a", "n/a", "no is_causal"
        )
    try:
        out = impl.run(case, inputs, ref, dtype, want_grads=False)[0]
    except Exception as exc:
        if not is_unsupported(exc):
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
        behaviour_status(observed, "upper_left", ("upper_left", "lower_right")),
        f"refattn's default; refattn takes causal_alignment='lower_right' for the other "
        f"(errors: {', '.join(f'{a} {e:.1e}' for a, e in errors.items())})",
    )


def _mask_meaning_probe(impl: Any, refs: References, dtype: str) -> Probe:
    """Whether a boolean mask's True means attend or ignore."""
    case = probe_case("bool_mask")
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
        behaviour_status(observed, "True = attend", ("True = attend", "True = ignore")),
        "" if observed == "True = attend" else "convert with refattn.from_torch_mha_masks",
    )
