"""Check cases for block-sparse attention (issue 18).

The torch reference is SDPA's formula under the equivalent element mask, written with torch
ops (``masked_fill`` with ``-inf``, ``softmax``, rows that see nothing set to 0), so the block
plan and the tiled kernel are checked against a dense computation.
"""

from __future__ import annotations

import math

import numpy as np

from ..ops.block_sparse import block_sparse_attention, block_sparse_mask
from . import Case, register_case


def _make(q_shape, h_kv, d_v, n_blocks_density, block, **options):
    def make(rng: np.random.Generator):
        *lead, n, d = q_shape
        kv = (*lead[:-1], h_kv, n) if lead else (n,)
        q = rng.standard_normal(q_shape)
        k = rng.standard_normal((*kv, d))
        v = rng.standard_normal((*kv, d_v))
        nb = -(-n // block)
        heads = options.pop("per_head", None)
        shape = (heads, nb, nb) if heads else (nb, nb)
        layout = rng.random(shape) < n_blocks_density
        layout[..., 0, 0] = True
        return (q, k, v), {"layout": layout, "block_size": block, **options}

    return make


def _torch_ref(torch, primals, options):
    q, k, v = primals
    n_q, n_k = q.shape[-2], k.shape[-2]
    layout = options["layout"].cpu().numpy()
    keep = torch.as_tensor(
        block_sparse_mask(
            layout, options["block_size"], n_q, n_k, is_causal=options.get("is_causal", False)
        )
    )
    if q.ndim >= 3 and q.shape[-3] != k.shape[-3]:
        rep = q.shape[-3] // k.shape[-3]
        k = k.repeat_interleave(rep, dim=-3)
        v = v.repeat_interleave(rep, dim=-3)
    s = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~keep, -math.inf)
    any_key = keep.any(-1, keepdim=True)
    p = torch.softmax(torch.where(any_key, s, torch.zeros_like(s)), dim=-1)
    p = torch.where(keep, p, torch.zeros_like(p))
    return p @ v


_CASES = {
    "shared_odd_n": _make((2, 2, 11, 3), 2, 4, 0.5, 3),
    "causal_gqa": _make((1, 4, 10, 3), 2, 3, 0.6, 4, is_causal=True, enable_gqa=True),
    "per_head_gqa": _make((1, 4, 9, 3), 2, 3, 0.5, 3, per_head=4, enable_gqa=True),
}
for _name, _make_fn in _CASES.items():
    register_case(Case(block_sparse_attention, _name, _make_fn, torch_ref=_torch_ref))
