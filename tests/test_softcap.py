"""SDPA's ``softcap``: FlashAttention's semantics (cap, then bias, then mask), both kernels.

The reference is FlashAttention's ``attention_ref`` formula written here in torch (scores
``q k^T / sqrt(d)``, then ``softcap * tanh(scores / softcap)``, then the bias, then the masks,
softmax, ``@ v``), differentiated by torch autograd.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import randn, rel_err, to_numpy

import refattn

sdpa = refattn.scaled_dot_product_attention

KERNELS = [
    pytest.param({"implementation": "materialized"}, id="materialized"),
    pytest.param({"implementation": "tiled", "block_size": (3, 4)}, id="tiled"),
]


def _inputs(seed=0, *, n_q=7, n_k=9, h_q=4, h_kv=2, dtype=np.float64):
    rng = np.random.default_rng(seed)
    q = 3.0 * rng.standard_normal((2, h_q, n_q, 5))  # large scores: the cap matters
    k = 3.0 * rng.standard_normal((2, h_kv, n_k, 5))
    v = rng.standard_normal((2, h_kv, n_k, 3))
    return [x.astype(dtype) for x in (q, k, v)], rng


def _torch_ref(q, k, v, *, softcap, bias=None, keep=None, lse=False):
    """FlashAttention's attention_ref order: scale, cap, bias, mask, softmax (GQA repeated)."""
    torch = pytest.importorskip("torch")
    tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
    g = q.shape[1] // k.shape[1]
    kk, vv = tk.repeat_interleave(g, dim=1), tv.repeat_interleave(g, dim=1)
    s = tq @ kk.transpose(-1, -2) / np.sqrt(q.shape[-1])
    s = softcap * torch.tanh(s / softcap)
    if bias is not None:
        s = s + torch.tensor(bias)
    if keep is not None:
        s = s.masked_fill(~torch.tensor(keep), -torch.inf)
    out = torch.softmax(s, dim=-1) @ vv
    outs = (out, torch.logsumexp(s, dim=-1)) if lse else (out,)
    return outs, (tq, tk, tv)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("causal", [False, True])
def test_matches_flash_attention_formula_with_bias_and_mask(kernel, causal):
    torch = pytest.importorskip("torch")
    (q, k, v), rng = _inputs(1)
    bias = rng.standard_normal((7, 9))
    mask = rng.random((2, 1, 7, 9)) < 0.8
    mask[..., 0] = True  # no fully masked row: torch's softmax would give NaN there
    keep = mask & (np.tril(np.ones((7, 9), bool)) if causal else True)
    options = {"softcap": 2.5, "bias": bias, "mask": mask, "is_causal": causal, **kernel}
    (out, lse), pullback = refattn.vjp(sdpa, q, k, v, return_lse=True, **options)
    d_out, d_lse = rng.standard_normal(out.shape), rng.standard_normal(lse.shape)
    grads = pullback((d_out, d_lse))
    (t_out, t_lse), leaves = _torch_ref(q, k, v, softcap=2.5, bias=bias, keep=keep, lse=True)
    t_grads = torch.autograd.grad(
        (t_out, t_lse), leaves, (torch.tensor(d_out), torch.tensor(d_lse))
    )
    assert rel_err(out, t_out.detach().numpy()) <= 1e-13
    assert rel_err(lse, t_lse.detach().numpy()) <= 1e-13
    for g, t in zip(grads, t_grads, strict=True):
        assert rel_err(g, t.numpy()) <= 1e-12


