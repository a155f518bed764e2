"""SDPA on a padded batch: ``query_lengths`` / ``key_lengths``, each sequence on its own diagonal.

References:

* FlashAttention's ``attention_ref`` with ``query_padding_mask`` / ``key_padding_mask``
  (ported here as torch math, differentiated by autograd): ``sq``/``sk`` are each sequence's
  lengths, key ``j`` is hidden from query ``i`` iff ``j > min(i + sk - sq + right, sk)`` or
  ``j < i + sk - sq - left`` (``causal`` sets ``right = 0``), padded keys are hidden and padded
  query rows give 0;
* ``jax.nn.dot_product_attention(query_seq_lengths=..., key_value_seq_lengths=...)``
  (upper-left aligned);
* the same sequences one by one, unpadded, through refattn itself (each call's own
  ``n_k - n_q`` is the per-sequence offset).
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
from conftest import randn, rel_err, to_numpy

import refattn
from refattn.ops.sdpa import problem
from refattn.ops.sdpa.tiled import make_plan

sdpa = refattn.scaled_dot_product_attention

KERNELS = [
    pytest.param({"implementation": "materialized"}, id="materialized"),
    pytest.param({"implementation": "tiled", "block_size": (3, 4)}, id="tiled"),
]
# the issue's batch (keys [8, 6]) plus a sequence shorter in queries than keys and an empty one
Q_LEN, K_LEN = (8, 5, 3, 0), (8, 6, 9, 4)
N_Q, N_K = 8, 9


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((len(Q_LEN), 4, N_Q, 5))
    k = rng.standard_normal((len(Q_LEN), 2, N_K, 5))
    v = rng.standard_normal((len(Q_LEN), 2, N_K, 3))
    return q, k, v, rng


def _flash_attention_ref(torch, q, k, v, q_len, k_len, causal, window):
    """``attention_ref``'s forward with padding masks and ``construct_local_mask``, in torch."""
    n_q, n_k = q.shape[-2], k.shape[-2]
    left, right = (-1, -1) if window is None else (w if w is not None else -1 for w in window)
    if causal:
        right = 0
    row = torch.arange(n_q)[:, None]
    col = torch.arange(n_k)
    sq = torch.tensor(q_len)[:, None, None, None]
    sk = torch.tensor(k_len)[:, None, None, None]
    key_pad = col[None, None, None, :] >= sk
    hidden = key_pad
    if left >= 0 or right >= 0:
        if left < 0:
            local = col > row + sk - sq + right
        else:
            upper = col > torch.minimum(row + sk - sq + (right if right >= 0 else n_k), sk)
            local = upper | (col < row + sk - sq - left)
        hidden = hidden | local
    k_rep = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    v_rep = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    s = q @ k_rep.transpose(-1, -2) / np.sqrt(q.shape[-1])
    s = s.masked_fill(hidden, -torch.inf)
    p = torch.softmax(s, dim=-1)
    p = p.masked_fill(hidden.all(dim=-1, keepdim=True), 0.0)  # FA: rows that see nothing give 0
    out = p @ v_rep
    q_pad = (torch.arange(n_q)[None, None, :, None] >= sq).expand_as(out)
    return out.masked_fill(q_pad, 0.0)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("window", [None, (2, 1), (3, None), (None, 1), (0, 0)])
@pytest.mark.parametrize("causal", [False, True])
def test_lower_right_matches_flash_attention_per_sequence(kernel, window, causal):
    torch = pytest.importorskip("torch")
    q, k, v, rng = _inputs()
    options = {"is_causal": causal, "window": window, "causal_alignment": "lower_right"}
    (out, lse), pullback = refattn.vjp(
        sdpa, q, k, v, query_lengths=Q_LEN, key_lengths=K_LEN, return_lse=True,
        **options, **kernel,
    )  # fmt: skip
    d_out = rng.standard_normal(out.shape)
    grads = pullback((d_out, None))
    tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
    t_out = _flash_attention_ref(torch, tq, tk, tv, Q_LEN, K_LEN, causal, window)
    t_grads = torch.autograd.grad(t_out, (tq, tk, tv), torch.tensor(d_out))
    assert rel_err(out, t_out.detach().numpy()) <= 1e-13
    for b, n in enumerate(Q_LEN):  # padded rows: fully masked rows
        assert np.all(out[b, :, n:] == 0) and np.all(np.isneginf(lse[b, :, n:]))
    for g, t in zip(grads, t_grads, strict=True):
        # window (0, 0) leaves one key per row: its weight is 1 whatever q is, so dq is 0 in
        # torch and rounding-sized here; compare against the gradients' own scale
        scale = max(x.abs().max().item() for x in t_grads)
        assert np.abs(g - t.numpy()).max() <= 1e-12 * scale


