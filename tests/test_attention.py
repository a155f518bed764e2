"""scaled_dot_product_attention: semantics, properties, gradients, float32 accuracy, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import randn, to_numpy
from hypothesis import given, settings
from hypothesis import strategies as st

import refattn

sdpa = refattn.scaled_dot_product_attention


def _qkv(xp, lead=(2, 4), kv_heads=None, n_q=5, n_k=6, d=3, d_v=4, seed=0, dtype="float64"):
    *batch, h_q = lead
    h_kv = h_q if kv_heads is None else kv_heads
    q = randn(xp, (*batch, h_q, n_q, d), seed=seed, dtype=dtype)
    k = randn(xp, (*batch, h_kv, n_k, d), seed=seed + 1, dtype=dtype)
    v = randn(xp, (*batch, h_kv, n_k, d_v), seed=seed + 2, dtype=dtype)
    return q, k, v


def _reference(q, k, v, keep=None, bias=None, scale=None, drop=None, p=0.0):
    """Independent float64 NumPy reference with explicit per-head loops (GQA by index)."""
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    *batch, h_q, n_q, d = q.shape
    h_kv, n_k = k.shape[-3], k.shape[-2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = np.zeros((*batch, h_q, n_q, v.shape[-1]))
    weights = np.zeros((*batch, h_q, n_q, n_k))
    full = (*batch, h_q, n_q, n_k)
    keep = np.ones(full, bool) if keep is None else np.broadcast_to(keep, full)
    bias = np.zeros(full) if bias is None else np.broadcast_to(bias, full)
    drop = np.ones(full) if drop is None else np.broadcast_to(drop, full)
    for idx in np.ndindex(*batch, h_q):
        *b, h = idx
        kv = (*b, h // (h_q // h_kv))
        s = q[idx] @ k[kv].T * scale + bias[idx]
        for i in range(n_q):
            kept = keep[idx][i]
            if not kept.any():
                continue
            row = np.exp(s[i][kept] - s[i][kept].max())
            weights[idx][i][kept] = row / row.sum()
        out[idx] = (weights[idx] * drop[idx] / (1.0 - p)) @ v[kv]
    return out, weights


def test_matches_independent_reference_with_every_option(xp):
    rng = np.random.default_rng(11)
    q, k, v = _qkv(xp, lead=(2, 4), kv_heads=2)
    keep = rng.random((2, 1, 5, 6)) > 0.3
    keep[1, 0, 2] = False
    bias = rng.standard_normal((4, 1, 6))
    drop = rng.random((2, 4, 5, 6)) > 0.2
    out, w, lse = sdpa(
        q,
        k,
        v,
        mask=xp.asarray(keep),
        bias=xp.asarray(bias),
        dropout_mask=xp.asarray(drop),
        dropout_p=0.2,
        scale=0.9,
        return_weights=True,
        return_lse=True,
    )
    ref_out, ref_w = _reference(q, k, v, keep, bias, 0.9, drop, 0.2)
    np.testing.assert_allclose(to_numpy(out), ref_out, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(to_numpy(w), ref_w, rtol=1e-13, atol=1e-15)
    # lse: log sum over kept of exp(scale qk + bias); -inf on fully masked rows.
    s = np.einsum("bhid,bhjd->bhij", to_numpy(q), np.repeat(to_numpy(k), 2, axis=1)) * 0.9 + bias
    full_keep = np.broadcast_to(keep, s.shape)
    with np.errstate(divide="ignore"):
        ref_lse = np.log(np.where(full_keep, np.exp(s), 0.0).sum(-1))
    np.testing.assert_allclose(to_numpy(lse), ref_lse, rtol=1e-13)
    assert np.all(to_numpy(out)[1, :2, 2] == 0.0) and np.all(np.isneginf(to_numpy(lse)[1, :2, 2]))


def test_fully_masked_rows_give_zero_output_and_zero_gradient(xp):
    q, k, v = _qkv(xp, lead=(1, 2))
    keep = np.ones((5, 6), bool)
    keep[[0, 3]] = False
    out, pull = refattn.vjp(sdpa, q, k, v, mask=xp.asarray(keep))
    dq, dk, dv = pull(randn(xp, tuple(out.shape), seed=3))
    assert np.all(to_numpy(out)[..., [0, 3], :] == 0.0)
    assert np.all(to_numpy(dq)[..., [0, 3], :] == 0.0)
    for g in (dq, dk, dv):
        assert np.all(np.isfinite(to_numpy(g)))
    # Every key masked for every query: output, and all gradients, are exactly zero.
    out, pull = refattn.vjp(sdpa, q, k, v, mask=xp.zeros((5, 6), dtype=xp.bool))
    for g in (out, *pull(randn(xp, tuple(out.shape), seed=4))):
        assert np.all(to_numpy(g) == 0.0)


@pytest.mark.parametrize("implementation", ["materialized", "tiled"])
def test_empty_dimensions(xp, implementation):
    call = {"return_lse": True, "implementation": implementation}
    # no keys: every row is fully masked, so output 0, lse -inf and dq 0
    q, k, v = _qkv(xp, n_k=0)
    (out, lse), pull = refattn.vjp(sdpa, q, k, v, **call)
    dq, dk, dv = pull((randn(xp, tuple(out.shape), seed=5), None))
    assert tuple(out.shape) == (2, 4, 5, 4) and np.all(to_numpy(out) == 0.0)
    assert np.all(np.isneginf(to_numpy(lse))) and np.all(to_numpy(dq) == 0.0)
    assert (tuple(dk.shape), tuple(dv.shape)) == ((2, 4, 0, 3), (2, 4, 0, 4))
    # d_k = 0: every score is 0, so the weights are uniform
    q, k, v = _qkv(xp, d=0)
    out, lse = sdpa(q, k, v, **call)
    mean_v = np.mean(to_numpy(v), axis=-2, keepdims=True)
    np.testing.assert_allclose(to_numpy(out), np.broadcast_to(mean_v, (2, 4, 5, 4)), rtol=1e-14)
    np.testing.assert_allclose(to_numpy(lse), math.log(6), rtol=1e-14)
    # d_v = 0: an empty output, and the LSE does not depend on the values
    q, k, v = _qkv(xp)
    out, lse = sdpa(q, k, v[..., :0], **call)
    assert tuple(out.shape) == (2, 4, 5, 0)
    np.testing.assert_allclose(to_numpy(lse), to_numpy(sdpa(q, k, v, **call)[1]), rtol=1e-14)
    # no batch, or no query rows: empty outputs, and gradients of the inputs' shapes
    for q, k, v in (_qkv(xp, lead=(0, 4)), _qkv(xp, n_q=0)):
        (out, lse), pull = refattn.vjp(sdpa, q, k, v, **call)
        grads = pull((xp.ones(out.shape, dtype=out.dtype), xp.ones(lse.shape, dtype=lse.dtype)))
        assert math.prod(out.shape) == math.prod(lse.shape) == 0
        assert [tuple(g.shape) for g in grads] == [tuple(a.shape) for a in (q, k, v)]


@pytest.mark.parametrize("alignment", ["upper_left", "lower_right"])
@pytest.mark.parametrize(("n_q", "n_k"), [(3, 5), (5, 3), (4, 4)])
def test_causal_alignment_equals_explicit_mask(xp, alignment, n_q, n_k):
    q, k, v = _qkv(xp, lead=(2,), n_q=n_q, n_k=n_k)
    out = sdpa(q, k, v, is_causal=True, causal_alignment=alignment)
    keep = np.array(
        [
            [j <= i + (0 if alignment == "upper_left" else n_k - n_q) for j in range(n_k)]
            for i in range(n_q)
        ]
    )
    ref, _ = _reference(q, k, v, keep)
    np.testing.assert_allclose(to_numpy(out), ref, rtol=1e-13, atol=1e-14)
    np.testing.assert_array_equal(to_numpy(refattn.causal_mask(n_q, n_k, alignment, xp=xp)), keep)


@settings(max_examples=15, deadline=None)
@given(
    st.integers(1, 3),
    st.sampled_from([(4, 1), (4, 2), (6, 3), (2, 2)]),
    st.integers(1, 5),
    st.integers(1, 5),
    st.booleans(),
)
def test_gqa_equals_explicitly_repeated_kv(batch, heads, n_q, n_k, causal):
    h_q, h_kv = heads
    rng = np.random.default_rng(batch * 100 + n_q * 10 + n_k)
    q = rng.standard_normal((batch, h_q, n_q, 3))
    k = rng.standard_normal((batch, h_kv, n_k, 3))
    v = rng.standard_normal((batch, h_kv, n_k, 2))
    g = h_q // h_kv
    k_rep, v_rep = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)
    opts = {"is_causal": causal, "causal_alignment": "lower_right"}
    out, pull = refattn.vjp(sdpa, q, k, v, **opts)
    out_rep, pull_rep = refattn.vjp(sdpa, q, k_rep, v_rep, **opts)
    np.testing.assert_allclose(out, out_rep, rtol=1e-14, atol=1e-15)
    do = rng.standard_normal(out.shape)
    dq, dk, dv = pull(do)
    dq_r, dk_r, dv_r = pull_rep(do)
    np.testing.assert_allclose(dq, dq_r, rtol=1e-13, atol=1e-14)
    # kv head j received the sum of its group's gradients.
    np.testing.assert_allclose(dk, dk_r.reshape(batch, h_kv, g, n_k, 3).sum(2), atol=1e-13)
    np.testing.assert_allclose(dv, dv_r.reshape(batch, h_kv, g, n_k, 2).sum(2), atol=1e-13)


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 10_000), st.floats(-1e3, 1e3))
def test_rows_sum_to_one_and_row_shift_invariance(seed, shift):
    rng = np.random.default_rng(seed)
    q, k, v = (
        rng.standard_normal((2, 4, 3)),
        rng.standard_normal((2, 5, 3)),
        rng.standard_normal((2, 5, 2)),
    )
    bias = rng.standard_normal((4, 5))
    out, w = sdpa(q, k, v, bias=bias, return_weights=True)
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-13)
    row_shift = shift * rng.standard_normal((4, 1))  # a per-query-row constant
    out2, w2 = sdpa(q, k, v, bias=bias + row_shift, return_weights=True)
    np.testing.assert_allclose(w2, w, rtol=1e-9, atol=1e-14)
    np.testing.assert_allclose(out2, out, rtol=1e-9, atol=1e-12)


def test_vjp_of_constant_weights_cotangent_is_zero():
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((2, 4, 3)) for _ in range(3))
    (_, w), pull = refattn.vjp(sdpa, q, k, v, return_weights=True)
    dq, dk, dv = pull((None, np.full(w.shape, 2.5)))
    for g in (dq, dk, dv):
        np.testing.assert_allclose(g, 0.0, atol=1e-13)


OPTION_SETS = {
    "plain": {},
    "mask": {"mask": "mask"},
    "bias": {"bias": "bias"},
    "causal_ul": {"is_causal": True},
    "causal_lr": {"is_causal": True, "causal_alignment": "lower_right"},
    "dropout": {"dropout_mask": "drop", "dropout_p": 0.3},
    "weights_lse": {"return_weights": True, "return_lse": True, "mask": "mask"},
}


@pytest.mark.parametrize("name", list(OPTION_SETS))
def test_gradcheck_every_option_every_backend(xp, name):
    rng = np.random.default_rng(2)
    q, k, v = _qkv(xp, lead=(1, 4), kv_heads=2, n_q=3, n_k=4, d=2, d_v=2)
    arrays = {
        "mask": xp.asarray(rng.random((1, 4, 3, 4)) > 0.3),
        "bias": xp.asarray(rng.standard_normal((3, 4))),
        "drop": xp.asarray(rng.random((4, 3, 4)) > 0.3),
    }
    options = {
        key: arrays.get(val, val) if isinstance(val, str) else val
        for key, val in OPTION_SETS[name].items()
    }
    assert refattn.gradcheck(sdpa, q, k, v, **options)
    assert refattn.gradcheck(sdpa, q, k, v, fast=True, **options)


def test_outputs_stay_on_backend_with_dtype(xp):
    for dtype in ("float32", "float64"):
        q, k, v = _qkv(xp, lead=(2,), dtype=dtype)
        (out, w, lse), pull = refattn.vjp(
            sdpa, q, k, v, return_weights=True, return_lse=True, scale=np.float64(0.5)
        )
        grads = pull((xp.ones_like(out), None, xp.ones_like(lse)))
        for a in (out, w, lse, *grads):
            assert type(a) is type(q)
            assert a.dtype == getattr(xp, dtype)


def _plain_attention(q, k, v, dtype):
    """The plain materialized implementation computed entirely in ``dtype`` (NumPy)."""
    q, k, v = (a.astype(dtype) for a in (q, k, v))
    s = (q @ np.swapaxes(k, -1, -2)) * dtype(1.0 / math.sqrt(q.shape[-1]))
    s = s - s.max(-1, keepdims=True)
    p = np.exp(s)
    p = p / p.sum(-1, keepdims=True)
    return p @ v


@pytest.mark.parametrize("implementation", ["materialized", "tiled"])
@pytest.mark.parametrize("shape", [(2, 4, 64, 16), (1, 2, 257, 64), (1, 1, 1100, 64)])
def test_float32_error_within_flashattention_rule(shape, implementation):
    """refattn in float32 errs at most 2x a plain float32 implementation (both vs float64).

    The tiled forward takes its single-pass bounded-shift path on these inputs (the shift is
    folded into the GEMM), whose rounding differs from the max-shifted softmax's.
    """
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal(shape) * 2.0 for _ in range(3))
    ref, pull_ref = refattn.vjp(sdpa, q, k, v)
    f32 = [a.astype(np.float32) for a in (q, k, v)]
    out32, pull32 = refattn.vjp(sdpa, *f32, implementation=implementation)
    plain = _plain_attention(q, k, v, np.float32)
    err = np.abs(out32.astype(np.float64) - ref).max()
    err_plain = np.abs(plain.astype(np.float64) - ref).max()
    assert err <= 2.0 * err_plain
    do = rng.standard_normal(ref.shape)
    for g32, g64 in zip(pull32(do.astype(np.float32)), pull_ref(do), strict=True):
        rel = np.abs(g32.astype(np.float64) - g64).max() / np.abs(g64).max()
        assert rel < 2e-5


def test_return_tuple_and_cotangent_contract():
    rng = np.random.default_rng(4)
    q, k, v = (rng.standard_normal((3, 2)) for _ in range(3))
    out = sdpa(q, k, v, return_lse=True)
    assert isinstance(out, tuple) and len(out) == 2
    _, pull = refattn.vjp(sdpa, q, k, v, return_lse=True)
    with pytest.raises(ValueError, match="tuple of 2"):
        pull(np.ones((3, 2)))
    dq_lse_only = pull((None, np.ones(3)))[0]
    # d(sum lse)/dq = scale * P K: check against the weights.
    _, w = sdpa(q, k, v, return_weights=True)
    np.testing.assert_allclose(dq_lse_only, (w @ k) / math.sqrt(2), rtol=1e-13)


@pytest.mark.parametrize(
    ("kwargs", "exc", "pattern"),
    [
        ({"k": (2, 4, 6, 5)}, ValueError, r"d_k\) must equal q's"),
        ({"v": (2, 4, 7, 4)}, ValueError, "same number of keys"),
        (
            {"k": (2, 3, 6, 3), "v": (2, 3, 6, 4)},
            ValueError,
            r"query heads \(4\) must be a multiple",
        ),
        ({"q": (3, 4, 5, 3)}, ValueError, "share their batch dimensions"),
        ({"q": (4, 5, 3)}, ValueError, "same number of dimensions"),
    ],
)
def test_shape_errors(xp, kwargs, exc, pattern):
    shapes = {"q": (2, 4, 5, 3), "k": (2, 4, 6, 3), "v": (2, 4, 6, 4)} | kwargs
    arrays = {name: randn(xp, s, seed=i) for i, (name, s) in enumerate(shapes.items())}
    with pytest.raises(exc, match=pattern):
        sdpa(arrays["q"], arrays["k"], arrays["v"])


def test_option_errors(xp):
    q, k, v = _qkv(xp, lead=(2, 4))
    with pytest.raises(
        ValueError, match=r"mask of shape \(3, 6\) does not broadcast to \(2, 4, 5, 6\)"
    ):
        sdpa(q, k, v, mask=xp.ones((3, 6), dtype=xp.bool))
    with pytest.raises(TypeError, match="mask must be boolean"):
        sdpa(q, k, v, mask=xp.ones((5, 6)))
    with pytest.raises(ValueError, match="bias of shape"):
        sdpa(q, k, v, bias=xp.ones((7,)))
    with pytest.raises(ValueError, match="causal_alignment must be"):
        sdpa(q, k, v, is_causal=True, causal_alignment="bottom")
    with pytest.raises(ValueError, match="needs an explicit dropout_mask"):
        sdpa(q, k, v, dropout_p=0.1)
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\)"):
        sdpa(q, k, v, dropout_mask=xp.ones((5, 6), dtype=xp.bool), dropout_p=1.0)
    with pytest.raises(TypeError, match="inputs must share one floating dtype"):
        sdpa(q, xp.astype(k, xp.float32), v)
    with pytest.raises(TypeError, match="q must have a real floating dtype"):
        sdpa(xp.astype(q, xp.int64), k, v)
    with pytest.raises(ValueError, match="scale must be finite"):
        sdpa(q, k, v, scale=float("nan"))


def test_mixed_backends_are_rejected():
    strict = pytest.importorskip("array_api_strict")
    q = np.ones((2, 3))
    with pytest.raises(TypeError, match="one array library"):
        sdpa(q, strict.asarray(q), q)


def test_large_scores_do_not_overflow():
    q = np.array([[1e2, 0.0], [-1e2, 0.0]])
    k = np.array([[1e2, 0.0], [0.0, 1.0], [-1e2, 0.0]])
    v = np.eye(3)
    out, lse = sdpa(q, k, v, scale=1.0, return_lse=True)
    np.testing.assert_allclose(out, [[1, 0, 0], [0, 0, 1]], atol=1e-300)
    np.testing.assert_allclose(lse, [1e4, 1e4], rtol=1e-15)
    _, pull = refattn.vjp(sdpa, q, k, v, scale=1.0)
    assert all(np.all(np.isfinite(g)) for g in pull(np.ones((2, 3))))