@pytest.mark.parametrize("kernel", KERNELS)
def test_returned_weights_are_the_capped_softmax_and_carry_gradient(kernel):
    torch = pytest.importorskip("torch")
    (q, k, v), rng = _inputs(2)
    (_, w), pullback = refattn.vjp(sdpa, q, k, v, softcap=1.5, return_weights=True, **kernel)
    d_w = rng.standard_normal(w.shape)
    grads = pullback((None, d_w))
    tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
    s = tq @ tk.repeat_interleave(2, dim=1).transpose(-1, -2) / np.sqrt(5)
    t_w = torch.softmax(1.5 * torch.tanh(s / 1.5), dim=-1)
    t_grads = torch.autograd.grad(t_w, (tq, tk, tv), torch.tensor(d_w), allow_unused=True)
    assert rel_err(w, t_w.detach().numpy()) <= 1e-13
    assert rel_err(grads[0], t_grads[0].numpy()) <= 1e-12
    assert rel_err(grads[1], t_grads[1].numpy()) <= 1e-12
    assert np.all(grads[2] == 0)  # the weights do not depend on v


@pytest.mark.parametrize("kernel", KERNELS)
def test_gradcheck(kernel):
    (q, k, v), _ = _inputs(3, n_q=3, n_k=4, h_q=2, h_kv=1)
    assert refattn.gradcheck(sdpa, q[:1], k[:1], v[:1], softcap=1.5, is_causal=True, **kernel)


def test_every_backend_float32_and_float64(xp):
    for dtype in ("float64", "float32"):
        q, k, v = (randn(xp, (2, 6, 4), seed=s, dtype=dtype) for s in range(3))
        out = sdpa(3.0 * q, 3.0 * k, v, softcap=2.0, implementation="tiled", block_size=4)
        assert out.dtype == q.dtype
        ref = sdpa(3.0 * q, 3.0 * k, v, softcap=2.0, implementation="materialized")
        assert rel_err(to_numpy(out), to_numpy(ref)) <= (1e-13 if dtype == "float64" else 1e-5)


def test_the_cap_bounds_the_scores_and_a_huge_cap_is_no_cap():
    (q, k, v), _ = _inputs(4)
    _, w = sdpa(100.0 * q, k, v, softcap=1.0, return_weights=True)
    # every logit lies in [-1, 1]: within a row, weights differ by at most a factor e^2
    assert np.all(w.max(axis=-1) <= np.exp(2.0) * w.min(axis=-1) * (1 + 1e-12))
    assert rel_err(sdpa(q, k, v, softcap=1e8), sdpa(q, k, v)) <= 1e-12
    assert rel_err(sdpa(q, k, v, softcap=0.0), sdpa(q, k, v)) == 0.0  # 0 = off, as in FA


@pytest.mark.parametrize("bad", [-1.0, float("inf"), float("nan")])
def test_bad_softcap_is_rejected(bad):
    (q, k, v), _ = _inputs(5)
    with pytest.raises(ValueError, match="softcap"):
        sdpa(q, k, v, softcap=bad)
    with pytest.raises(TypeError, match="softcap"):
        sdpa(q, k, v, softcap="big")


def test_multi_head_attention_passes_the_cap_to_its_core():
    rng = np.random.default_rng(6)
    params = refattn.init_multi_head_attention(8, 2, seed=1)
    x = 4.0 * rng.standard_normal((2, 5, 8))

    def heads(name):  # (2, 5, 8) -> (2, 2, 5, 4), with plain matmuls
        y = x @ params[name]["weight"] + params[name]["bias"]
        return y.reshape(2, 5, 2, 4).transpose(0, 2, 1, 3)

    o = sdpa(heads("query"), heads("key"), heads("value"), softcap=1.5, is_causal=True)
    o = o.transpose(0, 2, 1, 3).reshape(2, 5, 8)
    expected = o @ params["out"]["weight"] + params["out"]["bias"]
    y = refattn.multi_head_attention(params, x, x, x, n_heads=2, softcap=1.5, is_causal=True)
    assert rel_err(y, expected) <= 1e-13
    assert rel_err(y, refattn.multi_head_attention(params, x, x, x, n_heads=2)) > 1e-3
    x1 = x[:1, :3]
    assert refattn.gradcheck(
        refattn.multi_head_attention, params, x1, x1, x1, n_heads=2, softcap=1.5
    )
    with pytest.raises(ValueError, match="multi_head_attention: softcap"):
        refattn.multi_head_attention(params, x, x, x, n_heads=2, softcap=-1.0)
