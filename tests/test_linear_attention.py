"""Linear attention: the explicit quadratic formula, gradients, chunking, errors."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
from conftest import randn, to_numpy

import refattn
from refattn._check_runner import compare_with_framework
from refattn.checks import all_cases, to_backend
from refattn.ops.linear_attention import _linear_attention_bwd, _linear_attention_fwd
from refattn.ops.linear_attention import linear_attention as linear

# The module, not the op of the same name that refattn.ops exports.
linear_module = importlib.import_module("refattn.ops.linear_attention")
LINEAR_CASES = [c for c in all_cases() if c.op is linear]


def phi(x: np.ndarray, feature_map: str = "elu+1") -> np.ndarray:
    if feature_map == "identity":
        return x
    return np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0)))


def quadratic(q, k, v, *, is_causal=False, eps=1e-6, feature_map="elu+1"):
    """The explicit O(n^2) formula, with an explicit loop over query positions."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    if q.ndim >= 3 and k.shape[-3] != q.shape[-3]:
        g = q.shape[-3] // k.shape[-3]
        k, v = np.repeat(k, g, axis=-3), np.repeat(v, g, axis=-3)
    qf, kf = phi(q, feature_map), phi(k, feature_map)
    out = np.zeros((*q.shape[:-1], v.shape[-1]))
    for i in range(q.shape[-2]):
        last = i + 1 if is_causal else k.shape[-2]
        weights = np.einsum("...d,...jd->...j", qf[..., i, :], kf[..., :last, :])
        num = np.einsum("...j,...jc->...c", weights, v[..., :last, :])
        out[..., i, :] = num / (weights.sum(-1) + eps)[..., None]
    return out


def rel_err(a, b) -> float:
    a = to_numpy(a)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize(
    ("q_shape", "kv_heads", "n_k", "options"),
    [
        ((2, 3, 11, 4), None, 7, {}),
        ((1, 4, 9, 3), 2, 9, {"eps": 0.3}),
        ((2, 3, 37, 4), None, None, {"is_causal": True}),  # one chunk (default 64)
        ((2, 3, 37, 4), None, None, {"is_causal": True, "chunk_size": 5}),  # ragged chunks
        ((1, 4, 23, 3), 1, None, {"is_causal": True, "chunk_size": 1}),
        ((13, 4), None, None, {"is_causal": True, "chunk_size": 4, "feature_map": "identity"}),
        ((2, 9, 4), None, 12, {"feature_map": "identity", "eps": 0.0}),
    ],
)
def test_equals_quadratic_formula(xp, q_shape, kv_heads, n_k, options):
    *lead, n, d = q_shape
    kv_lead = [*lead[:-1], kv_heads if kv_heads is not None else lead[-1]] if lead else []
    nk = n if n_k is None else n_k
    q = randn(xp, q_shape, seed=1)
    k = randn(xp, (*kv_lead, nk, d), seed=2)
    v = randn(xp, (*kv_lead, nk, d + 2), seed=3)
    if options.get("feature_map") == "identity":
        q, k = xp.abs(q) + 0.5, xp.abs(k) + 0.5
    out = linear(q, k, v, **options)
    expected = quadratic(
        to_numpy(q),
        to_numpy(k),
        to_numpy(v),
        is_causal=options.get("is_causal", False),
        eps=options.get("eps", 1e-6),
        feature_map=options.get("feature_map", "elu+1"),
    )
    assert out.dtype == q.dtype
    assert rel_err(out, expected) <= 1e-13


def test_chunks_and_groups_do_not_change_the_result(monkeypatch):
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 2, 50, 4)) for _ in range(3))
    d_out = rng.standard_normal((2, 2, 50, 4))
    out, pullback = refattn.vjp(linear, q, k, v, is_causal=True, chunk_size=64)
    grads = pullback(d_out)
    monkeypatch.setattr(linear_module, "_GROUP_BYTES", 1)  # one chunk per group: many groups
    for chunk_size in (1, 3, 7, 50):
        out_c, pullback_c = refattn.vjp(linear, q, k, v, is_causal=True, chunk_size=chunk_size)
        assert rel_err(out_c, out) <= 1e-13
        for g_c, g in zip(pullback_c(d_out), grads, strict=True):
            assert rel_err(g_c, g) <= 1e-12


