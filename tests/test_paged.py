"""``paged_attention``: a paged KV cache with block tables and per-sequence lengths.

The reference is each sequence's keys laid out contiguously and attended by SDPA on its own
(with FlashAttention's kvcache causal rule, the diagonal at ``L_b - n_q``); the torch reference
of the check cases (refattn/checks/varlen.py) gathers the pages by torch indexing and lets
autograd scatter the gradients back.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import rel_err

import refattn

paged = refattn.paged_attention
sdpa = refattn.scaled_dot_product_attention


def _pool(seed=0, *, num_blocks=8, h_kv=2, page=4, d=3):
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((num_blocks, h_kv, page, d))
    v = rng.standard_normal((num_blocks, h_kv, page, d))
    return k, v, rng


@pytest.mark.parametrize("kernel", [{}, {"implementation": "tiled", "block_size": 3}])
def test_equals_sdpa_on_each_sequence_s_contiguous_keys(kernel):
    k_cache, v_cache, rng = _pool(1)
    table = np.array([[5, 1, 7], [1, 2, 0], [3, -1, -1]])  # page 1 is shared
    lengths = [11, 6, 2]
    q = rng.standard_normal((3, 4, 2, 3))
    opts = {"is_causal": True, "window": (5, 0), **kernel}
    (out, lse), pullback = refattn.vjp(
        paged,
        q,
        k_cache,
        v_cache,
        block_table=table,
        cache_seqlens=lengths,
        return_lse=True,
        **opts,
    )
    cot = (rng.standard_normal(out.shape), rng.standard_normal(lse.shape))
    d_q, d_k, d_v = pullback(cot)
    ref_dk, ref_dv = np.zeros_like(k_cache), np.zeros_like(v_cache)
    for b, n in enumerate(lengths):
        pages = table[b, : -(-n // 4)]
        kb = np.concatenate(list(k_cache[pages]), axis=1)[:, :n]
        vb = np.concatenate(list(v_cache[pages]), axis=1)[:, :n]
        (o_b, l_b), pull_b = refattn.vjp(
            sdpa, q[b], kb, vb, causal_alignment="lower_right", return_lse=True, **opts
        )
        assert rel_err(out[b], o_b) <= 1e-14 and rel_err(lse[b], l_b) <= 1e-14
        g_q, g_k, g_v = pull_b((cot[0][b], cot[1][b]))
        assert rel_err(d_q[b], g_q) <= 1e-14
        for n_page, t in enumerate(pages):
            rows = slice(4 * n_page, min(4 * n_page + 4, n))
            ref_dk[t, :, : rows.stop - rows.start] += g_k[:, rows]
            ref_dv[t, :, : rows.stop - rows.start] += g_v[:, rows]
    assert rel_err(d_k, ref_dk) <= 1e-14 and rel_err(d_v, ref_dv) <= 1e-14


def test_pages_no_sequence_reads_are_never_touched():
    k_cache, v_cache, rng = _pool(2)
    table = np.array([[0, 4, 6], [2, 6, 3]])
    lengths = [6, 5]  # each reads two pages: 0, 4 and 2, 6
    q = rng.standard_normal((2, 2, 1, 3))
    out, pullback = refattn.vjp(
        paged, q, k_cache, v_cache, block_table=table, cache_seqlens=lengths
    )
    spoiled_k, spoiled_v = k_cache.copy(), v_cache.copy()
    for t in (1, 3, 5, 7):  # unread pages, including page 3 listed past sequence 1's last page
        spoiled_k[t] = np.nan
        spoiled_v[t] = np.nan
    again = paged(q, spoiled_k, spoiled_v, block_table=table, cache_seqlens=lengths)
    assert np.array_equal(out, again)
    _, d_k, d_v = pullback(rng.standard_normal(out.shape))
    assert not d_k[[1, 3, 5, 7]].any() and not d_v[[1, 3, 5, 7]].any()
    assert d_k[[0, 2, 4, 6]].any()


def test_gradcheck_on_every_backend(xp):
    k_cache, v_cache, rng = _pool(3, num_blocks=4, page=2)
    q = rng.standard_normal((2, 2, 2, 3))
    arrays = [xp.asarray(x) for x in (q, k_cache, v_cache)]
    assert refattn.gradcheck(
        paged, *arrays, block_table=[[1, 3], [1, 0]], cache_seqlens=[3, 4], is_causal=True
    )


def test_bad_tables_are_refused_with_the_argument_named():
    k_cache, v_cache, rng = _pool(4)
    q = rng.standard_normal((2, 2, 1, 3))
    ok = {"block_table": [[0, 1], [2, 3]], "cache_seqlens": [5, 8]}
    with pytest.raises(ValueError, match=r"block_table\[1\] names block 8, outside the cache's 8"):
        paged(q, k_cache, v_cache, **{**ok, "block_table": [[0, 1], [2, 8]]})
    with pytest.raises(ValueError, match=r"cache_seqlens\[0\] must be in \[0, 8\]"):
        paged(q, k_cache, v_cache, **{**ok, "cache_seqlens": [9, 8]})
    with pytest.raises(ValueError, match=r"block_table must be \(batch, max_blocks\)"):
        paged(q, k_cache, v_cache, **{**ok, "block_table": [0, 1]})
    with pytest.raises(TypeError, match="cache_seqlens must hold integers"):
        paged(q, k_cache, v_cache, **{**ok, "cache_seqlens": [5.0, 8.0]})
    with pytest.raises(ValueError, match="causal_alignment must be 'lower_right'"):
        paged(q, k_cache, v_cache, causal_alignment="upper_left", **ok)
    with pytest.raises(ValueError, match="mask is not an option here"):
        paged(q, k_cache, v_cache, mask=np.ones((2, 2, 1, 8), bool), **ok)
    with pytest.raises(ValueError, match="k_cache and v_cache must share"):
        paged(q, k_cache, v_cache[:, :, :2], **ok)
