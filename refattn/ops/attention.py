r"""Scaled dot-product attention: forward, hand-derived backward, GQA, masks, dropout, LSE.

.. math::

    S = \mathrm{scale}\cdot QK^\top + B,\qquad
    P = \mathrm{softmax}_{\mathrm{kept}}(S),\qquad
    O = (P \circ M_{\mathrm{drop}} / (1 - p))\,V,\qquad
    \mathrm{lse}_i = \log \textstyle\sum_{j\,\mathrm{kept}} e^{S_{ij}} .

Internally every call is put in one *canonical layout* (see :class:`Problem`): queries
``(B, Hkv, g, n_q, d_k)`` where ``g = Hq // Hkv`` query heads share one kv head, keys and values
``(B, Hkv, n_k, d)``. Query head ``h`` is ``(h // g, h % g)``, which is exactly "query head h uses
kv head h // g". Matmuls run on ``(B, Hkv, g * rows, ·)`` so a GQA group shares its K and V
without copying them, and the group's gradients accumulate inside one GEMM.

The work is split into blocks of query rows. Rows are independent in the forward; in the backward
dQ rows are independent and dK, dV are sums over row blocks. On NumPy the blocks run on a thread
pool (NumPy releases the GIL), which puts both cores on the elementwise ``exp``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .._backend import describe, floating_dtype, namespace, parallel_map
from .._op import Op
from .masks import causal_keep, check_alignment
from .softmax import check_broadcast, check_mask, masked_softmax_parts, normalize

__all__ = ["Problem", "prepare", "scaled_dot_product_attention"]

Array = Any

#: rows per block are chosen so a block's score matrix stays near this many bytes
_BLOCK_BYTES = 32 * 2**20


@dataclass
class Problem:
    """A validated attention call in the canonical layout.

    Attributes
    ----------
    q : (B, Hkv, g, n_q, d_k)
    k : (B, Hkv, n_k, d_k)
    v : (B, Hkv, n_k, d_v)
    keep : bool, broadcastable to (B, Hkv, g, n_q, n_k), or None (mask AND causal)
    bias : broadcastable to (B, Hkv, g, n_q, n_k), or None
    drop : dropout multiplier ``mask / (1 - p)`` broadcastable like ``bias``, or None
    scale : Python float
    out_shape, lse_shape, weights_shape : shapes of the user-facing results
    q_shape, k_shape, v_shape : the user's input shapes (for gradients)
    """

    xp: Any
    q: Array
    k: Array
    v: Array
    keep: Array | None
    bias: Array | None
    drop: Array | None
    scale: float
    q_shape: tuple[int, ...]
    k_shape: tuple[int, ...]
    v_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    lse_shape: tuple[int, ...]
    weights_shape: tuple[int, ...]

    @property
    def n_q(self) -> int:
        return int(self.q.shape[3])

    @property
    def n_k(self) -> int:
        return int(self.k.shape[2])

    def rows(self, x: Array | None, r0: int, r1: int) -> Array | None:
        """Rows ``r0:r1`` of a canonical ``(·, ·, ·, n_q or 1, ·)`` array (None passes)."""
        if x is None or x.shape[3] == 1:
            return x
        return x[:, :, :, r0:r1, ...]

    def row_blocks(self, n_blocks: int | None = None) -> list[tuple[int, int]]:
        """Split ``range(n_q)`` into contiguous blocks for :func:`parallel_map`."""
        n_q = self.n_q
        if n_q == 0:
            return []
        per_row = max(1, math.prod(self.q.shape[:3]) * self.n_k * 8)
        by_memory = math.ceil(n_q * per_row / _BLOCK_BYTES)
        from .._backend import n_threads

        if n_blocks is None:
            n_blocks = max(by_memory, n_threads()) if _is_threaded(self.xp) else by_memory
        n_blocks = max(1, min(n_q, n_blocks))
        step = math.ceil(n_q / n_blocks)
        return [(r, min(r + step, n_q)) for r in range(0, n_q, step)]


def _is_threaded(xp: Any) -> bool:
    from array_api_compat import is_numpy_namespace

    return is_numpy_namespace(xp)


# ----------------------------------------------------------------------------- validation


def prepare(
    q: Array,
    k: Array,
    v: Array,
    *,
    mask: Array | None = None,
    bias: Array | None = None,
    is_causal: bool = False,
    causal_alignment: str = "upper_left",
    scale: float | None = None,
    dropout_mask: Array | None = None,
    dropout_p: float = 0.0,
    op: str = "scaled_dot_product_attention",
) -> Problem:
    """Validate an attention call and put it in the canonical layout (no compute on scores)."""
    xp = namespace(q, k, v, mask, bias, dropout_mask)
    dtype = floating_dtype(xp, {"q": q, "k": k, "v": v})
    if bias is not None:
        floating_dtype(xp, {"q": q, "bias": bias})
    name = f"{op}:"
    if q.ndim < 2 or q.ndim != k.ndim or q.ndim != v.ndim:
        raise ValueError(
            f"refattn.{op}: q, k and v must have the same number of dimensions (at least 2: "
            f"(..., H, n, d) or (n, d)), got q {describe(q)}, k {describe(k)}, v {describe(v)}"
        )
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"refattn.{op}: k's last dimension (d_k) must equal q's, got q {tuple(q.shape)} and "
            f"k {tuple(k.shape)}"
        )
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(
            f"refattn.{op}: k and v must have the same number of keys (axis -2), got "
            f"k {tuple(k.shape)} and v {tuple(v.shape)}"
        )
    two_d = q.ndim == 2
    batch = tuple(q.shape[:-3])
    if tuple(k.shape[:-3]) != batch or tuple(v.shape[:-3]) != batch:
        raise ValueError(
            f"refattn.{op}: q, k and v must share their batch dimensions (all axes before the "
            f"head axis -3), got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    h_q = 1 if two_d else int(q.shape[-3])
    h_kv = 1 if two_d else int(k.shape[-3])
    if not two_d and v.shape[-3] != h_kv:
        raise ValueError(
            f"refattn.{op}: k and v must have the same number of heads (axis -3), got "
            f"k {tuple(k.shape)} and v {tuple(v.shape)}"
        )
    if h_kv == 0 or h_q % h_kv:
        raise ValueError(
            f"refattn.{op}: the number of query heads ({h_q}) must be a multiple of the number "
            f"of key/value heads ({h_kv}) for grouped-query attention"
        )
    g = h_q // h_kv
    n_q, d_k = int(q.shape[-2]), int(q.shape[-1])
    n_k, d_v = int(k.shape[-2]), int(v.shape[-1])
    scores_shape = (*batch, h_q, n_q, n_k) if not two_d else (n_q, n_k)
    if not isinstance(is_causal, bool):
        raise TypeError(f"refattn.{op}: is_causal must be a bool, got {is_causal!r}")
    check_alignment(causal_alignment)
    scale = _check_scale(op, scale, d_k)
    if mask is not None:
        check_mask(xp, f"{name} mask", mask, scores_shape)
    if bias is not None:
        check_broadcast(f"{name} bias", bias, scores_shape)
    drop = _dropout_multiplier(xp, op, dropout_mask, dropout_p, dtype, scores_shape)

    b_flat = math.prod(batch)
    canon = _Canonicalizer(batch, h_q, h_kv, two_d, xp)
    keep = canon(mask) if mask is not None else None
    if is_causal:
        causal = causal_keep(xp, n_q, n_k, causal_alignment, getattr(q, "device", None))
        causal = xp.reshape(causal, (1, 1, 1, n_q, n_k))
        keep = causal if keep is None else xp.logical_and(keep, causal)
    return Problem(
        xp=xp,
        q=xp.reshape(q, (b_flat, h_kv, g, n_q, d_k)),
        k=xp.reshape(k, (b_flat, h_kv, n_k, d_k)),
        v=xp.reshape(v, (b_flat, h_kv, n_k, d_v)),
        keep=keep,
        bias=canon(bias) if bias is not None else None,
        drop=canon(drop) if drop is not None else None,
        scale=scale,
        q_shape=tuple(q.shape),
        k_shape=tuple(k.shape),
        v_shape=tuple(v.shape),
        out_shape=(*tuple(q.shape[:-1]), d_v),
        lse_shape=tuple(q.shape[:-1]),
        weights_shape=scores_shape,
    )


def _check_scale(op: str, scale: Any, d_k: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(d_k) if d_k else 1.0
    try:
        value = float(scale)
    except (TypeError, ValueError):
        raise TypeError(f"refattn.{op}: scale must be a real number, got {scale!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"refattn.{op}: scale must be finite, got {scale!r}")
    return value  # a Python float: float32 inputs stay float32 under NumPy 2's promotion rules


def _dropout_multiplier(
    xp: Any,
    op: str,
    dropout_mask: Array | None,
    dropout_p: float,
    dtype: Any,
    scores_shape: tuple[int, ...],
) -> Array | None:
    try:
        p = float(dropout_p)
    except (TypeError, ValueError):
        raise TypeError(f"refattn.{op}: dropout_p must be a float, got {dropout_p!r}") from None
    if not 0.0 <= p < 1.0:
        raise ValueError(f"refattn.{op}: dropout_p must be in [0, 1), got {dropout_p!r}")
    if dropout_mask is None:
        if p > 0.0:
            raise ValueError(
                f"refattn.{op}: dropout_p={p} needs an explicit dropout_mask (True/1 = keep); "
                "refattn ops draw no random numbers"
            )
        return None
    check_broadcast(f"{op}: dropout_mask", dropout_mask, scores_shape)
    if dropout_mask.dtype == xp.bool:
        keep = xp.astype(dropout_mask, dtype)
    elif xp.isdtype(dropout_mask.dtype, "real floating"):
        keep = xp.astype(dropout_mask, dtype)
    else:
        raise TypeError(
            f"refattn.{op}: dropout_mask must be boolean or floating (1 = keep), "
            f"got {dropout_mask.dtype}"
        )
    return keep * (1.0 / (1.0 - p))


class _Canonicalizer:
    """Reshape an array broadcastable to ``(*batch, Hq, n_q, n_k)`` canonically.

    The result has shape ``(B|1, Hkv|1, g|1, n_q|1, n_k|1)``.
    """

    def __init__(self, batch: tuple[int, ...], h_q: int, h_kv: int, two_d: bool, xp: Any) -> None:
        self.batch, self.h_q, self.h_kv, self.two_d, self.xp = batch, h_q, h_kv, two_d, xp

    def __call__(self, x: Array) -> Array:
        xp = self.xp
        full_ndim = 2 if self.two_d else len(self.batch) + 3
        x = xp.reshape(x, (1,) * (full_ndim - x.ndim) + tuple(x.shape))
        if self.two_d:
            return xp.reshape(x, (1, 1, 1, *x.shape))
        nb = len(self.batch)
        lead = tuple(x.shape[:nb])
        if any(s != 1 for s in lead):
            x = xp.broadcast_to(x, (*self.batch, *x.shape[nb:]))
            b = math.prod(self.batch)
        else:
            b = 1
        heads, rows, cols = x.shape[nb:]
        if heads == 1:
            h = (1, 1)
        else:
            h = (self.h_kv, self.h_q // self.h_kv)
        return xp.reshape(x, (b, *h, rows, cols))


# ----------------------------------------------------------------------------- kernels


def _merge_group(xp: Any, x: Array) -> Array:
    """``(B, Hkv, g, r, d) -> (B, Hkv, g * r, d)``."""
    b, h, g, r, d = x.shape
    return xp.reshape(x, (b, h, g * r, d))


def _forward_block(pb: Problem, r0: int, r1: int) -> tuple[Array, Array, Array]:
    """Rows ``r0:r1`` of the forward: ``(O, P, lse)``.

    Shapes ``(B, Hkv, g, r, d_v)``, ``(B, Hkv, g, r, n_k)`` and ``(B, Hkv, g, r)``.
    """
    xp = pb.xp
    q = pb.rows(pb.q, r0, r1)
    b, h, g, r, _ = q.shape
    s = _merge_group(xp, q * pb.scale) @ xp.matrix_transpose(pb.k)
    s = xp.reshape(s, (b, h, g, r, pb.n_k))
    bias = pb.rows(pb.bias, r0, r1)
    if bias is not None:
        s = s + bias
    e, total, shift = masked_softmax_parts(s, axis=-1, keep=pb.rows(pb.keep, r0, r1), xp=xp)
    p = normalize(e, total, xp=xp)
    positive = total > 0
    safe = xp.where(positive, total, xp.ones_like(total))
    lse = xp.where(positive, shift + xp.log(safe), -float("inf"))[..., 0]
    drop = pb.rows(pb.drop, r0, r1)
    pd = p if drop is None else p * drop
    o = xp.reshape(xp.reshape(pd, (b, h, g * r, pb.n_k)) @ pb.v, (b, h, g, r, -1))
    return o, p, lse


def forward_materialized(pb: Problem) -> tuple[Array, Array, Array]:
    """The whole forward: ``(O, P, lse)`` in the canonical layout."""
    xp = pb.xp
    blocks = pb.row_blocks()
    results = parallel_map(xp, lambda rr: _forward_block(pb, *rr), blocks)
    if len(results) == 1:
        return results[0]
    return tuple(xp.concat([res[i] for res in results], axis=3) for i in range(3))


def _backward_block(
    pb: Problem,
    p: Array,
    o: Array,
    d_o: Array | None,
    d_p: Array | None,
    d_lse: Array | None,
    r0: int,
    r1: int,
) -> tuple[Array, Array, Array, Array]:
    """Rows ``r0:r1`` of the backward: ``(dQ rows, dK part, dV part, dS rows)``."""
    xp = pb.xp
    q = pb.rows(pb.q, r0, r1)
    b, h, g, r, _ = q.shape
    p = p[:, :, :, r0:r1, :]
    drop = pb.rows(pb.drop, r0, r1)
    pd = p if drop is None else p * drop
    d_scores = xp.zeros_like(p)
    d_v = xp.zeros_like(pb.v)
    if d_o is not None:
        d_o = d_o[:, :, :, r0:r1, :]
        d_o_m = _merge_group(xp, d_o)
        d_v = xp.matrix_transpose(xp.reshape(pd, (b, h, g * r, pb.n_k))) @ d_o_m
        d_pd = xp.reshape(d_o_m @ xp.matrix_transpose(pb.v), p.shape)
        d_prob = d_pd if drop is None else d_pd * drop
        # Delta = rowsum(dP o P) = rowsum(dO o O): the O(n d) form of the softmax VJP's sum.
        delta = xp.sum(d_o * o[:, :, :, r0:r1, :], axis=-1, keepdims=True)
        d_scores = p * (d_prob - delta)
    if d_p is not None:
        d_p = d_p[:, :, :, r0:r1, :]
        d_scores = d_scores + p * (d_p - xp.sum(d_p * p, axis=-1, keepdims=True))
    if d_lse is not None:
        d_scores = d_scores + d_lse[:, :, :, r0:r1, None] * p
    d_s_m = xp.reshape(d_scores, (b, h, g * r, pb.n_k))
    d_q = xp.reshape(d_s_m @ pb.k, q.shape) * pb.scale
    d_k = (xp.matrix_transpose(d_s_m) @ _merge_group(xp, q)) * pb.scale
    return d_q, d_k, d_v, d_scores


def backward_materialized(
    pb: Problem, p: Array, o: Array, d_o: Array | None, d_p: Array | None, d_lse: Array | None
) -> tuple[Array, Array, Array, Array]:
    r"""The whole backward in the canonical layout: ``(dQ, dK, dV, dS)``.

    ``dS`` is the gradient with respect to the (biased) scores ``S``, i.e. the bias gradient
    before broadcasting is undone.
    """
    xp = pb.xp
    blocks = pb.row_blocks()
    parts = parallel_map(xp, lambda rr: _backward_block(pb, p, o, d_o, d_p, d_lse, *rr), blocks)
    if len(parts) == 1:
        return parts[0]
    d_q = xp.concat([part[0] for part in parts], axis=3)
    d_s = xp.concat([part[3] for part in parts], axis=3)
    d_k = parts[0][1]
    d_v = parts[0][2]
    for part in parts[1:]:
        d_k = d_k + part[1]
        d_v = d_v + part[2]
    return d_q, d_k, d_v, d_s


# ----------------------------------------------------------------------------- the op


def _sdpa_fwd(
    q: Array,
    k: Array,
    v: Array,
    /,
    *,
    mask: Array | None = None,
    bias: Array | None = None,
    is_causal: bool = False,
    causal_alignment: str = "upper_left",
    scale: float | None = None,
    dropout_mask: Array | None = None,
    dropout_p: float = 0.0,
    return_weights: bool = False,
    return_lse: bool = False,
) -> tuple[Any, Any]:
    r"""Scaled dot-product attention, the float64 reference.

    .. math::

        O = \bigl(\mathrm{softmax}(\mathrm{scale}\cdot QK^\top + \mathrm{bias},
        \ \mathrm{mask}) \circ \mathrm{dropout\_mask} / (1 - p)\bigr) V

    Parameters
    ----------
    q : (..., Hq, n_q, d_k)
        Queries; ``(n_q, d_k)`` and ``(Hq, n_q, d_k)`` work too.
    k : (..., Hkv, n_k, d_k)
    v : (..., Hkv, n_k, d_v)
        ``Hq`` must be a multiple of ``Hkv``; query head ``h`` uses kv head ``h // (Hq // Hkv)``
        (GQA; ``Hkv = 1`` is MQA). The batch axes ``...`` must be equal.
    mask : bool, broadcastable to (..., Hq, n_q, n_k)
        True = attend (the ``torch.nn.functional.scaled_dot_product_attention`` and
        ``jax.nn.dot_product_attention`` meaning).
    bias : float, broadcastable to (..., Hq, n_q, n_k)
        Added to the scaled scores (ALiBi, relative positions, torch's float ``attn_mask``).
    is_causal : bool
        Also mask keys after the query, aligned by ``causal_alignment``.
    causal_alignment : {"upper_left", "lower_right"}
        "upper_left" (torch and JAX): key ``j`` is visible to query ``i`` iff ``j <= i``.
        "lower_right" (FlashAttention): iff ``j <= i + n_k - n_q``.
    scale : float, optional
        Defaults to ``1 / sqrt(d_k)``.
    dropout_mask : bool or float, broadcastable to (..., Hq, n_q, n_k)
        True/1 = keep. Kept weights are multiplied by ``1 / (1 - dropout_p)``. There is no RNG in
        refattn's ops: the caller draws the mask, so results are reproducible.
    dropout_p : float in [0, 1)
    return_weights : bool
        Also return the attention weights ``P`` (..., Hq, n_q, n_k), **before** dropout.
    return_lse : bool
        Also return the per-row log-sum-exp of the scaled, biased, masked scores
        (..., Hq, n_q); ``-inf`` for a fully masked row.

    Returns
    -------
    out : (..., Hq, n_q, d_v), or the tuple ``(out, weights?, lse?)`` with the requested extras
        in that order. Fully masked query rows give ``out = 0`` and ``weights = 0``, and their
        gradients are 0.
    """
    pb = prepare(
        q,
        k,
        v,
        mask=mask,
        bias=bias,
        is_causal=is_causal,
        causal_alignment=causal_alignment,
        scale=scale,
        dropout_mask=dropout_mask,
        dropout_p=dropout_p,
    )
    o, p, lse = forward_materialized(pb)
    xp = pb.xp
    out = xp.reshape(o, pb.out_shape)
    extras = []
    if return_weights:
        extras.append(xp.reshape(p, pb.weights_shape))
    if return_lse:
        extras.append(xp.reshape(lse, pb.lse_shape))
    result = (out, *extras) if extras else out
    return result, (pb, p, o)


def _sdpa_bwd(
    residuals: Any,
    cotangent: Any,
    /,
    *,
    return_weights: bool = False,
    return_lse: bool = False,
    **_: Any,
) -> tuple[Array, Array, Array]:
    r"""VJP of scaled dot-product attention.

    With :math:`\tilde P = P \circ M / (1-p)` the dropped weights and upstream cotangents
    :math:`dO` (and optionally :math:`dP^{ext}` for the returned weights, :math:`d\ell` for the
    LSE):

    .. math::

        dV &= \tilde P^\top dO, \qquad
        dP = (dO\,V^\top) \circ M/(1-p) \;(+\, dP^{ext}), \\
        dS_{ij} &= P_{ij}\,\bigl(dP_{ij} - \Delta_i\bigr) + d\ell_i P_{ij}, \qquad
        \Delta_i = \textstyle\sum_j P_{ij} dP_{ij} = \sum_c dO_{ic} O_{ic}
        \;(+\,\sum_j P_{ij} dP^{ext}_{ij}), \\
        dQ &= \mathrm{scale}\cdot dS\,K, \qquad dK = \mathrm{scale}\cdot dS^\top Q .

    ``dS = P o (dP - Delta)`` is the softmax VJP row by row; ``d lse_i / d S_ij = P_ij``. With
    GQA, the rows of a group are stacked as ``(g * n_q)`` rows against one K, so ``dK`` and
    ``dV`` sum the group's contributions inside the GEMM. Masked entries have ``P = 0``, hence
    ``dS = 0`` there, and a fully masked row contributes nothing.
    """
    pb, p, o = residuals
    xp = pb.xp
    cts = list(cotangent) if isinstance(cotangent, tuple) else [cotangent]
    d_out = cts.pop(0)
    d_w = cts.pop(0) if return_weights else None
    d_lse = cts.pop(0) if return_lse else None
    canon_shape = tuple(p.shape)
    d_o = None if d_out is None else xp.reshape(d_out, tuple(o.shape))
    d_p = None if d_w is None else xp.reshape(d_w, canon_shape)
    d_l = None if d_lse is None else xp.reshape(d_lse, canon_shape[:-1])
    d_q, d_k, d_v, _ = backward_materialized(pb, p, o, d_o, d_p, d_l)
    return (
        xp.reshape(d_q, pb.q_shape),
        xp.reshape(d_k, pb.k_shape),
        xp.reshape(d_v, pb.v_shape),
    )


scaled_dot_product_attention = Op(
    _sdpa_fwd, _sdpa_bwd, name="scaled_dot_product_attention", register=True
)