@pytest.mark.parametrize("is_causal", [False, True])
def test_gradcheck_across_chunks_and_groups(xp, monkeypatch, is_causal):
    monkeypatch.setattr(linear_module, "_GROUP_BYTES", 1)
    q = randn(xp, (1, 2, 7, 3), seed=4)
    k = randn(xp, (1, 1, 7, 3), seed=5)
    v = randn(xp, (1, 1, 7, 2), seed=6)
    assert refattn.gradcheck(linear, q, k, v, is_causal=is_causal, chunk_size=2)


def test_gradcheck_with_eps():
    # gradcheck has its own ``eps`` (the finite-difference step), so bind the op's eps first
    def forward(q, k, v, /, *, is_causal=False):
        return _linear_attention_fwd(q, k, v, is_causal=is_causal, eps=0.7)

    op = refattn.Op(forward, _linear_attention_bwd, name="linear_attention_eps")
    rng = np.random.default_rng(7)
    q, k, v = (rng.standard_normal((2, 6, 3)) for _ in range(3))
    assert refattn.gradcheck(op, q, k, v, is_causal=True)
    assert refattn.gradcheck(op, q, k, v)
    np.testing.assert_allclose(op(q, k, v), quadratic(q, k, v, eps=0.7), rtol=1e-13)


@pytest.mark.parametrize("case", LINEAR_CASES, ids=[c.name for c in LINEAR_CASES])
def test_check_case_gradcheck(xp, case):
    primals, options = case.make(np.random.default_rng(0))
    assert refattn.gradcheck(case.op, *to_backend(xp, primals), **to_backend(xp, options))


@pytest.mark.parametrize("case", LINEAR_CASES, ids=[c.name for c in LINEAR_CASES])
def test_check_case_matches_torch_autograd(case):
    pytest.importorskip("torch")
    status, err = compare_with_framework(case, "torch")
    assert status == "ok", status
    assert err <= 1e-12


def test_large_inputs_do_not_overflow():
    # phi's e^x branch is only evaluated on x <= 0: no overflow warning (warnings are errors)
    q = np.array([[800.0, -800.0], [1.0, 2.0]])
    out = linear(q, q, q, is_causal=True)
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, quadratic(q, q, q, is_causal=True), rtol=1e-13)


def test_causal_prefix_property():
    # causal: output i does not depend on positions after i
    rng = np.random.default_rng(8)
    q, k, v = (rng.standard_normal((40, 4)) for _ in range(3))
    out = linear(q, k, v, is_causal=True, chunk_size=8)
    k2, v2 = k.copy(), v.copy()
    k2[25:] += 10.0
    v2[25:] -= 3.0
    out2 = linear(q, k2, v2, is_causal=True, chunk_size=8)
    np.testing.assert_array_equal(out[:25], out2[:25])
    assert not np.allclose(out[25:], out2[25:])


@pytest.mark.parametrize(
    ("shapes", "options", "error", "match"),
    [
        (((5, 3), (5, 3)), {"feature_map": "relu"}, ValueError, "feature_map"),
        (((5, 3), (5, 3)), {"eps": -1.0}, ValueError, "eps"),
        (((5, 3), (5, 3)), {"eps": float("nan")}, ValueError, "eps"),
        (((5, 3), (5, 3)), {"eps": "small"}, TypeError, "eps"),
        (((5, 3), (5, 3)), {"is_causal": 1}, TypeError, "is_causal"),
        (((5, 3), (5, 3)), {"chunk_size": 0}, ValueError, "chunk_size"),
        (((5, 3), (6, 3)), {"is_causal": True}, ValueError, "as many queries as keys"),
        (((5, 3), (5, 2)), {}, ValueError, "d_k"),
    ],
)
def test_errors(shapes, options, error, match):
    q_shape, k_shape = shapes
    q, k = np.zeros(q_shape), np.zeros(k_shape)
    with pytest.raises(error, match=match):
        linear(q, k, k, **options)


def test_mixed_dtypes_rejected():
    q = np.zeros((4, 2))
    with pytest.raises(TypeError, match="dtype"):
        linear(q, q.astype(np.float32), q)
