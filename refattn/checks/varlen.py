"""Check cases for packed variable-length attention and the paged KV cache (issue 17).

The torch reference is written from FlashAttention's definition of its varlen kernels: each
sequence on its own, softmax over its keys with the causal diagonal at ``n_k - n_q`` of that
sequence (lower-right), rows that see no key giving 0.
"""

from __future__ import annotations

import math

import numpy as np

from ..ops.paged import paged_attention
from ..ops.varlen import varlen_attention
from . import Case, register_case


def _make(q_lens, k_lens, h_q, h_kv, **options):
    def make(rng: np.random.Generator):
        q = rng.standard_normal((sum(q_lens), h_q, 3))
        k = rng.standard_normal((sum(k_lens), h_kv, 3))
        v = rng.standard_normal((sum(k_lens), h_kv, 2))
        cu_q = tuple(int(x) for x in np.cumsum((0, *q_lens)))
        cu_k = tuple(int(x) for x in np.cumsum((0, *k_lens)))
        return (q, k, v), {"cu_seqlens_q": cu_q, "cu_seqlens_k": cu_k, **options}

    return make


def _torch_ref(torch, primals, options):
    q, k, v = primals
    cu_q, cu_k = options["cu_seqlens_q"], options["cu_seqlens_k"]
    lower_right = options.get("causal_alignment") == "lower_right"
    outs = []
    for b in range(len(cu_q) - 1):
        qb = q[cu_q[b] : cu_q[b + 1]].transpose(0, 1)  # (H, n_q, d)
        kb = k[cu_k[b] : cu_k[b + 1]].transpose(0, 1).repeat_interleave(q.shape[1] // k.shape[1], 0)
        vb = v[cu_k[b] : cu_k[b + 1]].transpose(0, 1).repeat_interleave(q.shape[1] // v.shape[1], 0)
        n_q, n_k = qb.shape[1], kb.shape[1]
        s = qb @ kb.transpose(1, 2) / math.sqrt(q.shape[-1])
        if options.get("is_causal"):
            offset = n_k - n_q if lower_right else 0
            hidden = torch.arange(n_k)[None, :] > torch.arange(n_q)[:, None] + offset
            s = s.masked_fill(hidden, -math.inf)
        p = torch.nan_to_num(torch.softmax(s, dim=-1))  # rows that see nothing: 0
        outs.append((p @ vb).transpose(0, 1))
    return torch.cat(outs, dim=0)


_CASES = {
    "three_sequences": _make((3, 1, 4), (3, 2, 5), 2, 2),
    "causal_lower_right_gqa": _make(
        (2, 4, 3), (5, 4, 1), 4, 2, is_causal=True, causal_alignment="lower_right"
    ),
    "causal_upper_left_empty_sequence": _make((3, 0, 2), (4, 2, 2), 2, 1, is_causal=True),
}
for _name, _make_fn in _CASES.items():
    register_case(Case(varlen_attention, _name, _make_fn, torch_ref=_torch_ref))


def _make_paged(lengths, page, num_blocks, h_q, h_kv, n_q, table, **options):
    def make(rng: np.random.Generator):
        q = rng.standard_normal((len(lengths), h_q, n_q, 3))
        k = rng.standard_normal((num_blocks, h_kv, page, 3))
        v = rng.standard_normal((num_blocks, h_kv, page, 2))
        return (q, k, v), {"block_table": table, "cache_seqlens": lengths, **options}

    return make


def _torch_paged(torch, primals, options):
    """Each sequence's keys gathered from its pages by torch indexing (autograd scatters the
    gradient back), then SDPA with the causal diagonal at ``L_b - n_q``."""
    q, k_cache, v_cache = primals
    table, lengths = options["block_table"], options["cache_seqlens"]
    g = q.shape[1] // k_cache.shape[1]
    outs = []
    for b, n in enumerate(lengths):
        used = list(table[b][: math.ceil(n / k_cache.shape[2])])
        kb = torch.cat([k_cache[t] for t in used], dim=1)[:, :n] if used else k_cache[0, :, :0]
        vb = torch.cat([v_cache[t] for t in used], dim=1)[:, :n] if used else v_cache[0, :, :0]
        kb, vb = kb.repeat_interleave(g, 0), vb.repeat_interleave(g, 0)
        s = q[b] @ kb.transpose(1, 2) / math.sqrt(q.shape[-1])
        if options.get("is_causal"):
            n_q = q.shape[2]
            hidden = torch.arange(n)[None, :] > torch.arange(n_q)[:, None] + n - n_q
            s = s.masked_fill(hidden, -math.inf)
        outs.append(torch.nan_to_num(torch.softmax(s, dim=-1)) @ vb)
    return torch.stack(outs)


_PAGED_CASES = {
    # sequences 0 and 1 share page 2 (a common prefix); entries past the last page are -1
    "shared_prefix_page": _make_paged(
        (7, 5, 0), 3, 6, 2, 2, 2, ((2, 0, 4), (2, 5, -1), (-1, -1, -1))
    ),
    "causal_gqa_decode": _make_paged((5, 8), 4, 4, 4, 2, 1, ((3, 1), (0, 2)), is_causal=True),
    "causal_chunk_tiled": _make_paged(
        (9, 6),
        2,
        10,
        2,
        1,
        3,
        ((9, 8, 7, 6, 5), (0, 1, 2, -1, -1)),
        is_causal=True,
        implementation="tiled",
        block_size=2,
    ),
}
for _name, _make_fn in _PAGED_CASES.items():
    register_case(Case(paged_attention, _name, _make_fn, torch_ref=_torch_paged))
