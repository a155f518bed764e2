"""Check cases for the approximate attention ops of issue 19: XCA, Linformer, Reformer LSH.

The framework references are direct formulas written with the framework's ops:

* XCA: ``normalize`` along the tokens, ``softmax(tau Q^T K) `` and ``V A^T`` (timm's ``XCA``
  with its layout transposed); the layer adds the qkv and output affine maps.
* Linformer: ``E^T K``, ``F^T V``, then a materialized softmax attention (GQA by repeating kv
  heads).
* LSH (torch only): the sort, chunk, look-one-back and logsumexp combination written again in
  torch from the description in :mod:`refattn.ops.lsh` (``torch.sort``, ``gather``), as
  reformer_pytorch does it, so the bucket assignment is computed independently too.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..layers.xca import cross_covariance_attention_layer
from ..ops.linformer import linformer_attention
from ..ops.lsh import SELF_LOGIT, lsh_attention
from ..ops.xca import cross_covariance_attention
from . import Case, register_case

# ----------------------------------------------------------------------------- XCA


def _xca_make(shape: tuple[int, ...]):
    def make(rng: np.random.Generator):
        q, k, v = (rng.standard_normal(shape) for _ in range(3))
        tau = rng.uniform(0.5, 2.0, size=(shape[-3],))
        return (q, k, v, tau), {}

    return make


def _xca_formula(lib: Any, q, k, v, tau, *, norm, softmax, transpose):
    qh = q / norm(q)
    kh = k / norm(k)
    a = softmax((transpose(qh) @ kh) * tau[:, None, None])
    return v @ transpose(a)


def _torch_xca(torch, primals, options):
    def norm(x):
        return torch.sqrt((x * x).sum(-2, keepdim=True))

    return _xca_formula(
        torch,
        *primals,
        norm=norm,
        softmax=lambda s: torch.softmax(s, dim=-1),
        transpose=lambda x: x.transpose(-2, -1),
    )


def _jax_xca(jnp, primals, options):
    import jax

    def norm(x):
        return jnp.sqrt((x * x).sum(-2, keepdims=True))

    return _xca_formula(
        jnp,
        *primals,
        norm=norm,
        softmax=lambda s: jax.nn.softmax(s, axis=-1),
        transpose=lambda x: jnp.swapaxes(x, -1, -2),
    )


for _name, _shape in {"heads": (2, 3, 7, 4), "one_batch_axis_free": (2, 5, 3)}.items():
    register_case(
        Case(
            cross_covariance_attention,
            _name,
            _xca_make(_shape),
            torch_ref=_torch_xca,
            jax_ref=_jax_xca,
            tags=("approx",),
        )
    )


def _xca_layer_make(dim: int, heads: int, n: int, qkv_bias: bool):
    def make(rng: np.random.Generator):
        params = {
            "qkv": {"weight": rng.standard_normal((dim, 3 * dim)) / math.sqrt(dim)},
            "proj": {
                "weight": rng.standard_normal((dim, dim)) / math.sqrt(dim),
                "bias": rng.standard_normal(dim),
            },
            "temperature": rng.uniform(0.5, 2.0, size=(heads,)),
        }
        if qkv_bias:
            params["qkv"]["bias"] = rng.standard_normal(3 * dim)
        return (params, rng.standard_normal((2, n, dim))), {"num_heads": heads}

    return make


def _torch_xca_layer(torch, primals, options):
    params, x = primals
    h = options["num_heads"]
    b, n, c = x.shape
    y = x @ params["qkv"]["weight"]
    if "bias" in params["qkv"]:
        y = y + params["qkv"]["bias"]
    q, k, v = y.reshape(b, n, 3, h, c // h).permute(2, 0, 3, 1, 4).unbind(0)
    o = _torch_xca(torch, (q, k, v, params["temperature"]), {})
    o = o.transpose(1, 2).reshape(b, n, c)
    return o @ params["proj"]["weight"] + params["proj"]["bias"]


register_case(
    Case(
        cross_covariance_attention_layer,
        "timm_layout_bias",
        _xca_layer_make(6, 2, 5, True),
        torch_ref=_torch_xca_layer,
        tags=("approx", "layers"),
    )
)

# ----------------------------------------------------------------------------- Linformer


def _linformer_make(
    q_shape: tuple[int, ...], n: int, p: int, *, kv_heads: int | None = None, per_head=False
):
    def make(rng: np.random.Generator):
        *lead, _, d = q_shape
        kv_lead = [*lead[:-1], kv_heads if kv_heads is not None else lead[-1]]
        q = rng.standard_normal(q_shape)
        k = rng.standard_normal((*kv_lead, n, d))
        v = rng.standard_normal((*kv_lead, n, d + 1))
        proj = (kv_lead[-1], n, p) if per_head else (n, p)
        e, f = rng.standard_normal(proj) / math.sqrt(n), rng.standard_normal(proj) / math.sqrt(n)
        options: dict[str, Any] = {}
        if per_head:
            options["mask"] = rng.random((q_shape[-2], p)) < 0.8
            options["mask"][:, 0] = True
        return (q, k, v, e, f), options

    return make


def _linformer_formula(lib, primals, options, *, softmax, transpose, repeat, where):
    q, k, v, e, f = primals
    kp, vp = transpose(e) @ k, transpose(f) @ v
    g = q.shape[-3] // kp.shape[-3]
    kp, vp = repeat(kp, g), repeat(vp, g)
    s = (q @ transpose(kp)) / math.sqrt(q.shape[-1])
    if options.get("mask") is not None:
        s = where(options["mask"], s, -math.inf)
    return softmax(s) @ vp


def _torch_linformer(torch, primals, options):
    return _linformer_formula(
        torch,
        primals,
        options,
        softmax=lambda s: torch.softmax(s, dim=-1),
        transpose=lambda x: x.transpose(-2, -1),
        repeat=lambda x, g: x.repeat_interleave(g, dim=-3),
        where=torch.where,
    )


def _jax_linformer(jnp, primals, options):
    import jax

    return _linformer_formula(
        jnp,
        primals,
        options,
        softmax=lambda s: jax.nn.softmax(s, axis=-1),
        transpose=lambda x: jnp.swapaxes(x, -1, -2),
        repeat=lambda x, g: jnp.repeat(x, g, axis=-3),
        where=jnp.where,
    )


_LINFORMER_CASES = {
    "shared": _linformer_make((2, 2, 6, 3), 6, 3),
    "per_head_gqa_mask": _linformer_make((1, 4, 5, 2), 7, 3, kv_heads=2, per_head=True),
    "cross_one_kv_head": _linformer_make((1, 2, 3, 2), 8, 4, kv_heads=1),
}
for _name, _make in _LINFORMER_CASES.items():
    register_case(
        Case(
            linformer_attention,
            _name,
            _make,
            torch_ref=_torch_linformer,
            jax_ref=_jax_linformer,
            tags=("approx",),
        )
    )

# ----------------------------------------------------------------------------- LSH


def _lsh_make(shape: tuple[int, ...], n_hashes: int, n_buckets: int, chunk: int, **options):
    def make(rng: np.random.Generator):
        *_, d = shape
        qk = rng.standard_normal(shape)
        v = rng.standard_normal((*shape[:-1], d + 1))
        rotations = rng.standard_normal((d, n_hashes, n_buckets // 2))
        return (qk, v), {"rotations": rotations, "chunk_size": chunk, **options}

    return make


def _torch_lsh(torch, primals, options):
    """Reformer's LSH attention in torch: hash, sort, chunk, look one back, combine rounds."""
    qk, v = primals
    rot = options["rotations"]
    c = options["chunk_size"]
    *lead, n, d = qk.shape
    qk = qk.reshape(-1, n, d)
    v = v.reshape(-1, n, v.shape[-1])
    b, h = qk.shape[0], rot.shape[1]
    y = torch.einsum("btf,fhi->bhti", qk, rot)
    buckets = torch.cat([y, -y], dim=-1).argmax(dim=-1)  # (b, h, n)
    key = buckets * n + torch.arange(n)
    st = key.sort(dim=-1).indices.reshape(b, h * n)  # positions in sorted order
    sq = qk.gather(1, st[..., None].expand(-1, -1, d)).reshape(b, -1, c, d)
    sv = v.gather(1, st[..., None].expand(-1, -1, v.shape[-1])).reshape(b, -1, c, v.shape[-1])
    tq = st.reshape(b, -1, c)

    def back(x):
        return torch.cat([x, torch.roll(x, 1, dims=1)], dim=2)

    sk = back(sq / sq.norm(dim=-1, keepdim=True))
    tk = back(tq)
    scale = options.get("scale") or 1.0 / math.sqrt(d)
    s = (sq @ sk.transpose(-2, -1)) * scale
    s = torch.where(tq[..., :, None] == tk[..., None, :], SELF_LOGIT, s)
    if options.get("is_causal"):
        s = torch.where(tk[..., None, :] > tq[..., :, None], -math.inf, s)
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    o = (torch.exp(s - lse) @ back(sv)).reshape(b, h, n, -1)
    lse = lse.reshape(b, h, n)
    # slot s of round r holds position st[r n + s]: scatter back to (round, position)
    undo = st.reshape(b, h, n).argsort(dim=-1)
    o = o.gather(2, undo[..., None].expand(-1, -1, -1, o.shape[-1]))
    lse = lse.gather(2, undo)
    w = torch.softmax(lse, dim=1)
    return (w[..., None] * o).sum(1).reshape(*lead, n, -1)


_LSH_CASES = {
    "two_rounds": _lsh_make((2, 8, 3), 2, 4, 2),
    "causal_three_rounds": _lsh_make((1, 2, 12, 2), 3, 6, 3, is_causal=True),
    "one_round_scale": _lsh_make((9, 4), 1, 2, 3, scale=0.7),
}
for _name, _make in _LSH_CASES.items():
    register_case(Case(lsh_attention, _name, _make, torch_ref=_torch_lsh, tags=("approx",)))
