"""``refattn.testing.conformance``: the suite passes correct kernels and fails wrong ones.

Correct kernels: torch's SDPA (math and default backends), JAX's ``dot_product_attention``, and
a NumPy kernel (refattn's own SDPA in float32, every feature). Wrong kernels, each a plausible
bug: the scale off by 0.1 %, a backward whose softmax row sum Δ is off by 1 %, the causal
diagonal on the wrong alignment; the suite must fail each in float32.
"""

from __future__ import annotations

import warnings

import pytest

import refattn
from refattn.testing import conformance

ALL = conformance.FEATURES


def _refattn_kernel() -> conformance.Kernel:
    """refattn's SDPA on NumPy arrays in the call's dtype, gradients by refattn.vjp."""
    sdpa = refattn.scaled_dot_product_attention

    def call(q, k, v, sinks=None, **options):
        primals = (q, k, v) if sinks is None else (q, k, v, None, sinks)
        return primals, options

    def fn(q, k, v, **options):
        primals, options = call(q, k, v, **options)
        return sdpa(*primals, return_lse=True, **options)

    def vjp(q, k, v, d_out, **options):
        primals, options = call(q, k, v, **options)
        _, pullback = refattn.vjp(sdpa, *primals, return_lse=True, **options)
        grads = pullback((d_out, None))
        return grads[:3] if len(grads) == 3 else (*grads[:3], grads[4])

    return conformance.Kernel(
        fn, framework="numpy", features=ALL, dtypes=("float64", "float32"), vjp=vjp, name="refattn"
    )


def test_refattn_passes_every_case():
    report = conformance.run(_refattn_kernel())
    assert not report.failures, report.table()
    assert all(r.status == "pass" for r in report.results)  # every feature declared: no skips
    assert len(report.results) == 2 * len(conformance.CASES)


