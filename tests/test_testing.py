"""refattn.testing: assert_close's strictness, the FlashAttention rule, and the baselines."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import randn, to_numpy

import refattn
from refattn import testing
from refattn.testing import (
    assert_attention_close,
    assert_close,
    attention_tolerance,
    lowp_attention_baseline,
    lowp_attention_vjp_baseline,
    round_to_dtype,
    run_in_dtype,
)

sdpa = refattn.scaled_dot_product_attention


def _problem(seed=0, *, shape=(2, 4, 12, 8), kv_heads=2, n_k=15):
    rng = np.random.default_rng(seed)
    b, _, n, d = shape
    q = rng.standard_normal(shape)
    k = rng.standard_normal((b, kv_heads, n_k, d))
    v = rng.standard_normal((b, kv_heads, n_k, d))
    ct = rng.standard_normal(shape)
    mask = rng.random((b, 1, n, n_k)) > 0.3
    mask[:, :, 3] = False  # a fully masked row
    options = {"mask": mask, "is_causal": True, "causal_alignment": "lower_right"}
    return q, k, v, ct, options


def _rounded(x, dtype):
    return np.asarray(round_to_dtype(x, dtype)).astype(np.float64)


# ----------------------------------------------------------------------------- assert_close


def test_assert_close_accepts_equal_and_close_arrays(xp):
    x = randn(xp, (3, 4), seed=1)
    assert_close(x, x, rtol=0, atol=0)
    assert_close(x * (1.0 + 1e-9), x, rtol=1e-8, atol=0)


def test_assert_close_rejects_dtype_shape_and_backend_mismatches(xp):
    x = randn(xp, (3, 4), seed=1)
    with pytest.raises(AssertionError, match="dtypes differ"):
        assert_close(xp.astype(x, xp.float32), x, rtol=1, atol=1)
    with pytest.raises(AssertionError, match="shapes differ"):
        assert_close(x[:1, :], x, rtol=1, atol=1)  # no broadcasting
    other = np.asarray(to_numpy(x)) if "numpy" not in xp.__name__ else None
    if other is None:
        import array_api_strict

        other = array_api_strict.asarray(to_numpy(x))
    with pytest.raises(AssertionError, match="different libraries"):
        assert_close(other, x, rtol=1, atol=1)


def test_assert_close_names_the_worst_index_and_values(xp):
    desired = xp.asarray([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]], dtype=xp.float64)
    actual = xp.asarray([[0.0, 1.001, 2.0], [3.0, 4.0, 5.5]], dtype=xp.float64)
    with pytest.raises(AssertionError) as info:
        assert_close(actual, desired, rtol=1e-6, atol=0)
    message = str(info.value)
    assert "2 of 6 elements mismatch" in message
    assert "worst at index (1, 2)" in message
    assert "actual 5.5" in message and "desired 5.0" in message


def test_assert_close_infinities_and_nan(xp):
    inf = float("inf")
    a = xp.asarray([1.0, -inf, float("nan")], dtype=xp.float64)
    assert_close(a, a, rtol=0, atol=0)  # same infinities, NaN matches NaN
    with pytest.raises(AssertionError, match="index"):
        assert_close(xp.asarray([1.0, inf, 0.0]), xp.asarray([1.0, -inf, 0.0]), rtol=1, atol=1)
    with pytest.raises(AssertionError):
        assert_close(a, a, rtol=0, atol=0, equal_nan=False)
    with pytest.raises(AssertionError):  # a NaN against a number is never close
        assert_close(xp.asarray([float("nan")]), xp.asarray([0.0]), rtol=1, atol=1)


# ----------------------------------------------------------------------------- the rule


def test_honest_float32_attention_passes_the_rule():
    """refattn's own float32 SDPA is an honest float32 implementation: output and gradients."""
    q, k, v, ct, options = _problem()
    rounded = [_rounded(x, "float32") for x in (q, k, v, ct)]
    ref, ref_grads = run_in_dtype(sdpa, *rounded[:3], cotangent=rounded[3], **options)
    cand, cand_grads = run_in_dtype(sdpa, q, k, v, dtype="float32", cotangent=ct, **options)
    base, base_grads = lowp_attention_vjp_baseline(q, k, v, ct, dtype="float32", **options)
    assert cand.dtype == np.float32 and base.dtype == np.float32
    assert_attention_close(cand, ref, base)
    for name, c, r, b in zip(("dq", "dk", "dv"), cand_grads, ref_grads, base_grads, strict=True):
        assert_attention_close(c, r, b, name=name)


