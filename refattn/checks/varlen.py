"""Check cases for packed variable-length attention (issue 17).

The torch reference is written from FlashAttention's definition of its varlen kernels: each
sequence on its own, softmax over its keys with the causal diagonal at ``n_k - n_q`` of that
sequence (lower-right), rows that see no key giving 0.
"""

from __future__ import annotations

import math

import numpy as np

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
