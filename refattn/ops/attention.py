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

from .._backend import (
    describe,
    exp_inplace,
    floating_dtype,
    itemsize,
    n_threads,
    namespace,
    parallel_map,
)
from .._op import Op
from .masks import causal_keep, check_alignment
from .softmax import check_broadcast, check_mask, slice_max

__all__ = ["Problem", "prepare", "scaled_dot_product_attention"]

Array = Any

#: NumPy: rows per block are chosen so a block's score matrix is about this many bytes
_BLOCK_BYTES = 4 * 2**20
#: other backends (CuPy, array-api-strict): the largest score block computed at once
_DEVICE_BLOCK_BYTES = 1024 * 2**20


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

    def result(
        self, o: Array, weights: Array | None, lse: Array, *, return_lse: bool
    ) -> Array | tuple[Array, ...]:
        """The user-facing result from canonical ``O``, ``P`` (None if not requested), ``lse``:
        ``out``, or ``(out, weights?, lse?)``."""
        xp = self.xp
        extras = []
        if weights is not None:
            extras.append(xp.reshape(weights, self.weights_shape))
        if return_lse:
            extras.append(xp.reshape(lse, self.lse_shape))
        out = xp.reshape(o, self.out_shape)
        return (out, *extras) if extras else out

    def cotangents(
        self, cotangent: Any, *, return_weights: bool, return_lse: bool
    ) -> tuple[Array | None, Array | None, Array | None]:
        """Split a cotangent into canonical ``(dO, dP, dlse)``, None for absent parts."""
        xp = self.xp
        cts = list(cotangent) if isinstance(cotangent, tuple) else [cotangent]
        d_out = cts.pop(0)
        d_w = cts.pop(0) if return_weights else None
        d_lse = cts.pop(0) if return_lse else None
        rows = tuple(self.q.shape[:4])
        return (
            None if d_out is None else xp.reshape(d_out, (*rows, self.v.shape[-1])),
            None if d_w is None else xp.reshape(d_w, (*rows, self.n_k)),
            None if d_lse is None else xp.reshape(d_lse, rows),
        )

    def gradients(self, d_q: Array, d_k: Array, d_v: Array) -> tuple[Array, Array, Array]:
        """Canonical gradients back in the user's shapes."""
        xp = self.xp
        return (
            xp.reshape(d_q, self.q_shape),
            xp.reshape(d_k, self.k_shape),
            xp.reshape(d_v, self.v_shape),
        )

    def row_blocks(self) -> list[tuple[int, int]]:
        """Split ``range(n_q)`` into contiguous row blocks for :func:`parallel_map`.

        On NumPy a block's score matrix is about :data:`_BLOCK_BYTES` (it stays in cache through
        the softmax's passes) and there are at least two blocks per thread; other backends take
        the rows in as few blocks as :data:`_DEVICE_BLOCK_BYTES` allows.
        """
        n_q = self.n_q
        if n_q == 0:
            return []
        elem_bytes = itemsize(self.xp, self.q.dtype)
        row_bytes = max(1, math.prod(self.q.shape[:3]) * self.n_k * elem_bytes)
        if row_bytes * n_q <= _BLOCK_BYTES // 4:  # small: threads would cost more than they save
            return [(0, n_q)]
        if _is_threaded(self.xp):
            rows = max(1, _BLOCK_BYTES // row_bytes)
            rows = min(rows, max(1, math.ceil(n_q / (2 * n_threads()))))
        else:
            rows = max(1, _DEVICE_BLOCK_BYTES // row_bytes)
        return [(r, min(r + rows, n_q)) for r in range(0, n_q, rows)]


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


def dropout_scale(op: str, dropout_p: Any) -> float:
    """``1 / (1 - dropout_p)`` after checking ``0 <= dropout_p < 1``."""
    try:
        p = float(dropout_p)
    except (TypeError, ValueError):
        raise TypeError(f"refattn.{op}: dropout_p must be a float, got {dropout_p!r}") from None
    if not 0.0 <= p < 1.0:
        raise ValueError(f"refattn.{op}: dropout_p must be in [0, 1), got {dropout_p!r}")
    return 1.0 / (1.0 - p)


def _dropout_multiplier(
    xp: Any,
    op: str,
    dropout_mask: Array | None,
    dropout_p: float,
    dtype: Any,
    scores_shape: tuple[int, ...],
) -> Array | None:
    scale = dropout_scale(op, dropout_p)
    p = float(dropout_p)
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
    return keep * scale


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


@dataclass
class Block:
    """Saved forward state of query rows ``r0:r1``.

    ``e = exp(S - shift)`` (0 where masked) is kept unnormalised with ``inv_l = 1 / rowsum(e)``
    (0 for a fully masked row), so that ``P = e * inv_l``. Normalising lazily saves one pass over
    the scores in the forward, and costs nothing in the backward: ``1/l`` is folded into the
    ``(rows, d)`` operands of the GEMMs instead.
    """

    r0: int
    r1: int
    e: Array  # (B, Hkv, g, r, n_k)
    inv_l: Array  # (B, Hkv, g, r, 1)

    def weights(self) -> Array:
        return self.e * self.inv_l


def _merge_group(xp: Any, x: Array) -> Array:
    """``(B, Hkv, g, r, d) -> (B, Hkv, g * r, d)``."""
    b, h, g, r, d = x.shape
    return xp.reshape(x, (b, h, g * r, d))


def _forward_block(pb: Problem, r0: int, r1: int) -> tuple[Array, Block, Array]:
    """Rows ``r0:r1`` of the forward: ``(O, Block, lse)``.

    Shapes ``(B, Hkv, g, r, d_v)`` and ``(B, Hkv, g, r)``.
    """
    xp = pb.xp
    q = pb.rows(pb.q, r0, r1)
    b, h, g, r, _ = q.shape
    s = _merge_group(xp, q * pb.scale) @ xp.matrix_transpose(pb.k)
    s = xp.reshape(s, (b, h, g, r, pb.n_k))
    bias = pb.rows(pb.bias, r0, r1)
    if bias is not None:
        s += bias
    keep = pb.rows(pb.keep, r0, r1)
    if keep is not None:
        s = xp.where(keep, s, -float("inf"))
    shift = slice_max(xp, s, axis=-1)
    shift = xp.where(xp.isfinite(shift), shift, xp.zeros_like(shift))
    s -= shift
    e = exp_inplace(xp, s)
    total = xp.sum(e, axis=-1, keepdims=True)
    positive = total > 0
    safe = xp.where(positive, total, xp.ones_like(total))
    inv_l = xp.where(positive, 1.0 / safe, xp.zeros_like(total))
    lse = xp.where(positive, shift + xp.log(safe), -float("inf"))[..., 0]
    drop = pb.rows(pb.drop, r0, r1)
    e_drop = e if drop is None else e * drop
    o = xp.reshape(_merge_group(xp, e_drop) @ pb.v, (b, h, g, r, pb.v.shape[-1])) * inv_l
    return o, Block(r0, r1, e, inv_l), lse


def forward_blocks(pb: Problem) -> tuple[Array, list[Block], Array]:
    """The whole forward, keeping the per-block state: ``(O, blocks, lse)`` (canonical)."""
    xp = pb.xp
    results = parallel_map(xp, lambda rr: _forward_block(pb, *rr), pb.row_blocks())
    if not results:
        o = xp.zeros((*pb.q.shape[:4], pb.v.shape[-1]), dtype=pb.q.dtype)
        return o, [], xp.zeros(pb.q.shape[:4], dtype=pb.q.dtype)
    if len(results) == 1:
        o, block, lse = results[0]
        return o, [block], lse
    o = xp.concat([res[0] for res in results], axis=3)
    lse = xp.concat([res[2] for res in results], axis=3)
    return o, [res[1] for res in results], lse


def weights_from_blocks(xp: Any, blocks: list[Block]) -> Array:
    """The attention weights ``P`` (B, Hkv, g, n_q, n_k) assembled from the blocks."""
    parts = [blk.weights() for blk in blocks]
    return parts[0] if len(parts) == 1 else xp.concat(parts, axis=3)


def forward_materialized(pb: Problem) -> tuple[Array, Array, Array]:
    """The whole forward: ``(O, P, lse)`` in the canonical layout."""
    o, blocks, lse = forward_blocks(pb)
    return o, weights_from_blocks(pb.xp, blocks), lse


def _backward_block(
    pb: Problem,
    blk: Block,
    o: Array,
    d_o: Array | None,
    d_p: Array | None,
    d_lse: Array | None,
    want_ds: bool,
) -> tuple[Array, Array, Array, Array | None]:
    """Rows ``r0:r1`` of the backward: ``(dQ rows, dK part, dV part, dS rows or None)``.

    With ``t = e o (dP - c)``, where ``c`` collects the per-row terms (Delta, the weights
    cotangent's row sums, minus the LSE cotangent), ``dS = t / l`` and
    ``dQ = scale (t K) / l``, ``dK = scale t^T (Q / l)``: the division by ``l`` happens on
    ``(rows, d)`` operands, never on the scores.
    """
    xp = pb.xp
    r0, r1 = blk.r0, blk.r1
    q = pb.rows(pb.q, r0, r1)
    e, inv_l = blk.e, blk.inv_l
    drop = pb.rows(pb.drop, r0, r1)
    t = None
    row_c = None
    d_v = xp.zeros_like(pb.v)
    if d_o is not None:
        d_o_r = d_o[:, :, :, r0:r1, :]
        e_drop = e if drop is None else e * drop
        d_v = xp.matrix_transpose(_merge_group(xp, e_drop)) @ _merge_group(xp, d_o_r * inv_l)
        t = xp.reshape(_merge_group(xp, d_o_r) @ xp.matrix_transpose(pb.v), tuple(e.shape))
        if drop is not None:
            t *= drop
        # Delta = rowsum(dP o P) = rowsum(dO o O): the O(n d) form of the softmax VJP's sum.
        row_c = xp.sum(d_o_r * o[:, :, :, r0:r1, :], axis=-1, keepdims=True)
    if d_p is not None:
        d_p_r = d_p[:, :, :, r0:r1, :]
        if t is None:
            t = xp.asarray(d_p_r, copy=True)
        else:
            t += d_p_r
        c_w = xp.sum(d_p_r * e, axis=-1, keepdims=True) * inv_l
        row_c = c_w if row_c is None else row_c + c_w
    if d_lse is not None:
        d_l = d_lse[:, :, :, r0:r1, None]
        row_c = -d_l if row_c is None else row_c - d_l
    if row_c is None:  # no cotangent at all
        return xp.zeros_like(q), xp.zeros_like(pb.k), d_v, (xp.zeros_like(e) if want_ds else None)
    if t is None:
        t = xp.zeros_like(e)
    t -= row_c
    t *= e
    q_scaled = q * (inv_l * pb.scale)
    d_q = xp.reshape(_merge_group(xp, t) @ pb.k, q.shape) * (inv_l * pb.scale)
    d_k = xp.matrix_transpose(_merge_group(xp, t)) @ _merge_group(xp, q_scaled)
    return d_q, d_k, d_v, (t * inv_l if want_ds else None)


def backward_blocks(
    pb: Problem,
    blocks: list[Block],
    o: Array,
    d_o: Array | None,
    d_p: Array | None,
    d_lse: Array | None,
    *,
    want_ds: bool = False,
) -> tuple[Array, Array, Array, Array | None]:
    """The whole backward from the forward's blocks: ``(dQ, dK, dV, dS or None)``, canonical.

    Each worker takes a contiguous run of blocks and accumulates its own dK and dV, so only one
    partial sum per worker is added at the end.
    """
    xp = pb.xp
    if not blocks:
        return xp.zeros_like(pb.q), xp.zeros_like(pb.k), xp.zeros_like(pb.v), None
    n_workers = min(len(blocks), n_threads()) if _is_threaded(xp) else 1
    per = math.ceil(len(blocks) / n_workers)
    runs = [blocks[i : i + per] for i in range(0, len(blocks), per)]

    def work(run: list[Block]) -> tuple[list[Array], Array, Array, list[Array]]:
        d_qs, d_ss = [], []
        d_k = d_v = None
        for blk in run:
            d_q_b, d_k_b, d_v_b, d_s_b = _backward_block(pb, blk, o, d_o, d_p, d_lse, want_ds)
            d_qs.append(d_q_b)
            d_ss.append(d_s_b)
            if d_k is None:
                d_k, d_v = d_k_b, d_v_b
            else:
                d_k += d_k_b
                d_v += d_v_b
        return d_qs, d_k, d_v, d_ss

    parts = parallel_map(xp, work, runs)
    d_qs = [d for part in parts for d in part[0]]
    d_q = d_qs[0] if len(d_qs) == 1 else xp.concat(d_qs, axis=3)
    d_k, d_v = parts[0][1], parts[0][2]
    for part in parts[1:]:
        d_k = d_k + part[1]
        d_v = d_v + part[2]
    d_s = None
    if want_ds:
        d_ss = [d for part in parts for d in part[3]]
        d_s = d_ss[0] if len(d_ss) == 1 else xp.concat(d_ss, axis=3)
    return d_q, d_k, d_v, d_s


def backward_materialized(
    pb: Problem, p: Array, o: Array, d_o: Array | None, d_p: Array | None, d_lse: Array | None
) -> tuple[Array, Array, Array, Array]:
    r"""The whole backward from materialized weights ``P``: ``(dQ, dK, dV, dS)``, canonical.

    ``dS`` is the gradient with respect to the (biased) scores ``S``, i.e. the bias gradient
    before broadcasting is undone.
    """
    xp = pb.xp
    ones = xp.ones((*p.shape[:4], 1), dtype=p.dtype)
    blocks = [
        Block(r0, r1, p[:, :, :, r0:r1, :], ones[:, :, :, r0:r1, :]) for r0, r1 in pb.row_blocks()
    ]
    d_q, d_k, d_v, d_s = backward_blocks(pb, blocks, o, d_o, d_p, d_lse, want_ds=True)
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
    implementation: str = "auto",
    block_size: int | tuple[int, int] | None = None,
    memory_budget: int | None = None,
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
    implementation : {"auto", "materialized", "tiled"}
        How the same op is computed (results agree to ~1e-15 relative in float64).
        "materialized" forms the ``n_q x n_k`` weights in row blocks and keeps them for the
        backward. "tiled" is flash-style (see :mod:`refattn.ops.tiled`): an online softmax over
        key blocks, saving only ``O`` and the LSE, and a backward that recomputes the weights tile
        by tile; its extra memory is ``O(n d)``, and causal masks skip fully hidden tiles (about
        half the work). With ``return_weights=True`` the tiled path still works, but the weights
        are an ``n_q x n_k`` output, so they are materialized (from the final LSE).
        "auto" (default) picks "tiled" when the scores of the whole call,
        ``batch * Hq * n_q * n_k`` entries in the input dtype, exceed ``memory_budget``, and
        "materialized" otherwise, or whenever ``return_weights=True``.
    block_size : int or (block_q, block_k), optional
        Tile size of the tiled implementation (default :data:`refattn.ops.tiled.DEFAULT_BLOCK`,
        512); ignored by "materialized".
    memory_budget : int, optional
        Bytes of scores "auto" may materialize; default :data:`DEFAULT_MEMORY_BUDGET` (4 MiB).

    Returns
    -------
    out : (..., Hq, n_q, d_v), or the tuple ``(out, weights?, lse?)`` with the requested extras
        in that order. Fully masked query rows give ``out = 0`` and ``weights = 0``, and their
        gradients are 0.
    """
    chosen = choose_implementation(
        implementation,
        q,
        k,
        return_weights=return_weights,
        block_size=block_size,
        memory_budget=memory_budget,
    )
    if chosen == "tiled":
        return _tiled().sdpa_forward(
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
            return_weights=return_weights,
            return_lse=return_lse,
            block_size=block_size,
        )
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
    o, blocks, lse = forward_blocks(pb)
    weights = weights_from_blocks(pb.xp, blocks) if return_weights else None
    return pb.result(o, weights, lse, return_lse=return_lse), (pb, blocks, o)


def _sdpa_bwd(
    residuals: Any,
    cotangent: Any,
    /,
    *,
    return_weights: bool = False,
    return_lse: bool = False,
    implementation: str = "auto",
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

    The implementation was fixed by the forward (``implementation="auto"`` is resolved there):
    tiled residuals go to :func:`refattn.ops.tiled.sdpa_backward`, which computes the same
    formulas tile by tile, recomputing ``P = exp(S - lse)`` from the saved LSE.
    """
    tiled = _tiled()
    if isinstance(residuals, tiled.TiledResiduals):
        return tiled.sdpa_backward(
            residuals, cotangent, return_weights=return_weights, return_lse=return_lse
        )
    pb, blocks, o = residuals
    d_o, d_p, d_l = pb.cotangents(cotangent, return_weights=return_weights, return_lse=return_lse)
    d_q, d_k, d_v, _ = backward_blocks(pb, blocks, o, d_o, d_p, d_l)
    return pb.gradients(d_q, d_k, d_v)


scaled_dot_product_attention = Op(
    _sdpa_fwd, _sdpa_bwd, name="scaled_dot_product_attention", register=True
)


# ----------------------------------------------------------------------------- implementations

IMPLEMENTATIONS = ("auto", "materialized", "tiled")
#: bytes of scores ``implementation="auto"`` materializes before switching to "tiled". Small on
#: purpose: past a few MiB of scores the tiled kernels (cache-sized tiles, no n x n store) are also
#: the faster ones on the CPU (measured: docs/efficient.md), so "auto" keeps the materialized
#: path for small problems, where its single pass is cheapest.
DEFAULT_MEMORY_BUDGET = 4 * 2**20


def _tiled() -> Any:
    """The tiled kernels (imported here: :mod:`refattn.ops.tiled` itself imports this module)."""
    from . import tiled

    return tiled


def choose_implementation(
    implementation: str,
    q: Array,
    k: Array,
    *,
    return_weights: bool = False,
    block_size: Any = None,
    memory_budget: int | None = None,
) -> str:
    """Validate the implementation options and resolve "auto" to "materialized" or "tiled".

    "auto" is "tiled" when ``prod(q.shape[:-1]) * n_k`` scores (batch, heads and query rows
    times keys) in ``q``'s dtype exceed ``memory_budget`` bytes (default
    :data:`DEFAULT_MEMORY_BUDGET`), and "materialized" otherwise or when weights are requested.
    """
    op = "refattn.scaled_dot_product_attention"
    if not isinstance(implementation, str) or implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"{op}: implementation must be one of {', '.join(map(repr, IMPLEMENTATIONS))}, "
            f"got {implementation!r}"
        )
    _tiled().check_block_size(block_size, "scaled_dot_product_attention")
    if memory_budget is None:
        budget = DEFAULT_MEMORY_BUDGET
    elif isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, float)):
        raise TypeError(f"{op}: memory_budget must be a number of bytes, got {memory_budget!r}")
    elif not memory_budget >= 0:
        raise ValueError(f"{op}: memory_budget must be >= 0 bytes, got {memory_budget!r}")
    else:
        budget = memory_budget
    if implementation != "auto":
        return implementation
    if return_weights:
        return "materialized"
    q_shape, k_shape = tuple(getattr(q, "shape", ())), tuple(getattr(k, "shape", ()))
    if len(q_shape) < 2 or len(k_shape) < 2:
        return "materialized"  # prepare() reports the bad shapes
    elem_bytes = itemsize(namespace(q), q.dtype)
    n_scores = math.prod(q_shape[:-1]) * k_shape[-2]
    return "tiled" if n_scores * elem_bytes > budget else "materialized"
