"""Packed variable-length attention (``flash_attn_varlen_func``'s layout and rule).

References: FlashAttention's definition of varlen attention (every sequence alone, causal and
window on the sequence's own lower-right diagonal), written here in torch and differentiated
by autograd; and refattn's padded form, SDPA with ``query_lengths``/``key_lengths``.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import randn, rel_err, to_numpy

import refattn

varlen = refattn.varlen_attention
Q_LENS, K_LENS = (5, 1, 0, 4), (7, 3, 2, 4)


def _packed(seed=0, h_q=4, h_kv=2):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((sum(Q_LENS), h_q, 3))
    k = rng.standard_normal((sum(K_LENS), h_kv, 3))
    v = rng.standard_normal((sum(K_LENS), h_kv, 2))
    cu_q, cu_k = np.cumsum((0, *Q_LENS)), np.cumsum((0, *K_LENS))
    return q, k, v, cu_q.astype(np.int32), cu_k.astype(np.int32), rng


def _flash_varlen(torch, q, k, v, cu_q, cu_k, causal, window):
    """FlashAttention's varlen semantics: each sequence alone, lower-right, in torch."""
    outs = []
    left, right = window if window is not None else (None, None)
    if causal:
        right = 0 if right is None else min(right, 0)
    for b in range(len(cu_q) - 1):
        qb = q[cu_q[b] : cu_q[b + 1]].transpose(0, 1)
        g = q.shape[1] // k.shape[1]
        kb = k[cu_k[b] : cu_k[b + 1]].transpose(0, 1).repeat_interleave(g, 0)
        vb = v[cu_k[b] : cu_k[b + 1]].transpose(0, 1).repeat_interleave(g, 0)
        sq, sk = qb.shape[1], kb.shape[1]
        row, col = torch.arange(sq)[:, None], torch.arange(sk)[None, :]
        hidden = torch.zeros(sq, sk, dtype=torch.bool)
        if right is not None:
            hidden |= col > row + sk - sq + right
        if left is not None:
            hidden |= col < row + sk - sq - left
        s = (qb @ kb.transpose(1, 2) / np.sqrt(q.shape[-1])).masked_fill(hidden, -torch.inf)
        p = torch.softmax(s, dim=-1).masked_fill(hidden.all(-1, keepdim=True), 0.0)
        outs.append((p @ vb).transpose(0, 1))
    return torch.cat(outs, 0)


@pytest.mark.parametrize("implementation", ["materialized", "tiled"])
@pytest.mark.parametrize("window", [None, (2, 1), (None, 0)])
@pytest.mark.parametrize("causal", [False, True])
def test_matches_flash_attention_varlen(implementation, window, causal):
    torch = pytest.importorskip("torch")
    q, k, v, cu_q, cu_k, rng = _packed()
    (out, lse), pullback = refattn.vjp(
        varlen, q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, is_causal=causal, window=window,
        causal_alignment="lower_right", return_lse=True, implementation=implementation,
        block_size=2,
    )  # fmt: skip
    assert out.shape == (sum(Q_LENS), 4, 2) and lse.shape == (4, sum(Q_LENS))
    d_out = rng.standard_normal(out.shape)
    grads = pullback((d_out, None))
    tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
    t_out = _flash_varlen(torch, tq, tk, tv, cu_q.tolist(), cu_k.tolist(), causal, window)
    t_grads = torch.autograd.grad(t_out, (tq, tk, tv), torch.tensor(d_out))
    assert rel_err(out, t_out.detach().numpy()) <= 1e-13
    for g, t in zip(grads, t_grads, strict=True):
        assert rel_err(g, t.numpy()) <= 1e-12