@pytest.mark.parametrize("backend", ["math", "default"])
def test_torch_sdpa_conforms_in_float32_and_bfloat16(backend):
    pytest.importorskip("torch")
    kernel = conformance.torch_sdpa_kernel(backend, dtypes=("float32", "bfloat16"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = conformance.run(kernel)
    assert not report.failures, report.table()
    for r in report.results:  # an accuracy gap at most (docs/reference.md has the table)
        assert r.status in ("pass", "warn", "skipped"), r
    skipped = {r.case for r in report.results if r.status == "skipped"}
    assert skipped == {c.name for c in conformance.CASES if c.needs - kernel.features}
    assert "window_3_3" in skipped and "basic" not in skipped


def test_jax_conforms_in_float32():
    pytest.importorskip("jax")
    report = conformance.run(conformance.jax_kernel(dtypes=("float32",)))
    assert not report.failures, report.table()
    assert any(r.case == "window_3_3" and r.status == "pass" for r in report.results)


def _torch_wrong(kind: str) -> conformance.Kernel:
    torch = pytest.importorskip("torch")
    right = conformance.torch_sdpa_kernel("math").fn

    class WrongDelta(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
            p = torch.softmax(s, -1)
            ctx.save_for_backward(q, k, v, p)
            return p @ v

        @staticmethod
        def backward(ctx, d_out):
            q, k, v, p = ctx.saved_tensors
            d_p = d_out @ v.transpose(-1, -2)
            delta = (d_p * p).sum(-1, keepdim=True) * 1.01  # the bug
            d_s = p * (d_p - delta) / q.shape[-1] ** 0.5
            return d_s @ k, d_s.transpose(-1, -2) @ q, p.transpose(-1, -2) @ d_out

    def fn(q, k, v, **options):
        if kind == "scale":
            scale = options.pop("scale", q.shape[-1] ** -0.5)
            return right(q, k, v, scale=scale * 1.001, **options)
        if kind == "alignment":
            options["causal_alignment"] = "upper_left"
            return right(q, k, v, **options)
        return WrongDelta.apply(q, k, v)

    features = {"grad", "cross", "causal", "causal_lower_right", "scale"}
    return conformance.Kernel(fn, framework="torch", features=features, name=f"wrong {kind}")


@pytest.mark.parametrize("kind", ["scale", "delta", "alignment"])
def test_a_wrong_kernel_fails_in_float32(kind):
    report = conformance.run(_torch_wrong(kind), dtypes=("float32",))
    failed = {r.case for r in report.failures}
    if kind == "alignment":
        assert failed == {"causal_lower_right_nq12_nk20"}, report.table()
    else:
        assert "basic" in failed, report.table()
    if kind == "delta":  # the forward is right: only gradients fail
        row = next(r for r in report.results if r.case == "basic")
        assert row.out_error <= row.out_allowed and row.worst in ("dq", "dk")


def test_check_raises_with_the_row_and_cases_are_parametrize_ready():
    kernel = _torch_wrong("scale")
    pairs = conformance.cases(kernel)
    assert [p.id for p in pairs][:2] == ["basic-float32", "cross_nq12_nk20-float32"]
    assert all(not kernel.lacks(p.values[0]) for p in pairs)
    case = conformance.CASES[0]
    with pytest.raises(AssertionError, match=r"wrong scale on basic \(float32\): FAIL"):
        conformance.check(kernel, case, "float32")


def test_bad_declarations_are_refused():
    with pytest.raises(ValueError, match=r"unknown features \['flash'\]"):
        conformance.Kernel(lambda q, k, v: q, features={"flash"})
    with pytest.raises(ValueError, match="framework must be"):
        conformance.Kernel(lambda q, k, v: q, framework="mlx")
    with pytest.raises(ValueError, match="dtypes must be among"):
        conformance.Kernel(lambda q, k, v: q, dtypes=("float8",))
    with pytest.raises(ValueError, match="layout must be"):
        conformance.Kernel(lambda q, k, v: q, layout="SBHD")
    with pytest.raises(ValueError, match="gives its gradients as vjp="):
        conformance.Kernel(lambda q, k, v: q, framework="numpy", features={"grad"})
    with pytest.raises(ValueError, match="dtypes must be among"):
        conformance.Kernel(lambda q, k, v: q, computes_in={"float64": "tf32"})
    with pytest.raises(ValueError, match="backend must be one of"):
        conformance.torch_sdpa_kernel("fused")


def _torch_variant(kind: str, features: set[str], **declared) -> conformance.Kernel:
    """torch's math SDPA with one deliberate behaviour (``kind``)."""
    torch = pytest.importorskip("torch")
    right = conformance.torch_sdpa_kernel("math").fn

    def fn(q, k, v, mask=None, bias=None, **options):
        if kind == "average_dead_rows":  # JAX's choice: the dead rows average every value
            out = right(q, k, v, mask=mask, **options)
            dead = ~mask.any(-1, keepdim=True)
            return torch.where(dead, v.mean(-2, keepdim=True).expand_as(out), out)
        if kind == "float32_inside":  # computes float64 inputs in float32
            return right(q.float(), k.float(), v.float(), mask=mask, **options).double()
        if kind == "ignores_bias":
            return right(q, k, v, mask=mask, **options)
        if kind == "nan_row":
            out = right(q, k, v, mask=mask, **options)
            return torch.where(torch.arange(q.shape[2]) == 3, torch.nan, 0.0)[:, None] + out
        raise AssertionError(kind)

    return conformance.Kernel(
        fn, framework="torch", features=features | {"grad"}, name=kind, **declared
    )


def test_undeclared_dead_rows_are_left_out_and_declared_ones_are_checked():
    case = conformance.case("fully_masked_rows")
    lax = _torch_variant("average_dead_rows", {"mask"})
    row = conformance.evaluate(lax, case, "float32")
    assert row.status == "pass" and "rows that see no key left out" in row.note
    strict = _torch_variant("average_dead_rows", {"mask", "fully_masked_rows"})
    assert conformance.evaluate(strict, case, "float32").status == "FAIL"
    # the live rows are still judged: a wrong live row fails with or without the declaration
    nan = _torch_variant("nan_row", {"mask"})
    assert conformance.evaluate(nan, case, "float32").status == "FAIL"


def test_computes_in_judges_by_the_declared_precision():
    case = conformance.case("basic")
    plain = _torch_variant("float32_inside", set(), dtypes=("float64",))
    assert conformance.evaluate(plain, case, "float64").status == "FAIL"
    declared = _torch_variant(
        "float32_inside", set(), dtypes=("float64",), computes_in={"float64": "float32"}
    )
    row = conformance.evaluate(declared, case, "float64")
    assert row.status == "pass" and "judged as float32" in row.note


def test_a_kernel_that_drops_the_bias_fails_the_bias_case():
    kernel = _torch_variant("ignores_bias", {"bias"})
    assert conformance.evaluate(kernel, conformance.case("bias"), "float32").status == "FAIL"
    right = conformance.torch_sdpa_kernel("math")
    assert conformance.evaluate(right, conformance.case("bias"), "float32").status == "pass"


def test_a_kernel_behind_dlpack_is_a_numpy_kernel():
    """A foreign kernel (here torch's math SDPA, reached only through DLPack, as a C kernel
    would be) declared as a NumPy kernel with its own vjp: the suite runs it and passes it."""
    torch = pytest.importorskip("torch")
    import numpy as np

    def foreign(*arrays):
        return [torch.from_dlpack(np.ascontiguousarray(x)) for x in arrays]

    def fn(q, k, v, is_causal=False, causal_alignment="upper_left"):
        tq, tk, tv = foreign(q, k, v)
        out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=is_causal)
        return np.from_dlpack(out.contiguous())

    def vjp(q, k, v, d_out, is_causal=False, causal_alignment="upper_left"):
        tq, tk, tv, td = foreign(q, k, v, d_out)
        leaves = [t.requires_grad_() for t in (tq, tk, tv)]
        out = torch.nn.functional.scaled_dot_product_attention(*leaves, is_causal=is_causal)
        return tuple(np.from_dlpack(g) for g in torch.autograd.grad(out, leaves, td))

    kernel = conformance.Kernel(
        fn, framework="numpy", features={"causal", "grad"}, dtypes=("float64", "float32"), vjp=vjp
    )
    report = conformance.run(kernel)
    assert not report.failures, report.table()
    ran = {r.case for r in report.results if r.status == "pass"}
    assert ran == {"basic", "causal"}  # the others need features it does not declare
