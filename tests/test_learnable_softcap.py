"""A learnable softcap: ``sdpa(q, k, v, bias, sinks, c)`` differentiates the cap ``c`` of
``c tanh(x / c)``, ``dc = Σ dB ∘ (t - (x/c)(1 - t²))``; checked against torch autograd of the
direct formula (FlashAttention's ``attention_ref`` order: cap, bias, mask), in both kernels,
with saturated scores, a score modifier after the cap, and by finite differences."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import rel_err

import refattn

sdpa = refattn.scaled_dot_product_attention

KERNELS = [
    pytest.param({"implementation": "materialized"}, id="materialized"),
    pytest.param({"implementation": "tiled", "block_size": (4, 3)}, id="tiled"),
]


def _inputs(seed=0, *, logit_scale=3.0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((2, 4, 9, 8)) * logit_scale
    k = rng.standard_normal((2, 2, 11, 8))
    v = rng.standard_normal((2, 2, 11, 5))
    bias = rng.standard_normal((1, 4, 9, 11))
    d_out = rng.standard_normal((2, 4, 9, 5))
    return q, k, v, bias, d_out


def _torch_reference(q, k, v, bias, c, d_out, *, mod=None):
    """Outputs and gradients (q, k, v, bias, c) of the direct formula by torch autograd."""
    torch = pytest.importorskip("torch")
    tq, tk, tv, tb = (torch.tensor(x, requires_grad=True) for x in (q, k, v, bias))
    tc = torch.tensor(c, dtype=torch.float64, requires_grad=True)
    g = q.shape[1] // k.shape[1]
    x = tq @ torch.repeat_interleave(tk, g, 1).transpose(-1, -2) / np.sqrt(q.shape[-1])
    s = tc * torch.tanh(x / tc) + tb
    if mod is not None:
        s = mod(torch, s)
    n_q, n_k = q.shape[2], k.shape[2]
    keep = torch.ones(n_q, n_k, dtype=torch.bool).tril(n_k - n_q)  # causal, lower right
    o = torch.softmax(s.masked_fill(~keep, -torch.inf), -1) @ torch.repeat_interleave(tv, g, 1)
    o.backward(torch.tensor(d_out))
    return o.detach().numpy(), [t.grad.numpy() for t in (tq, tk, tv, tb, tc)]


@pytest.mark.parametrize("logit_scale", [3.0, 40.0], ids=["moderate", "saturated"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_softcap_gradient_matches_torch_autograd(kernel, logit_scale):
    q, k, v, bias, d_out = _inputs(1, logit_scale=logit_scale)
    c = 2.5
    ref_out, ref_grads = _torch_reference(q, k, v, bias, c, d_out)
    out, pullback = refattn.vjp(
        sdpa, q, k, v, bias, None, np.float64(c), is_causal=True, causal_alignment="lower_right",
        **kernel,
    )  # fmt: skip
    grads = pullback(d_out)
    assert rel_err(out, ref_out) <= 1e-13
    assert grads[4] is None  # no sinks
    names = ("q", "k", "v", "bias", "c")
    for name, got, want in zip(names, (*grads[:4], grads[5]), ref_grads, strict=True):
        assert np.shape(got) == np.shape(want), name
        assert rel_err(got, want) <= 1e-12, name
    if logit_scale > 10:  # most scores saturate: t rounds to ±1 and atanh must not be used there
        x = q[:, :, :, None, :] @ np.repeat(k, 2, 1)[:, :, None].swapaxes(-1, -2)
        assert (np.abs(np.tanh(x / np.sqrt(8) / c)) == 1.0).mean() > 0.2


def test_softcap_gradient_through_a_score_modifier():
    """``S = mod(cap(x) + B)``: the cap's gradient is taken after the modifier's VJP."""
    q, k, v, bias, d_out = _inputs(2)

    def fwd(s, /, *, b, h, i, j):
        return s * 0.5 + 0.1 * (i - j), None

    def bwd(_, d_s, /, *, b, h, i, j):
        return (d_s * 0.5,)

    mod = refattn.Op(fwd, bwd, name="half_plus_distance")
    c = 1.7
    i = np.arange(9)[:, None]
    j = np.arange(11)[None, :]
    ref_out, ref_grads = _torch_reference(
        q,
        k,
        v,
        bias,
        c,
        d_out,
        mod=lambda torch, s: s * 0.5 + 0.1 * torch.tensor(i - j, dtype=torch.float64),
    )
    for kernel in ({"implementation": "materialized"}, {"implementation": "tiled"}):
        out, pullback = refattn.vjp(
            sdpa, q, k, v, bias, None, c, is_causal=True, causal_alignment="lower_right",
            score_mod=mod, **kernel,
        )  # fmt: skip
        grads = pullback(d_out)
        assert rel_err(out, ref_out) <= 1e-13
        assert rel_err(grads[5], ref_grads[4]) <= 1e-12
        assert rel_err(grads[0], ref_grads[0]) <= 1e-12


@pytest.mark.parametrize("kernel", KERNELS)
def test_gradcheck_with_a_learnable_softcap(xp, kernel):
    q, k, v, bias, _ = _inputs(3)
    arrays = [xp.asarray(x[:1, :, :5, :3]) for x in (q, k, v)]
    b = xp.asarray(bias[:, :, :5, :7])
    arrays[1], arrays[2] = (xp.asarray(x[:1, :, :7, :3]) for x in (k, v))
    c = xp.asarray(1.3)
    options = {"is_causal": True, "causal_alignment": "lower_right", "return_lse": True}
    assert refattn.gradcheck(sdpa, *arrays, b, None, c, **options, **kernel)


def test_softcap_as_a_keyword_is_a_constant():
    q, k, v, bias, d_out = _inputs(4)
    out, pullback = refattn.vjp(sdpa, q, k, v, bias, softcap=2.0)
    assert rel_err(out, sdpa(q, k, v, bias, None, 2.0)) == 0.0
    assert len(pullback(d_out)) == 4
    # a cap that is off: 0 given positionally gets a zero gradient, None none
    _, pullback = refattn.vjp(sdpa, q, k, v, bias, None, 0.0)
    d_cap = pullback(d_out)[5]
    assert d_cap.shape == () and float(d_cap) == 0.0
    _, pullback = refattn.vjp(sdpa, q, k, v, bias, None, None)
    assert pullback(d_out)[5] is None


@pytest.mark.parametrize("kernel", KERNELS)
def test_float32_softcap_gradient_follows_float64(kernel):
    q, k, v, bias, d_out = _inputs(5)
    ref = refattn.vjp(sdpa, q, k, v, bias, None, 2.0, is_causal=True, **kernel)[1](d_out)[5]
    f32 = [x.astype(np.float32) for x in (q, k, v, bias, d_out)]
    got = refattn.vjp(sdpa, *f32[:4], None, np.float32(2.0), is_causal=True, **kernel)[1](f32[4])
    assert got[5].dtype == np.float32 and got[5].shape == ()
    assert rel_err(got[5], ref) <= 1e-4
    # a cap given in float64 with float32 inputs gets its gradient in its own dtype
    c64 = np.asarray(2.0)
    mixed = refattn.vjp(sdpa, *f32[:4], None, c64, is_causal=True, **kernel)[1](f32[4])
    assert mixed[5].dtype == np.float64 and rel_err(mixed[5], got[5]) == 0.0


def test_a_learnable_softcap_is_checked_like_the_option():
    q, k, v, _, _ = _inputs(6)
    with pytest.raises(ValueError, match="softcap must be a finite number > 0"):
        sdpa(q, k, v, None, None, np.asarray(-1.0))
    with pytest.raises(TypeError, match="softcap must be a real number"):
        sdpa(q, k, v, None, None, "2")