def test_perturbed_candidate_fails_with_a_clear_message():
    q, k, v, _, options = _problem(seed=1)
    rounded = [_rounded(x, "float32") for x in (q, k, v)]
    ref = sdpa(*rounded, **options)
    base = lowp_attention_baseline(q, k, v, dtype="float32", **options)
    honest = sdpa(*(x.astype(np.float32) for x in (q, k, v)), **options)
    bad = honest.copy()
    bad[1, 2, 5, 3] += np.float32(1e-4)  # one element off by 1e-4: far above float32 noise
    with pytest.raises(AssertionError) as info:
        assert_attention_close(bad, ref, base, name="out")
    message = str(info.value)
    assert "out: error" in message and "worst at index (1, 2, 5, 3)" in message
    # the error is 1e-4 (to float32 rounding) and the allowed error is far below it
    tol = attention_tolerance(bad, ref, base)
    assert math.isclose(tol.error, 1e-4, rel_tol=1e-2)
    assert tol.allowed < 1e-5


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_rule_in_half_precision(dtype):
    pytest.importorskip("ml_dtypes")
    q, k, v, _, options = _problem(seed=2)
    rounded = [_rounded(x, dtype) for x in (q, k, v)]
    ref = sdpa(*rounded, **options)
    base = lowp_attention_baseline(q, k, v, dtype=dtype, **options)
    assert testing.dtype_name(base.dtype) == dtype
    # the correctly rounded reference is the best any implementation in `dtype` can do
    assert_attention_close(round_to_dtype(ref, dtype), ref, base)
    # an error of 8 units in the last place of the largest output is not
    eps = testing.machine_epsilon(dtype)
    bad = np.asarray(round_to_dtype(ref, dtype)).astype(np.float64)
    bad[0, 0, 0, 0] += 8 * eps * np.abs(ref).max()
    with pytest.raises(AssertionError):
        assert_attention_close(round_to_dtype(bad, dtype), ref, base)


def test_float64_rule_adds_the_reference_error_and_floor():
    q, k, v, _, options = _problem(seed=3)
    ref = sdpa(q, k, v, **options)
    err = 1e-15
    tol = attention_tolerance(ref + err, ref, 1e-16)
    eps = testing.machine_epsilon("float64")
    assert tol.allowed == pytest.approx(3 * 1e-16 + 2 * eps * np.abs(ref).max())
    assert tol.passed == (tol.error <= tol.allowed)
    with pytest.raises(AssertionError):
        assert_attention_close(ref + 1e-12, ref, 1e-16)


def test_floor_scale_for_analytically_zero_quantities():
    ref = np.zeros(4)
    cand = np.full(4, 1e-16)
    assert not attention_tolerance(cand, ref, 0.0).passed
    assert attention_tolerance(cand, ref, 0.0, floor_scale=1.0).passed


def test_float64_baseline_error_scales_by_unit_roundoff():
    b32 = np.array([1.0 + 2.0**-20, 2.0], dtype=np.float32)
    r = np.array([1.0, 2.0])
    assert testing.float64_baseline_error(b32, r) == 2.0**-20 * 2.0**-29


def test_rule_argument_errors():
    a = np.zeros((2, 3))
    with pytest.raises(TypeError, match="reference_fp64 must be float64"):
        attention_tolerance(a, a.astype(np.float32), a)
    with pytest.raises(TypeError, match="candidate's dtype"):
        attention_tolerance(a.astype(np.float32), a, a)
    with pytest.raises(ValueError, match="shapes differ"):
        attention_tolerance(a, a, np.zeros((3, 2)))
    with pytest.raises(ValueError, match="dtype must be one of"):
        lowp_attention_baseline(a, a, a, dtype="int8")


def test_dtype_names_across_libraries():
    torch = pytest.importorskip("torch")
    assert testing.dtype_name(torch.bfloat16) == "bfloat16"
    assert testing.dtype_name(torch.float16) == "float16"
    assert testing.dtype_name(np.dtype("float32")) == "float32"
    assert testing.dtype_name(np.float64) == "float64"
    assert testing.machine_epsilon(torch.float32) == 2.0**-23


# ----------------------------------------------------------------------------- baselines