def test_the_issue_batch_differs_from_a_padding_mask_on_purpose():
    """Keys [8, 6]: a padding ``mask`` keeps the arrays' diagonal ``n_k - n_q``, the lengths
    put each sequence on its own; the second sequence differs, the first does not."""
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((2, 1, n, 4)) for n in (4, 8, 8))
    k_len = (8, 6)
    pad = np.arange(8)[None, None, None, :] < np.array(k_len)[:, None, None, None]
    opts = {"is_causal": True, "causal_alignment": "lower_right"}
    by_lengths = sdpa(q, k, v, key_lengths=k_len, **opts)
    by_mask = sdpa(q, k, v, mask=pad, **opts)
    one = sdpa(q[1], k[1, :, :6], v[1, :, :6], **opts)  # the second sequence alone
    assert rel_err(by_lengths[1], one) <= 1e-15
    assert rel_err(by_lengths[0], by_mask[0]) <= 1e-15
    assert rel_err(by_mask[1], one) > 0.1


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize(
    ("causal", "window", "align"),
    list(itertools.product([False, True], [None, (2, 1)], ["upper_left", "lower_right"])),
)
def test_equals_each_sequence_alone(kernel, causal, window, align):
    q, k, v, rng = _inputs(2)
    options = {"is_causal": causal, "window": window, "causal_alignment": align}
    (out, lse), pullback = refattn.vjp(
        sdpa, q, k, v, query_lengths=Q_LEN, key_lengths=K_LEN, return_lse=True,
        **options, **kernel,
    )  # fmt: skip
    d_out = rng.standard_normal(out.shape)
    d_q, d_k, d_v = pullback((d_out, None))
    for b, (n_q, n_k) in enumerate(zip(Q_LEN, K_LEN, strict=True)):
        sq, sk = slice(0, n_q), slice(0, n_k)
        (o_b, l_b), pb = refattn.vjp(
            sdpa, q[b, :, sq], k[b, :, sk], v[b, :, sk], return_lse=True, **options
        )
        g_b = pb((d_out[b, :, sq], None))
        assert rel_err(out[b, :, sq], o_b) <= 1e-14 if n_q else out[b, :, sq].size == 0
        assert np.array_equal(np.isneginf(lse[b, :, sq]), np.isneginf(l_b))
        for got, want, s in ((d_q, g_b[0], sq), (d_k, g_b[1], sk), (d_v, g_b[2], sk)):
            assert np.abs(got[b, :, s] - want).max(initial=0) <= 1e-13
        assert np.all(d_q[b, :, n_q:] == 0) and np.all(d_k[b, :, n_k:] == 0)
        assert np.all(d_v[b, :, n_k:] == 0)


@pytest.mark.parametrize("kernel", KERNELS)
def test_matches_jax_seq_lengths(kernel):
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((3, 7, 2, 4)) for _ in range(3))  # JAX's (B, n, H, d)
    q_len, k_len = np.array([7, 3, 5], np.int32), np.array([7, 2, 6], np.int32)
    j_out = jax.nn.dot_product_attention(
        q, k, v, is_causal=True, query_seq_lengths=q_len, key_value_seq_lengths=k_len
    )
    swap = (0, 2, 1, 3)
    out = sdpa(
        *(np.transpose(x, swap) for x in (q, k, v)), is_causal=True,
        query_lengths=q_len, key_lengths=k_len, **kernel,
    )  # fmt: skip
    # JAX's XLA path runs the softmax in float32 even with x64 on; a wrong length or diagonal
    # is off by 1e-1 and more
    assert rel_err(np.transpose(out, swap), np.asarray(j_out)) <= 1e-6


@pytest.mark.parametrize("kernel", KERNELS)
def test_gradcheck(kernel):
    q, k, v, _ = _inputs(4)
    assert refattn.gradcheck(
        sdpa, q[:3, :2, :5], k[:3, :1, :6], v[:3, :1, :6], query_lengths=(5, 2, 3),
        key_lengths=(6, 4, 1), is_causal=True, causal_alignment="lower_right", **kernel,
    )  # fmt: skip


