"""Mask helpers: causal and padding masks, and the torch-MHA converter checked against torch."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import to_numpy

import refattn


def test_causal_mask_semantics(xp):
    m = to_numpy(refattn.causal_mask(3, 5, xp=xp))
    assert m.dtype == np.bool_
    np.testing.assert_array_equal(m, np.tril(np.ones((3, 5), bool)))
    lr = to_numpy(refattn.causal_mask(3, 5, "lower_right", xp=xp))
    np.testing.assert_array_equal(lr, np.tril(np.ones((3, 5), bool), k=2))
    lr_tall = to_numpy(refattn.causal_mask(5, 3, "lower_right", xp=xp))
    assert not lr_tall[:2].any() and lr_tall[4].all()
    with pytest.raises(ValueError, match="causal_alignment"):
        refattn.causal_mask(2, 2, "diagonal")
    with pytest.raises(ValueError, match="n_q must be a non-negative int"):
        refattn.causal_mask(-1, 2)


def test_padding_mask(xp):
    lengths = xp.asarray(np.array([0, 2, 4]))
    m = to_numpy(refattn.padding_mask(lengths, 4))
    np.testing.assert_array_equal(m, np.arange(4)[None, :] < np.array([0, 2, 4])[:, None])
    with pytest.raises(ValueError, match="lengths must be a 1-D integer array"):
        refattn.padding_mask(xp.asarray(np.array([1.5])), 3)


def test_padding_mask_drives_attention_to_ignore_padded_keys():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 1, 3, 2)) for _ in range(3))
    mask = refattn.padding_mask(np.array([2, 3]), 3)[:, None, None, :]
    out = refattn.scaled_dot_product_attention(q, k, v, mask=mask)
    trimmed = refattn.scaled_dot_product_attention(q[:1], k[:1, :, :2], v[:1, :, :2])
    np.testing.assert_allclose(out[:1], trimmed, rtol=1e-14)


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_from_torch_mha_masks_reproduces_torch_multihead_attention(kind):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    batch, n_q, n_k, d, heads = 2, 3, 4, 4, 2
    attn_mask = rng.random((n_q, n_k)) > 0.7
    attn_mask[:, 0] = False  # keep one key visible for every query (torch gives NaN otherwise)
    key_padding = np.array([[False, False, True, False], [False, True, False, False]])
    if kind == "float":  # torch wants both masks of one kind
        attn_mask = np.where(attn_mask, -3.0, 0.5)
        key_padding = np.where(key_padding, -np.inf, 0.0)
    mha = torch.nn.MultiheadAttention(d, heads, batch_first=True, dtype=torch.float64)
    x_q = rng.standard_normal((batch, n_q, d))
    x_kv = rng.standard_normal((batch, n_k, d))
    _, torch_weights = mha(
        torch.from_numpy(x_q),
        torch.from_numpy(x_kv),
        torch.from_numpy(x_kv),
        attn_mask=torch.from_numpy(attn_mask),
        key_padding_mask=torch.from_numpy(key_padding),
        need_weights=True,
        average_attn_weights=False,
    )
    mask, bias = refattn.from_torch_mha_masks(attn_mask, key_padding)
    w_in = mha.in_proj_weight.detach().numpy()
    b_in = mha.in_proj_bias.detach().numpy()

    def heads_of(x, i):
        y = x @ w_in[i * d : (i + 1) * d].T + b_in[i * d : (i + 1) * d]
        return y.reshape(batch, -1, heads, d // heads).transpose(0, 2, 1, 3)

    _, weights = refattn.scaled_dot_product_attention(
        heads_of(x_q, 0),
        heads_of(x_kv, 1),
        heads_of(x_kv, 2),
        mask=mask,
        bias=bias,
        return_weights=True,
    )
    np.testing.assert_allclose(weights, torch_weights.detach().numpy(), rtol=1e-12, atol=1e-15)


def test_from_torch_mha_masks_3d_needs_heads():
    with pytest.raises(ValueError, match="needs n_heads"):
        refattn.from_torch_mha_masks(np.zeros((4, 2, 2), bool))
    mask, bias = refattn.from_torch_mha_masks(np.zeros((4, 2, 2), bool), n_heads=2)
    assert mask.shape == (2, 2, 2, 2) and mask.all() and bias is None
