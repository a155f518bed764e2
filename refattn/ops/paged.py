r"""Attention over a paged KV cache: block tables and per-sequence lengths (vLLM, FlashAttention's
``flash_attn_with_kvcache(..., block_table=, cache_seqlens=)``).

The cache is a pool of fixed-size pages, ``k_cache (num_blocks, Hkv, page, d_k)`` and ``v_cache``
alike (refattn's heads-first layout: FlashAttention's ``(num_blocks, page, Hkv, d)`` is this
with axes 1 and 2 swapped). Sequence ``b`` owns the pages ``block_table[b, 0], block_table[b, 1],
...`` in that order; its keys are their rows concatenated, the first ``cache_seqlens[b]`` of them:

.. math::

    K_b = \bigl[\,K^{\mathrm{cache}}_{t_{b,0}};\ K^{\mathrm{cache}}_{t_{b,1}};\ \dots\bigr]_{0:L_b},
    \qquad O_b = \mathrm{SDPA}(Q_b, K_b, V_b),

with the new queries ``Q_b`` the last ``n_q`` tokens of the sequence: under ``is_causal`` query
``i`` sees key ``j`` iff ``j <= i + L_b - n_q`` (FlashAttention's kvcache rule; refattn's
``causal_alignment="lower_right"`` with ``key_lengths``). Pages may be shared between sequences
(a common prompt prefix), and table entries past a sequence's last page are never read (vLLM
pads them with anything).

Backward. The gather is linear, so ``dK^cache`` is the scatter-add of each sequence's
``dK_b`` rows into the pages they came from (a shared page sums the gradients of every
sequence that read it); ``dQ`` is SDPA's. Computed as one padded SDPA call with
``key_lengths = cache_seqlens`` (the tiled kernel skips the padding).
"""

from __future__ import annotations

import math
from typing import Any

from .._backend import describe, device_of, namespace, to_host
from .._op import Op
from .sdpa import refuse_options, scaled_dot_product_attention

__all__ = ["paged_attention"]

Array = Any

_OP = "paged_attention"


def _check_tables(
    block_table: Any, cache_seqlens: Any, batch: int, num_blocks: int, page: int
) -> tuple[list[list[int]], list[int]]:
    """Host ints: each sequence's pages (the ones its length reads) and its length."""
    import numpy as np  # host-side index data only, like cu_seqlens

    table = to_host(block_table)
    lengths = to_host(cache_seqlens)
    for name, x in (("block_table", table), ("cache_seqlens", lengths)):
        if x.dtype == np.bool_ or not np.issubdtype(x.dtype, np.integer):
            raise TypeError(f"refattn.{_OP}: {name} must hold integers, got dtype {x.dtype}")
    if table.ndim != 2 or table.shape[0] != batch:
        raise ValueError(
            f"refattn.{_OP}: block_table must be (batch, max_blocks) = ({batch}, ...), got "
            f"shape {tuple(table.shape)}"
        )
    if lengths.shape != (batch,):
        raise ValueError(
            f"refattn.{_OP}: cache_seqlens must be ({batch},), one length per sequence, got "
            f"shape {tuple(lengths.shape)}"
        )
    capacity = int(table.shape[1]) * page
    pages, lens = [], []
    for b in range(batch):
        n = int(lengths[b])
        if not 0 <= n <= capacity:
            raise ValueError(
                f"refattn.{_OP}: cache_seqlens[{b}] must be in [0, {capacity}] (max_blocks * "
                f"page_size), got {n}"
            )
        used = [int(t) for t in table[b, : math.ceil(n / page)]]
        bad = [t for t in used if not 0 <= t < num_blocks]
        if bad:
            raise ValueError(
                f"refattn.{_OP}: block_table[{b}] names block {bad[0]}, outside the cache's "
                f"{num_blocks} blocks (entries past a sequence's last page are not read)"
            )
        pages.append(used)
        lens.append(n)
    return pages, lens