def test_two_batch_axes_and_array_lengths(xp):
    q, k, v = (randn(xp, (2, 2, 1, n, 3), seed=s) for s, n in enumerate((5, 6, 6)))
    k_len = xp.asarray([[6, 2], [4, 0]])
    got = sdpa(q, k, v, key_lengths=k_len, is_causal=True, causal_alignment="lower_right")
    for a, b in itertools.product(range(2), range(2)):
        n = int(to_numpy(k_len)[a, b])
        got_ab = to_numpy(got[a, b, ...])
        if n == 0:  # no keys: every row fully masked
            assert np.all(got_ab == 0)
            continue
        want = sdpa(q[a, b, ...], k[a, b, :, :n, :], v[a, b, :, :n, :], is_causal=True,
                    causal_alignment="lower_right")  # fmt: skip
        assert rel_err(got_ab, to_numpy(want)) <= 1e-14


@pytest.mark.parametrize(("causal", "window"), [(False, None), (True, None), (True, (256, 0))])
def test_tiled_computes_each_sequence_s_own_tiles(causal, window):
    """The plan of a padded batch computes exactly the tiles of its sequences planned alone."""
    x = np.zeros((3, 1, 1024, 4))
    q_len, k_len = (256, 1024, 384), (512, 640, 384)
    opts = {"is_causal": causal, "window": window, "causal_alignment": "lower_right"}
    pb = problem.prepare(
        x, x, x, query_lengths=q_len, key_lengths=k_len, implementation="tiled", **opts
    )
    alone = [
        make_plan(problem.prepare(x[b, :, :nq], x[b, :, :nk], x[b, :, :nk], **opts), (128, 128))
        for b, (nq, nk) in enumerate(zip(q_len, k_len, strict=True))
    ]
    padded = make_plan(dataclasses.replace(pb, lengths=None), (128, 128))
    assert make_plan(pb, (128, 128)).n_tiles == sum(p.n_tiles for p in alone)
    # the padded call computes padded.n_tiles for each of the 3 sequences: lengths halve that
    assert sum(p.n_tiles for p in alone) < 3 * padded.n_tiles / 2


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"key_lengths": (4, 9)}, ValueError, r"key_lengths must be in \[0, 8\], got 9"),
        ({"query_lengths": (-1, 2)}, ValueError, r"query_lengths must be in \[0, 8\]"),
        ({"key_lengths": (4,)}, ValueError, r"key_lengths must have the batch shape \(2,\)"),
        ({"key_lengths": (4.0, 2.0)}, TypeError, "key_lengths must hold integers"),
        ({"query_lengths": (True, False)}, TypeError, "query_lengths must hold integers"),
        ({"key_lengths": [[4, 2]]}, ValueError, "key_lengths must have the batch shape"),
    ],
)
def test_bad_lengths_are_rejected(options, error, match):
    x = np.zeros((2, 1, 8, 3))
    with pytest.raises(error, match=match):
        sdpa(x, x, x, **options)


def test_multi_head_attention_takes_lengths():
    """MHA on a padded batch: each sequence's rows equal MHA on the sequence alone, gradients
    pass gradcheck, and bad lengths are refused before any projection."""
    params = refattn.init_multi_head_attention(8, 2, seed=5)
    rng = np.random.default_rng(6)
    x, mem = rng.standard_normal((3, 6, 8)), rng.standard_normal((3, 7, 8))
    q_len, k_len = (6, 4, 2), (7, 3, 5)
    opts = {"n_heads": 2, "is_causal": True, "causal_alignment": "lower_right"}
    y = refattn.multi_head_attention(
        params, x, mem, mem, query_lengths=q_len, key_lengths=k_len, **opts
    )
    for b, (nq, nk) in enumerate(zip(q_len, k_len, strict=True)):
        alone = refattn.multi_head_attention(
            params, x[b : b + 1, :nq], mem[b : b + 1, :nk], mem[b : b + 1, :nk], **opts
        )
        assert rel_err(y[b : b + 1, :nq], alone) <= 1e-14
    small = refattn.init_multi_head_attention(4, 2, seed=7)
    assert refattn.gradcheck(
        refattn.multi_head_attention, small, x[:2, :3, :4], mem[:2, :4, :4], mem[:2, :4, :4],
        query_lengths=(3, 1), key_lengths=(2, 4), **opts,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"key_lengths must be in \[0, 7\]"):
        refattn.multi_head_attention(params, x, mem, mem, n_heads=2, key_lengths=(7, 8, 1))