def test_float32_baseline_is_the_plain_formula(xp):
    """Checked against softmax(QK^T / sqrt(d)) V written out here in float32."""
    q, k, v = (randn(xp, (2, 5, 4), seed=s) for s in (1, 2, 3))
    out = lowp_attention_baseline(q, k, v, dtype="float32")
    assert out.dtype == xp.float32
    q32, k32, v32 = (to_numpy(x).astype(np.float32) for x in (q, k, v))
    s = (q32 * np.float32(0.5)) @ k32.swapaxes(-1, -2)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(to_numpy(out), p @ v32, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("form", testing.SOFTMAX_VJP_FORMS)
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"is_causal": True, "causal_alignment": "lower_right"},
        {"bias": True, "scale": 0.3},
        {"dropout": True},
    ],
    ids=["plain", "causal_lower_right", "bias_scale", "dropout"],
)
def test_float32_vjp_baseline_matches_refattn_float64(form, options):
    """The baseline's backward is the right chain rule (else the rule would be meaningless)."""
    q, k, v, ct, base_options = _problem(seed=4)
    opts = {"mask": base_options["mask"]}
    rng = np.random.default_rng(5)
    if options.get("bias"):
        opts["bias"] = rng.standard_normal((12, 15))
        opts["scale"] = options["scale"]
    elif options.get("dropout"):
        opts["dropout_mask"] = rng.random((2, 4, 12, 15)) > 0.2
        opts["dropout_p"] = 0.2
    else:
        opts.update({k: val for k, val in options.items()})
    out, grads = lowp_attention_vjp_baseline(q, k, v, ct, dtype="float32", softmax_vjp=form, **opts)
    rounded = {k: (_rounded(val, "float32") if k == "bias" else val) for k, val in opts.items()}
    x32 = [_rounded(x, "float32") for x in (q, k, v, ct)]
    ref, ref_grads = run_in_dtype(sdpa, *x32[:3], cotangent=x32[3], **rounded)
    for got, want in zip((out, *grads), (ref, *ref_grads), strict=True):
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())


def test_bfloat16_baseline_rounds_every_step():
    pytest.importorskip("ml_dtypes")
    q, k, v, ct, options = _problem(seed=6)
    out, grads = lowp_attention_vjp_baseline(q, k, v, ct, dtype="bfloat16", **options)
    out32, _ = lowp_attention_vjp_baseline(q, k, v, ct, dtype="float32", **options)
    ref = sdpa(*(_rounded(x, "bfloat16") for x in (q, k, v)), **options)
    err16 = testing.max_abs_error(out, ref)
    err32 = testing.max_abs_error(
        out32, sdpa(*(_rounded(x, "float32") for x in (q, k, v)), **options)
    )
    eps = testing.machine_epsilon("bfloat16")
    # bfloat16 error: rounding noise (nonzero, above float32's), at most a few ulps of the output
    assert 1000 * err32 < err16 < 8 * eps * np.abs(ref).max()
    assert all(testing.dtype_name(g.dtype) == "bfloat16" for g in grads)
    # fully masked row: output 0 and its gradients 0, as refattn
    assert np.all(np.asarray(out, dtype=np.float64)[:, :, 3] == 0)


def test_lowp_baseline_extra_outputs_match_refattn():
    q, k, v, _, options = _problem(seed=7)
    out, weights, lse = lowp_attention_baseline(
        q, k, v, dtype="float32", return_weights=True, return_lse=True, **options
    )
    r_out, r_w, r_lse = sdpa(
        *(_rounded(x, "float32") for x in (q, k, v)),
        return_weights=True,
        return_lse=True,
        **options,
    )
    np.testing.assert_allclose(weights, r_w, atol=1e-6)
    assert np.array_equal(np.isneginf(lse), np.isneginf(r_lse))  # -inf on fully masked rows
    finite = np.isfinite(r_lse)
    np.testing.assert_allclose(lse[finite], r_lse[finite], rtol=1e-6)
    np.testing.assert_allclose(out, r_out, atol=2e-6)


def test_torch_float32_sdpa_passes_the_rule():
    """A real framework kernel in float32 and bfloat16: torch's math SDPA, outputs and grads."""
    torch = pytest.importorskip("torch")
    q, k, v, ct, options = _problem(seed=8, kv_heads=4, n_k=12)
    options = {"is_causal": True}
    for dtype in ("float32", "bfloat16"):
        if dtype == "bfloat16":
            pytest.importorskip("ml_dtypes")
        x = [_rounded(a, dtype) for a in (q, k, v, ct)]
        ref, ref_grads = run_in_dtype(sdpa, *x[:3], cotangent=x[3], **options)
        base, base_grads = lowp_attention_vjp_baseline(*x, dtype=dtype, **options)
        tdtype = getattr(torch, dtype)
        t = [torch.from_numpy(a).to(tdtype).requires_grad_() for a in x[:3]]
        out = torch.nn.functional.scaled_dot_product_attention(*t, is_causal=True)
        out.backward(torch.from_numpy(x[3]).to(tdtype))
        assert_attention_close(out, ref, base)
        for name, tt, r, b in zip("qkv", t, ref_grads, base_grads, strict=True):
            assert_attention_close(tt.grad, r, b, name=f"d{name}")