def _paged_fwd(
    q: Array,
    k_cache: Array,
    v_cache: Array,
    /,
    *,
    block_table: Any,
    cache_seqlens: Any,
    return_lse: bool = False,
    **options: Any,
) -> tuple[Any, Any]:
    r"""SDPA of new queries against each sequence's pages of a paged KV cache.

    Parameters
    ----------
    q : (B, Hq, n_q, d_k)
        The new queries of each sequence (its last ``n_q`` tokens).
    k_cache : (num_blocks, Hkv, page_size, d_k)
    v_cache : (num_blocks, Hkv, page_size, d_v)
        The page pool. ``Hq`` a multiple of ``Hkv`` (GQA).
    block_table : (B, max_blocks) ints
        Sequence ``b``'s pages in order; entries past its last page are ignored. Read on the
        host (any backend's array, or a sequence).
    cache_seqlens : (B,) ints
        Keys of each sequence in the cache, ``<= max_blocks * page_size``.
    return_lse : bool
        Also return the LSE ``(B, Hq, n_q)``.
    **options
        Options of :func:`~refattn.scaled_dot_product_attention` that act per sequence:
        ``is_causal`` (aligned as the module docstring says: ``causal_alignment`` is
        "lower_right" here, FlashAttention's), ``window``, ``softcap``, ``scale``,
        ``sink_tokens``, ``implementation``, ``block_size``, ``memory_budget``.

    Returns
    -------
    out : (B, Hq, n_q, d_v), or ``(out, lse)``
    """
    xp = namespace(q, k_cache, v_cache)
    refuse_options(
        _OP,
        options,
        ("mask", "bias", "dropout_mask", "query_lengths", "key_lengths", "sinks"),
        "gather the keys and call scaled_dot_product_attention for it",
        "the weights of gathered pages",
    )
    alignment = options.pop("causal_alignment", "lower_right")
    if alignment != "lower_right":
        raise ValueError(
            f"refattn.{_OP}: the new queries are the last tokens of each sequence, so "
            f"causal_alignment must be 'lower_right', got {alignment!r}"
        )
    if q.ndim != 4 or k_cache.ndim != 4 or v_cache.ndim != 4:
        raise ValueError(
            f"refattn.{_OP}: q must be (B, Hq, n_q, d) and the caches (num_blocks, Hkv, "
            f"page_size, d), got q {describe(q)}, k_cache {describe(k_cache)}, v_cache "
            f"{describe(v_cache)}"
        )
    if tuple(k_cache.shape[:3]) != tuple(v_cache.shape[:3]):
        raise ValueError(
            f"refattn.{_OP}: k_cache and v_cache must share (num_blocks, Hkv, page_size), got "
            f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    batch = int(q.shape[0])
    num_blocks, h_kv, page = (int(n) for n in k_cache.shape[:3])
    pages, lens = _check_tables(block_table, cache_seqlens, batch, num_blocks, page)
    n_k = max((len(p) for p in pages), default=0) * page

    def gather(cache: Array) -> Array:
        """``(B, Hkv, n_k, d)``: each sequence's pages in order, zeros past its last one."""
        d, device = int(cache.shape[-1]), device_of(cache)
        if n_k == 0:  # no sequence has a key (or there are no sequences)
            return xp.zeros((batch, h_kv, 0, d), dtype=cache.dtype, device=device)
        rows = []
        for used in pages:
            blocks = [cache[t, ...] for t in used]
            if len(used) < n_k // page:
                pad = (h_kv, n_k - len(used) * page, d)
                blocks.append(xp.zeros(pad, dtype=cache.dtype, device=device))
            rows.append(xp.concat(blocks, axis=-2))
        return xp.stack(rows)

    k, v = gather(k_cache), gather(v_cache)
    (out, lse), residuals = scaled_dot_product_attention.forward(
        q,
        k,
        v,
        key_lengths=lens,
        causal_alignment="lower_right",
        return_lse=True,
        **options,
    )
    saved = (residuals, pages, page, xp, k_cache, v_cache)
    return ((out, lse) if return_lse else out), saved


def _paged_bwd(saved: Any, cotangent: Any, /, *, return_lse: bool = False) -> tuple:
    """SDPA's backward, then each sequence's key and value rows added into their pages."""
    residuals, pages, page, xp, k_cache, v_cache = saved
    d_out, d_lse = cotangent if return_lse else (cotangent, None)
    d_q, d_k, d_v = scaled_dot_product_attention.apply_backward(
        residuals, (d_out, d_lse), return_lse=True
    )
    d_k_cache, d_v_cache = xp.zeros_like(k_cache), xp.zeros_like(v_cache)
    for b, used in enumerate(pages):
        for n, t in enumerate(used):  # a Python loop: the array API has no scatter-add
            rows = slice(n * page, (n + 1) * page)
            d_k_cache[t, ...] = d_k_cache[t, ...] + d_k[b, :, rows, :]
            d_v_cache[t, ...] = d_v_cache[t, ...] + d_v[b, :, rows, :]
    return d_q, d_k_cache, d_v_cache


paged_attention = Op(_paged_fwd, _paged_bwd, name="paged_attention", register=True)
