"""A learnable SDPA bias: ``bias`` given positionally is a primal, and its gradient is ``dS``
summed over the bias's broadcast axes, in both kernels.

Each test compares with torch autograd of the direct formula (scores, cap, bias, mask, softmax),
and the compositions users train: ALiBi slopes and a relative-position table, whose gradients
reach them through the bias.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import rel_err

import refattn

sdpa = refattn.scaled_dot_product_attention

KERNELS = [
    pytest.param({"implementation": "materialized"}, id="materialized"),
    pytest.param({"implementation": "tiled", "block_size": (3, 4)}, id="tiled"),
]


def _inputs(seed, *, b=2, h_q=4, h_kv=2, n_q=7, n_k=9, d=3):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, h_q, n_q, d))
    k = rng.standard_normal((b, h_kv, n_k, d))
    v = rng.standard_normal((b, h_kv, n_k, d))
    return q, k, v, rng


def _torch_attention(torch, tq, tk, tv, bias, *, keep=None, softcap=None):
    g = tq.shape[1] // tk.shape[1]
    s = tq @ tk.repeat_interleave(g, 1).transpose(-1, -2) / tq.shape[-1] ** 0.5
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    s = s + bias
    if keep is not None:
        s = s.masked_fill(~torch.as_tensor(keep), -torch.inf)
    return torch.softmax(s, -1) @ tv.repeat_interleave(g, 1), torch.logsumexp(s, -1)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("shape", [(2, 4, 7, 9), (4, 1, 9), (7, 9), (2, 1, 1, 9), (1,), (4, 7, 1)])
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_bias_gradient_matches_torch_autograd(kernel, shape, softcap):
    torch = pytest.importorskip("torch")
    q, k, v, rng = _inputs(1)
    bias = rng.standard_normal(shape)
    options = {"is_causal": True, "causal_alignment": "lower_right", "softcap": softcap}
    (out, lse), pullback = refattn.vjp(sdpa, q, k, v, bias, return_lse=True, **options, **kernel)
    cot = (rng.standard_normal(out.shape), rng.standard_normal(lse.shape))
    grads = pullback(cot)
    leaves = [torch.tensor(x, requires_grad=True) for x in (q, k, v, bias)]
    keep = np.tril(np.ones((7, 9), bool), 2)
    t_out, t_lse = _torch_attention(torch, *leaves, keep=keep, softcap=softcap)
    t_grads = torch.autograd.grad((t_out, t_lse), leaves, tuple(map(torch.tensor, cot)))
    assert grads[3].shape == shape
    for g, t in zip(grads, t_grads, strict=True):
        assert rel_err(g, t.numpy()) <= 1e-12


def test_bias_as_a_keyword_is_an_option_and_positional_a_primal():
    q, k, v, rng = _inputs(2)
    bias = rng.standard_normal((7, 9))
    out_kw, pull_kw = refattn.vjp(sdpa, q, k, v, bias=bias)
    out_pos, pull_pos = refattn.vjp(sdpa, q, k, v, bias)
    d_out = rng.standard_normal(out_kw.shape)
    assert rel_err(out_kw, out_pos) == 0.0
    assert len(pull_kw(d_out)) == 3
    grads = pull_pos(d_out)
    assert len(grads) == 4
    for a, b in zip(pull_kw(d_out), grads[:3], strict=True):
        assert rel_err(a, b) == 0.0


def test_bias_gradient_with_mask_dropout_weights_and_lengths():
    """Masked, padded and dropped entries: dS is zero where P is, and the dropout multiplier
    and a weights cotangent enter dS as they enter dQ (compared with torch)."""
    torch = pytest.importorskip("torch")
    q, k, v, rng = _inputs(3)
    bias = rng.standard_normal((4, 7, 9))
    mask = rng.random((2, 1, 7, 9)) < 0.8
    mask[..., 0] = True
    drop = rng.random((2, 4, 7, 9)) < 0.75
    options = {
        "mask": mask,
        "dropout_mask": drop,
        "dropout_p": 0.25,
        "key_lengths": [9, 6],
        "return_weights": True,
        "implementation": "materialized",
    }
    (out, w), pullback = refattn.vjp(sdpa, q, k, v, bias, **options)
    cot = (rng.standard_normal(out.shape), rng.standard_normal(w.shape))
    grads = pullback(cot)
    keep = mask & (np.arange(9) < np.array([9, 6])[:, None, None, None])
    leaves = [torch.tensor(x, requires_grad=True) for x in (q, k, v, bias)]
    g = 2
    s = leaves[0] @ leaves[1].repeat_interleave(g, 1).transpose(-1, -2) / 3**0.5 + leaves[3]
    p = torch.softmax(s.masked_fill(~torch.tensor(keep), -torch.inf), -1)
    t_out = (p * torch.tensor(drop) / 0.75) @ leaves[2].repeat_interleave(g, 1)
    t_grads = torch.autograd.grad((t_out, p), leaves, tuple(map(torch.tensor, cot)))
    for a, b in zip(grads, t_grads, strict=True):
        assert rel_err(a, b.numpy()) <= 1e-12
    tiled = refattn.vjp(
        sdpa, q, k, v, bias, **{**options, "implementation": "tiled", "block_size": 4}
    )[1](cot)
    assert rel_err(tiled[3], grads[3]) <= 1e-13


def test_alibi_slopes_learn_through_the_bias():
    """ALiBi's bias is linear in the slopes, -m_h (i - j): dm_h = <dB_h, alibi_bias(1)_h>,
    equal to torch autograd of the slopes themselves."""
    torch = pytest.importorskip("torch")
    q, k, v, rng = _inputs(4, n_q=9)
    slopes = refattn.alibi_slopes(4)
    bias = refattn.alibi_bias(slopes, 9, 9)
    out, pullback = refattn.vjp(sdpa, q, k, v, bias, is_causal=True)
    d_out = rng.standard_normal(out.shape)
    d_bias = pullback(d_out)[3]
    per_unit_slope = refattn.alibi_bias(np.ones(4), 9, 9)
    d_slopes = np.sum(d_bias * per_unit_slope, axis=(1, 2))
    t_slopes = torch.tensor(slopes, requires_grad=True)
    i = torch.arange(9.0, dtype=torch.float64)
    t_bias = -t_slopes[:, None, None] * (i[:, None] - i[None, :])
    leaves = [torch.tensor(x) for x in (q, k, v)]
    keep = np.tril(np.ones((9, 9), bool))
    t_out, _ = _torch_attention(torch, *leaves, t_bias, keep=keep)
    (t_grad,) = torch.autograd.grad(t_out, t_slopes, torch.tensor(d_out))
    assert rel_err(d_slopes, t_grad.numpy()) <= 1e-12


def test_a_relative_position_table_learns_through_the_bias():
    """T5/Shaw-style table ``bias[h, i, j] = table[h, i - j + n - 1]``: its gradient is the
    bias gradient scatter-added by relative position, as torch's indexing backward gives."""
    torch = pytest.importorskip("torch")
    q, k, v, rng = _inputs(5, n_q=9)
    table = rng.standard_normal((4, 17))
    rel = np.arange(9)[:, None] - np.arange(9)[None, :] + 8
    out, pullback = refattn.vjp(sdpa, q, k, v, table[:, rel], implementation="tiled", block_size=4)
    d_out = rng.standard_normal(out.shape)
    d_bias = pullback(d_out)[3]
    d_table = np.zeros_like(table)
    np.add.at(d_table, (slice(None), rel), d_bias)
    t_table = torch.tensor(table, requires_grad=True)
    leaves = [torch.tensor(x) for x in (q, k, v)]
    t_out, _ = _torch_attention(torch, *leaves, t_table[:, torch.tensor(rel)])
    (t_grad,) = torch.autograd.grad(t_out, t_table, torch.tensor(d_out))
    assert rel_err(d_table, t_grad.numpy()) <= 1e-12


@pytest.mark.parametrize("kernel", KERNELS)
def test_gradcheck_broadcast_bias(xp, kernel):
    q, k, v, rng = _inputs(6, n_q=4, n_k=5)
    arrays = [xp.asarray(x) for x in (q, k, v, rng.standard_normal((2, 4, 1, 5)))]
    assert refattn.gradcheck(sdpa, *arrays, window=(1, 2), return_lse=True, **kernel)


def test_threaded_tiles_sharing_one_bias_row_add_up():
    """Many units add into one (H, 1, n_k) bias gradient from several threads at once."""
    q, k, v, rng = _inputs(7, b=2, h_q=4, h_kv=4, n_q=1024, n_k=1024, d=16)
    bias = rng.standard_normal((4, 1, 1024))
    d_out = rng.standard_normal((2, 4, 1024, 16))
    tiled = refattn.vjp(sdpa, q, k, v, bias, implementation="tiled", block_size=128)[1](d_out)
    full = refattn.vjp(sdpa, q, k, v, bias, implementation="materialized")[1](d_out)
    assert rel_err(tiled[3], full[3]) <= 1e-12