def test_equals_the_padded_batch_with_lengths():
    q, k, v, cu_q, cu_k, _ = _packed(1)
    n_q, n_k, B = max(Q_LENS), max(K_LENS), len(Q_LENS)
    qp, kp, vp = np.zeros((B, 4, n_q, 3)), np.zeros((B, 2, n_k, 3)), np.zeros((B, 2, n_k, 2))
    for b in range(B):
        qp[b, :, : Q_LENS[b]] = q[cu_q[b] : cu_q[b + 1]].transpose(1, 0, 2)
        kp[b, :, : K_LENS[b]] = k[cu_k[b] : cu_k[b + 1]].transpose(1, 0, 2)
        vp[b, :, : K_LENS[b]] = v[cu_k[b] : cu_k[b + 1]].transpose(1, 0, 2)
    opts = {"is_causal": True, "causal_alignment": "lower_right", "softcap": 2.0}
    packed, lse = varlen(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, return_lse=True, **opts)
    padded, lse_p = refattn.scaled_dot_product_attention(
        qp, kp, vp, query_lengths=Q_LENS, key_lengths=K_LENS, return_lse=True, **opts
    )
    for b in range(B):
        rows = slice(cu_q[b], cu_q[b + 1])
        want = padded[b, :, : Q_LENS[b]].transpose(1, 0, 2)
        assert np.abs(packed[rows] - want).max(initial=0) <= 1e-15
        assert np.array_equal(lse[:, rows], lse_p[b, :, : Q_LENS[b]])


def test_lse_cotangent_and_gradcheck():
    q, k, v, cu_q, cu_k, _ = _packed(2, h_q=2, h_kv=1)
    assert refattn.gradcheck(
        varlen, q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, is_causal=True,
        causal_alignment="lower_right", return_lse=True,
    )  # fmt: skip


def test_no_sequences():
    x = np.zeros((0, 2, 3))
    out, pullback = refattn.vjp(varlen, x, x, x, cu_seqlens_q=[0], cu_seqlens_k=[0])
    assert out.shape == (0, 2, 3)
    assert all(g.shape == (0, 2, 3) for g in pullback(out))


def test_every_backend(xp):
    q, k, v = (randn(xp, (6, 2, 3), seed=s) for s in range(3))
    cu = xp.asarray([0, 2, 6], dtype=xp.int32)
    out = to_numpy(varlen(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, is_causal=True))
    for lo, hi in ((0, 2), (2, 6)):
        alone = refattn.scaled_dot_product_attention(
            *(xp.permute_dims(x[lo:hi, ...], (1, 0, 2)) for x in (q, k, v)), is_causal=True
        )
        assert rel_err(out[lo:hi], to_numpy(alone).transpose(1, 0, 2)) <= 1e-15


@pytest.mark.parametrize(
    ("cu_q", "cu_k", "error", "match"),
    [
        ([0, 3, 2, 10], [0, 7, 10, 16], ValueError, "cu_seqlens_q must be non-decreasing"),
        ([1, 5, 6, 6, 10], [0, 7, 10, 12, 16], ValueError, "cu_seqlens_q must start at 0"),
        ([0, 5, 6, 6, 9], [0, 7, 10, 12, 16], ValueError, "must end at the number of tokens 10"),
        ([0, 5, 6, 10], [0, 7, 10, 12, 16], ValueError, "same number of sequences, got 3 and 4"),
        ([[0, 10]], [0, 16], ValueError, "cu_seqlens_q must be 1-D"),
        ([0.0, 10.0], [0, 16], TypeError, "cu_seqlens_q must hold integers"),
    ],
)
def test_bad_cu_seqlens(cu_q, cu_k, error, match):
    q, k, v, *_ = _packed()
    with pytest.raises(error, match=match):
        varlen(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)


def test_padded_batch_options_are_refused():
    q, k, v, cu_q, cu_k, _ = _packed()
    with pytest.raises(ValueError, match="mask is not an option here"):
        varlen(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, mask=np.ones((10, 16), bool))
    with pytest.raises(ValueError, match="q, k and v must be packed"):
        varlen(q[None], k[None], v[None], cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
