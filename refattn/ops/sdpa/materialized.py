r"""The materialized SDPA kernel: the weights of each block of query rows, kept for the backward.

Query rows are cut into blocks (:func:`row_blocks`). The forward of a block is the textbook
formula, :math:`E = e^{S - m}` with the row max ``m``, :math:`O = (E \circ D) V / \ell` and
:math:`\mathrm{lse} = m + \log \ell` (``D`` the dropout multiplier), with ``S`` from the shared
score pipeline (:func:`~refattn.ops.sdpa.scores.masked_scores`). ``E`` and ``1/ℓ`` are saved
(:class:`Block`). Rows are independent in the forward; in the backward dQ rows are independent
and dK, dV are sums over row blocks. On NumPy the blocks run on the thread pool
(:func:`~refattn._runtime.parallel_map`), which puts every core on the elementwise ``exp``.
The backward's formulas are derived in :mod:`refattn.ops.sdpa.op`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..._backend import device_of, exp_inplace, is_numpy_namespace, itemsize
from ..._runtime import n_threads, parallel_map
from ..entmax import normalize_backward, normalize_forward
from ..softmax import slice_max
from .problem import Problem
from .scores import ScoreChain, ScoreGradients, masked_scores_and_slope, tile

__all__ = [
    "Block",
    "MaterializedResiduals",
    "backward_blocks",
    "forward",
    "forward_blocks",
    "row_blocks",
    "weights_from_blocks",
]

Array = Any

#: NumPy: rows per block are chosen so a block's score matrix is about this many bytes
_BLOCK_BYTES = 4 * 2**20
#: other backends (CuPy, array-api-strict): the largest score block computed at once
_DEVICE_BLOCK_BYTES = 1024 * 2**20


def row_blocks(pb: Problem) -> list[tuple[int, int]]:
    """Split ``range(n_q)`` into contiguous row blocks for :func:`parallel_map`.

    On NumPy a block's score matrix is about :data:`_BLOCK_BYTES` (it stays in cache through
    the softmax's passes) and there are at least two blocks per thread; other backends take
    the rows in as few blocks as :data:`_DEVICE_BLOCK_BYTES` allows.
    """
    n_q = pb.n_q
    if n_q == 0:
        return []
    elem_bytes = itemsize(pb.xp, pb.q.dtype)
    row_bytes = max(1, math.prod(pb.q.shape[:3]) * pb.n_k * elem_bytes)
    if row_bytes * n_q <= _BLOCK_BYTES // 4:  # small: threads would cost more than they save
        return [(0, n_q)]
    if is_numpy_namespace(pb.xp):
        rows = max(1, _BLOCK_BYTES // row_bytes)
        rows = min(rows, max(1, math.ceil(n_q / (2 * n_threads()))))
    else:
        rows = max(1, _DEVICE_BLOCK_BYTES // row_bytes)
    return [(r, min(r + rows, n_q)) for r in range(0, n_q, rows)]


@dataclass
class Block:
    """Saved forward state of query rows ``r0:r1``.

    ``e = exp(S - shift)`` (0 where masked) is kept unnormalised with ``inv_l = 1 / rowsum(e)``
    (0 for a fully masked row), so that ``P = e * inv_l``. Normalising lazily saves one pass over
    the scores in the forward, and costs nothing in the backward: ``1/l`` is folded into the
    ``(rows, d)`` operands of the GEMMs instead. With a softcap or a score modifier, ``chain``
    takes ``dS`` back through them (:class:`~refattn.ops.sdpa.scores.ScoreChain`; else None).
    """

    r0: int
    r1: int
    e: Array  # (B, Hkv, g, r, n_k)
    inv_l: Array  # (B, Hkv, g, r, 1)
    chain: ScoreChain | None = None
    sparse: Any = None  # the normaliser's residuals (sparsemax, entmax), else None

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
    q = pb.q[:, :, :, r0:r1, :]
    b, h, g, r, _ = q.shape
    s = _merge_group(xp, q * pb.scale) @ xp.matrix_transpose(pb.k)
    s, chain = masked_scores_and_slope(pb, xp.reshape(s, (b, h, g, r, pb.n_k)), None, r0, r1)
    chain = None if chain.identity else chain
    if pb.normalizer != "softmax":
        return _sparse_forward_block(pb, s, chain, r0, r1)
    shift = slice_max(xp, s, axis=-1)
    shift = xp.where(xp.isfinite(shift), shift, xp.zeros_like(shift))
    s -= shift
    e = exp_inplace(xp, s)
    total = xp.sum(e, axis=-1, keepdims=True)
    positive = total > 0
    safe = xp.where(positive, total, xp.ones_like(total))
    inv_l = xp.where(positive, 1.0 / safe, xp.zeros_like(total))
    lse = xp.where(positive, shift + xp.log(safe), -float("inf"))[..., 0]
    drop = tile(pb.drop, None, r0, r1, 0, pb.n_k)
    e_drop = e if drop is None else e * drop
    o = xp.reshape(_merge_group(xp, e_drop) @ pb.v, (b, h, g, r, pb.v.shape[-1])) * inv_l
    return o, Block(r0, r1, e, inv_l, chain), lse


def _sparse_forward_block(
    pb: Problem, s: Array, chain: ScoreChain | None, r0: int, r1: int
) -> tuple[Array, Block, Array]:
    """A row block with sparsemax or entmax weights (``e = P``, ``1/l = 1``, no LSE: NaN)."""
    xp = pb.xp
    p, sparse = normalize_forward(s, normalizer=pb.normalizer, alpha=pb.alpha)
    drop = tile(pb.drop, None, r0, r1, 0, pb.n_k)
    p_drop = p if drop is None else p * drop
    b, h, g, r, _ = p.shape
    o = xp.reshape(_merge_group(xp, p_drop) @ pb.v, (b, h, g, r, pb.v.shape[-1]))
    ones = xp.ones((b, h, g, r, 1), dtype=p.dtype, device=device_of(p))
    lse = xp.full((b, h, g, r), math.nan, dtype=p.dtype, device=device_of(p))
    return o, Block(r0, r1, p, ones, chain, sparse), lse


def forward_blocks(pb: Problem) -> tuple[Array, list[Block], Array]:
    """The whole forward, keeping the per-block state: ``(O, blocks, lse)`` (canonical)."""
    xp = pb.xp
    results = parallel_map(xp, lambda rr: _forward_block(pb, *rr), row_blocks(pb))
    if not results:
        o = xp.zeros((*pb.q.shape[:4], pb.v.shape[-1]), dtype=pb.q.dtype, device=device_of(pb.q))
        return o, [], xp.zeros(pb.q.shape[:4], dtype=pb.q.dtype, device=device_of(pb.q))
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


def _backward_block(
    pb: Problem,
    blk: Block,
    o: Array,
    d_o: Array | None,
    d_p: Array | None,
    d_lse: Array | None,
    learned: ScoreGradients | None = None,
) -> tuple[Array, Array, Array]:
    """Rows ``r0:r1`` of the backward: ``(dQ rows, dK part, dV part)``; ``dS`` into
    ``learned`` (the learnable bias and softcap, :class:`~.scores.ScoreGradients`).

    With ``t = e o (dP - c)``, where ``c`` collects the per-row terms (Delta, the weights
    cotangent's row sums, minus the LSE cotangent), ``dS = t / l`` and
    ``dQ = scale (t K) / l``, ``dK = scale t^T (Q / l)``: the division by ``l`` happens on
    ``(rows, d)`` operands, never on the scores. A score modifier's VJP and a softcap's slope
    are applied to ``t`` (the block's :class:`~refattn.ops.sdpa.scores.ScoreChain`).
    """
    xp = pb.xp
    r0, r1 = blk.r0, blk.r1
    q = pb.q[:, :, :, r0:r1, :]
    e, inv_l = blk.e, blk.inv_l
    drop = tile(pb.drop, None, r0, r1, 0, pb.n_k)
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
        return xp.zeros_like(q), xp.zeros_like(pb.k), d_v
    if t is None:
        t = xp.zeros_like(e)
    if blk.sparse is not None:  # dS from the normaliser's own VJP (there is no LSE term)
        t, _ = normalize_backward(blk.sparse, t)
    else:
        t -= row_c
        t *= e
    if blk.chain is not None:
        t = blk.chain.to_bias(t)  # the VJP is linear: it commutes with the 1 / l
    if learned is not None:
        learned.add(t * inv_l, blk.chain, None, r0, r1, 0, pb.n_k)  # dB = t / l
    if blk.chain is not None:
        t = blk.chain.to_scores(t)
    q_scaled = q * (inv_l * pb.scale)
    d_q = xp.reshape(_merge_group(xp, t) @ pb.k, q.shape) * (inv_l * pb.scale)
    d_k = xp.matrix_transpose(_merge_group(xp, t)) @ _merge_group(xp, q_scaled)
    return d_q, d_k, d_v


def backward_blocks(
    pb: Problem,
    blocks: list[Block],
    o: Array,
    d_o: Array | None,
    d_p: Array | None,
    d_lse: Array | None,
    learned: ScoreGradients | None = None,
) -> tuple[Array, Array, Array]:
    """The whole backward from the forward's blocks: ``(dQ, dK, dV)``, canonical (and ``dB``
    into ``learned``, with a learnable softcap's ``dc``).

    Each worker takes a contiguous run of blocks and accumulates its own dK and dV, so only one
    partial sum per worker is added at the end.
    """
    xp = pb.xp
    if not blocks:
        return xp.zeros_like(pb.q), xp.zeros_like(pb.k), xp.zeros_like(pb.v)
    n_workers = min(len(blocks), n_threads()) if is_numpy_namespace(xp) else 1
    per = math.ceil(len(blocks) / n_workers)
    runs = [blocks[i : i + per] for i in range(0, len(blocks), per)]

    def work(run: list[Block]) -> tuple[list[Array], Array, Array]:
        d_qs = []
        d_k = d_v = None
        for blk in run:
            d_q_b, d_k_b, d_v_b = _backward_block(pb, blk, o, d_o, d_p, d_lse, learned)
            d_qs.append(d_q_b)
            if d_k is None:
                d_k, d_v = d_k_b, d_v_b
            else:
                d_k += d_k_b
                d_v += d_v_b
        return d_qs, d_k, d_v

    parts = parallel_map(xp, work, runs)
    d_qs = [d for part in parts for d in part[0]]
    d_q = d_qs[0] if len(d_qs) == 1 else xp.concat(d_qs, axis=3)
    d_k, d_v = parts[0][1], parts[0][2]
    for part in parts[1:]:
        d_k = d_k + part[1]
        d_v = d_v + part[2]
    return d_q, d_k, d_v


@dataclass
class MaterializedResiduals:
    """What the materialized forward saves: the problem, the blocks' weights, ``O`` and the
    LSE."""

    pb: Problem
    blocks: list[Block]
    o: Array
    lse: Array

    def weights(self) -> Array:
        """The weights ``P`` (canonical), assembled from the blocks."""
        return weights_from_blocks(self.pb.xp, self.blocks)

    def vjp(
        self,
        d_o: Array | None,
        d_p: Array | None,
        d_lse: Array | None,
        learned: ScoreGradients | None = None,
    ) -> tuple[Array, Array, Array]:
        """Canonical ``(dQ, dK, dV)`` from canonical cotangents (see :func:`backward_blocks`)."""
        return backward_blocks(self.pb, self.blocks, self.o, d_o, d_p, d_lse, learned)


def forward(pb: Problem, *, want_weights: bool) -> tuple[Array, Array | None, Array, Any]:
    """``(O, P or None, lse, residuals)`` in the canonical layout."""
    o, blocks, lse = forward_blocks(pb)
    if pb.sinks is not None:  # the sinks' share of each row (Problem.add_sinks)
        lse, r = pb.add_sinks(lse)
        o = o * r[..., None]
        for blk in blocks:
            blk.inv_l = blk.inv_l * r[:, :, :, blk.r0 : blk.r1, None]
    weights = weights_from_blocks(pb.xp, blocks) if want_weights else None
    return o, weights, lse, MaterializedResiduals(pb, blocks, o, lse)
