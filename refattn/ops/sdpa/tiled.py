r"""Flash-style tiled exact attention: online-softmax forward, LSE-recompute backward.

The same op as the materialized kernel (:mod:`refattn.ops.sdpa.materialized`), computed block
by block so that no ``n_q x n_k`` array ever exists. It works on the canonical
:class:`~refattn.ops.sdpa.problem.Problem` (``q (B, Hkv, g, n_q, d_k)``, ``k (B, Hkv, n_k, d_k)``,
``v (B, Hkv, n_k, d_v)``); a *unit* of work is a chunk of heads times a block of query rows, and
a *tile* is a unit's rows against one block of keys (:mod:`refattn.ops.sdpa.plan` lists them).
Every tile's scores go through the shared pipeline
(:func:`~refattn.ops.sdpa.scores.masked_scores`).

Forward (online softmax, Milakov & Gimelshein 2018; FlashAttention, Dao et al. 2022). For one
row block, over its visible key blocks :math:`j = 1, 2, \dots`:

.. math::

    S^{(j)} &= \mathrm{scale}\; Q K_j^\top + B_j \quad(-\infty\ \text{where masked}),\\
    m^{(j)} &= \max\bigl(m^{(j-1)}, \mathrm{rowmax}\, S^{(j)}\bigr),\qquad
    \alpha^{(j)} = e^{m^{(j-1)} - m^{(j)}},\\
    \ell^{(j)} &= \alpha^{(j)} \ell^{(j-1)} + \mathrm{rowsum}\, e^{S^{(j)} - m^{(j)}},\\
    A^{(j)} &= \alpha^{(j)} A^{(j-1)} + \bigl(e^{S^{(j)} - m^{(j)}} \circ D_j\bigr) V_j,

starting from :math:`m = -\infty,\ \ell = 0,\ A = 0`. By induction
:math:`\ell = \sum_{j'} \mathrm{rowsum}\,e^{S^{(j')} - m}` and
:math:`A = \sum_{j'} (e^{S^{(j')} - m} \circ D_{j'}) V_{j'}` with the *final* running max ``m``,
so at the end :math:`O = A / \ell` and :math:`\mathrm{lse} = m + \log \ell` exactly as the
materialized softmax gives them. Only ``O`` and ``lse`` are saved (plus the inputs).

Without a bias or dropout, a faster variant runs first (:func:`_bounded_forward`): each row is
shifted by an upper bound of its scores known in advance (or not at all, when that bound shows
that nothing can overflow), so the weights need no running max and the accumulators no
rescaling; units whose rows would lose precision that way are computed by the online softmax
above.

Base 2. The kernels compute every weight as :math:`e^{x} = 2^{x \log_2 e}`, with
:math:`\log_2 e` folded into a GEMM operand (the scaled queries, or the augmented keys), so
that score tiles come out of the GEMM in base-2 units and the one elementwise pass is an
``exp2``, which NumPy computes faster than ``exp`` (:func:`~refattn._backend.exp2_inplace`),
as FlashAttention does on GPUs. Running maxima and shifts are in base-2 units too; the LSE is
converted back, :math:`\mathrm{lse} = m_2 \ln 2 + \log \ell`.

Backward. With :math:`P = e^{S - \mathrm{lse}}` recomputed tile by tile from the saved LSE:

.. math::

    dV_j &\mathrel{+}= (P \circ D)^\top dO, \qquad dP = (dO\, V_j^\top) \circ D,\\
    dS &= P \circ (dP - c), \qquad
    c_i = \Delta_i - d\mathrm{lse}_i \;(+ \textstyle\sum_j P_{ij}\, dW_{ij}),\qquad
    \Delta_i = \sum_j P_{ij}\, dP_{ij} = \sum_c dO_{ic}\, O_{ic},\\
    dQ &\mathrel{+}= \mathrm{scale}\; dS\, K_j, \qquad
    dK_j \mathrel{+}= \mathrm{scale}\; dS^\top Q .

``Delta = rowsum(dO o O)`` is the softmax VJP's row sum computed in O(n d) *before* the loop,
which is what makes a single pass over the tiles enough (``O = (P o D) V`` so
``rowsum(dO o O) = sum_j (P o D)_ij (dO V^T)_ij = sum_j P_ij dP_ij``). A fully masked row has
``lse = -inf`` and all its scores ``-inf``, hence ``P = 0`` and zero gradients.

Structured masks. A :class:`~refattn.ops.sdpa.plan.Pattern` (causal, a band around the
diagonal, global tokens) is evaluated from *indices*: each tile is classified as empty (skipped,
never computed), full (no mask needed) or partial (a ``block_q x block_k`` keep-mask is built
from two ``arange``). Causal
attention thus visits about half the tiles, and a sliding window ``O(n w / b^2)`` of them.

Parallelism. Forward units are independent (``parallel_map``). In the backward, ``dQ`` rows
belong to one unit, while ``dK, dV`` sum over units: there is one *lane* per thread, taking work
from a shared queue. With at least two head chunks per lane, a lane takes whole head chunks, and
lanes write disjoint heads of ``dK, dV``. Otherwise lanes take units, largest first (which
balances causal work), each accumulating into its own ``dK, dV`` buffers, summed at the end.
Memory beyond inputs and outputs: per thread a few tiles, plus in the second case one
``dK, dV``-sized buffer per extra lane.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..._backend import LOG2E, all_true, device_of, exp2_inplace, is_numpy_namespace, itemsize
from ..._runtime import matmul_scratch, n_threads, parallel_map
from . import plan as tile_plans
from .plan import Heads, Plan, default_block, plan_tiles
from .problem import Problem
from .scores import (
    ScoreChain,
    ScoreGradients,
    heads_of,
    masked_scores,
    masked_scores_and_slope,
    mod_keep,
    tile,
)

__all__ = ["TiledResiduals", "forward", "make_plan", "tiled_backward", "tiled_forward"]

Array = Any

#: ``K`` and ``V`` up to this many bytes are augmented once per call, larger ones per head chunk
_SHARED_KEY_BYTES = 4 * 2**20
#: the bounded forward augments the keys when they meet more query rows (``g n_q``) than this
_AUGMENT_ROWS = 2048


def make_plan(pb: Problem, block_size: tuple[int, int] | None = None) -> Plan:
    """The tile plan of ``pb`` under its pattern, blocks ``block_size`` (default: ``pb``'s, else
    :func:`~refattn.ops.sdpa.plan.default_block` of the pattern)."""
    b, h_kv, g = (int(s) for s in pb.q.shape[:3])
    block = default_block(pb.pattern)
    blocks = block_size or pb.block_size or (block, block)
    elem_bytes = itemsize(pb.xp, pb.q.dtype)
    tile_bytes = tile_plans.TILE_BYTES
    # a padded batch: every sequence planned on its own rule
    per_batch = None if pb.lengths is None else pb.lengths.patterns
    plan = plan_tiles(
        b, h_kv, g, pb.n_q, pb.n_k, elem_bytes, pb.pattern, blocks, tile_bytes, per_batch
    )
    return plan if pb.mask_mod is None else _mask_mod_plan(pb, plan, elem_bytes)


def _mask_mod_plan(pb: Problem, plan: Plan, elem_bytes: int) -> Plan:
    """``plan`` without the tiles that ``mask_mod`` hides from every head of a chunk, and with
    the tiles it shows wholly marked full (FlexAttention's block mask, evaluated here on the
    call's own plan: ``O(n_q n_k)`` cheap boolean work on the tiles the structured masks leave,
    no ``n_q x n_k`` array). Each tile's mask is evaluated once for all heads; chunks read
    their part of it."""
    xp, device = pb.xp, device_of(pb.q)
    g = int(pb.q.shape[2])
    states: dict[tuple[int, int, int], Array] = {}
    by_chunk, scores = [], 0
    for hc in plan.heads:
        per_row = []
        for ri, (r0, r1) in enumerate(plan.rows):
            kept = []
            for c0, c1, full in plan.tiles(hc, ri):
                if (ri, c0, c1) not in states:
                    keep = mod_keep(pb, xp, None, r0, r1, c0, c1, device)
                    states[ri, c0, c1] = _tile_states(xp, keep)
                state = heads_of(states[ri, c0, c1], hc)
                if not bool(xp.any(state > 0)):
                    continue
                kept.append((c0, c1, full and bool(xp.all(state == 2))))
                scores += (hc.b1 - hc.b0) * (hc.h1 - hc.h0) * g * (r1 - r0) * (c1 - c0)
            per_row.append(tuple(kept))
        by_chunk.append(tuple(per_row))
    return Plan(plan.heads, plan.rows, plan.visible, elem_bytes * scores, tuple(by_chunk))


def _tile_states(xp: Any, keep: Array) -> Array:
    """Per (batch, kv head) of a tile's keep-mask ``(B|1, Hkv|1, g|1, r|1, c|1)``: 0 all
    hidden, 1 mixed, 2 all visible (shape ``(B|1, Hkv|1)``)."""
    axes = tuple(range(2, keep.ndim))
    some = xp.any(keep, axis=axes)
    every = xp.all(keep, axis=axes)
    return xp.astype(some, xp.int8) + xp.astype(every, xp.int8)


# ----------------------------------------------------------------------------- slicing


def _merge(xp: Any, x: Array) -> Array:
    """``(b, h, g, r, c) -> (b, h, g * r, c)``."""
    b, h, g, r, c = x.shape
    return xp.reshape(x, (b, h, g * r, c))


def _split(xp: Any, x: Array, g: int) -> Array:
    """``(b, h, g * r, c) -> (b, h, g, r, c)``."""
    b, h, gr, c = x.shape
    return xp.reshape(x, (b, h, g, gr // g, c))


def _scores(
    pb: Problem,
    hc: Heads,
    q_scaled: Array,
    k: Array,
    g: int,
    r0: int,
    r1: int,
    c0: int,
    c1: int,
    full: bool,
) -> Array:
    """``q_scaled K^T`` of one tile through the score pipeline, base 2: ``(b, h, g, r, c)``.

    The callers fold ``LOG2E`` (and ``scale``) into ``q_scaled`` or ``k``, so that the GEMM
    gives ``LOG2E scale Q K^T`` (minus any row shift they fold in too);
    :func:`~refattn.ops.sdpa.scores.masked_scores` adds ``LOG2E bias`` and hides the masked
    pairs. Without a mask the result is the thread's work array ``"s"`` (``matmul_scratch``):
    valid until the thread's next tile.
    """
    xp = pb.xp
    s = _split(xp, matmul_scratch(xp, q_scaled, xp.matrix_transpose(k[:, :, c0:c1, :]), "s"), g)
    return masked_scores(pb, s, hc, r0, r1, c0, c1, full=full, unit=LOG2E)


def _is_threaded(xp: Any) -> bool:
    return is_numpy_namespace(xp) and n_threads() > 1


def _run(xp: Any, fn: Any, items: Sequence[Any], *, serial: bool = False) -> None:
    if serial:
        for item in items:
            fn(item)
    else:
        parallel_map(xp, fn, list(items))


# ----------------------------------------------------------------------------- forward


def tiled_forward(
    pb: Problem, plan: Plan, *, want_weights: bool = False
) -> tuple[Array, Array, Array | None]:
    """Online-softmax forward: ``(O, lse, P or None)`` in the canonical layout.

    ``O (B, Hkv, g, n_q, d_v)``, ``lse (B, Hkv, g, n_q)`` (``-inf`` for rows with no visible
    key), and, only when ``want_weights``, ``P (B, Hkv, g, n_q, n_k)`` (before dropout),
    filled tile by tile from the final LSE.

    Without bias, softcap, dropout or requested weights, the single-pass
    :func:`_bounded_forward` runs first (it folds the row shift into the score GEMM, which a
    cap or bias applied after the GEMM would break); the units it declines are computed by the
    online softmax (:func:`_forward_unit`).
    """
    xp = pb.xp
    b, h_kv, g, n_q, _ = pb.q.shape
    dtype, device = pb.q.dtype, device_of(pb.q)
    # uninitialized: every unit writes its rows of o and lse, in one of the two passes
    if pb.v.shape[-1] == pb.q.shape[-1]:
        o = xp.empty_like(pb.q)  # NumPy and CuPy keep q's memory layout (e.g. heads inner)
    else:
        o = xp.empty((b, h_kv, g, n_q, pb.v.shape[-1]), dtype=dtype, device=device)
    lse = xp.empty((b, h_kv, g, n_q), dtype=dtype, device=device)
    weights = None
    if want_weights:
        weights = xp.zeros((b, h_kv, g, n_q, pb.n_k), dtype=dtype, device=device)
    n_lanes = n_threads() if _is_threaded(xp) and not plan.small else 1
    items = plan.work(n_lanes)
    online = items
    plain = pb.score_mod is None  # a mask_mod only hides scores: the row bounds still hold
    if plain and pb.bias is None and pb.drop is None and pb.softcap is None and not want_weights:
        online = _bounded_forward(pb, plan, items, o, lse, serial=n_lanes == 1)

    def run(item: tuple[Heads | None, list[tuple[Heads, int]]]) -> None:
        for hc, ri in item[1]:
            r0, r1 = plan.rows[ri]
            o_u, lse_u = _forward_unit(pb, plan.tiles(hc, ri), hc, r0, r1, weights)
            o[hc.b0 : hc.b1, hc.h0 : hc.h1, :, r0:r1, :] = o_u
            lse[hc.b0 : hc.b1, hc.h0 : hc.h1, :, r0:r1] = lse_u

    _run(xp, run, online, serial=n_lanes == 1)
    return o, lse, weights


def _share_keys(pb: Problem, items: list[tuple[Heads | None, Any]]) -> bool:
    """Whether to augment the keys once for all work items, rather than once per head chunk.

    Once when items are single units (they share heads), or when ``K`` and ``V`` are small:
    one vectorized call then costs less than several small ones, which on two threads also
    contend for the GIL. Per chunk for large inputs: the copies stay chunk-sized (no large
    fresh allocation, hence no page faults).
    """
    if not items or items[0][0] is None:
        return True
    elem_bytes = itemsize(pb.xp, pb.q.dtype)
    return elem_bytes * (math.prod(pb.k.shape) + math.prod(pb.v.shape)) <= _SHARED_KEY_BYTES


def _append_column(xp: Any, x: Array, column: Array | None = None) -> Array:
    """``[x, column]`` along the last axis; ``column`` defaults to ones."""
    if column is None:
        column = xp.ones((*x.shape[:-1], 1), dtype=x.dtype, device=device_of(x))
    return xp.concat([x, column], axis=-1)


def _base2_keys(xp: Any, k: Array, factor: float) -> Array:
    """``LOG2E [factor K, 1]``: against a query row ``[q, -b]``, ``LOG2E (factor q.k - b)``."""
    log2e = xp.full((*k.shape[:-1], 1), LOG2E, dtype=k.dtype, device=device_of(k))
    return _append_column(xp, k * (factor * LOG2E), log2e)


@dataclass
class _ChunkKeys:
    """Arrays of one head chunk (``chunk``), or of all heads (``chunk`` None)."""

    chunk: Heads | None

    def heads(self, x: Array, hc: Heads) -> Array:
        """Heads ``hc`` of ``x`` (``x`` itself when it was built for that chunk)."""
        return x if self.chunk is not None else heads_of(x, hc)


@dataclass
class BoundedKeys(_ChunkKeys):
    """``LOG2E [scale K, 1]`` and ``[V, 1]`` for :func:`_bounded_forward`.

    A query row ``[q, -b]`` against ``k`` gives ``LOG2E (scale q.k - b)``, the shifted score in
    base-2 units; the weights against ``v`` give ``e V`` and, in the last column, ``rowsum(e)``.
    """

    k: Array
    v: Array

    @classmethod
    def of(cls, pb: Problem, chunk: Heads | None = None) -> BoundedKeys:
        xp = pb.xp
        k = pb.k if chunk is None else heads_of(pb.k, chunk)
        v = pb.v if chunk is None else heads_of(pb.v, chunk)
        return cls(chunk, _base2_keys(xp, k, pb.scale), _append_column(xp, v))


@dataclass(frozen=True)
class _Bounds:
    r"""What :func:`_bounded_forward` knows of ``K`` and ``V`` before any tile is computed.

    Attributes
    ----------
    key : (B, Hkv, 1, 1, 1)
        :math:`\mathrm{scale} \max_j |k_j|` per kv head: times ``|q_i|`` it bounds row ``i``'s
        scores.
    unshifted : float
        Rows whose bound is at most this need no shift: with :math:`V_{\max} = \max |V|`,
        :math:`\log(\mathrm{finfo.max}) - 1 - \log n_k - \log \max(V_{\max}, 1)`.
    """

    key: Array
    unshifted: Array

    @classmethod
    def of(cls, pb: Problem) -> _Bounds | None:
        """The bounds of ``pb``, or None to decline the bounded forward for the whole call.

        Declined: ``max |V| < smallest_normal^(3/4)`` (products of weights as small as
        ``exp(-G)`` with such values would be subnormal); a NaN in ``V``. ``V`` must not be
        empty. Both bounds stay on the device (0-d ``unshifted``); tests of them go through
        :func:`~refattn._backend.all_true`.
        """
        xp = pb.xp
        v_max = xp.maximum(xp.max(pb.v), -xp.min(pb.v))  # NaN if V has one
        info = xp.finfo(pb.v.dtype)
        if not all_true(xp, v_max >= float(info.smallest_normal) ** 0.75):
            return None
        k_norm = xp.sqrt(xp.max(xp.vecdot(pb.k, pb.k, axis=-1), axis=-1))  # (B, Hkv)
        key = xp.reshape(k_norm * pb.scale, (*k_norm.shape, 1, 1, 1))
        headroom = math.log(float(info.max)) - 1.0 - math.log(pb.n_k)
        return cls(key, headroom - xp.log(xp.maximum(v_max, 1.0)))


def _forward_unit(
    pb: Problem,
    tiles: Sequence[tuple[int, int, bool]],
    hc: Heads,
    r0: int,
    r1: int,
    weights: Array | None,
) -> tuple[Array, Array]:
    """Rows ``r0:r1`` of heads ``hc``: ``(O (b, h, g, r, d_v), lse (b, h, g, r))``."""
    xp = pb.xp
    q = pb.q[hc.b0 : hc.b1, hc.h0 : hc.h1, :, r0:r1, :]
    bh, hh, g, r, _ = q.shape
    q_scaled = _merge(xp, q * (pb.scale * LOG2E))  # scores in base-2 units
    k, v = heads_of(pb.k, hc), heads_of(pb.v, hc)
    d_v = v.shape[-1]
    dtype, device = q.dtype, device_of(q)
    m = xp.full((bh, hh, g, r, 1), -math.inf, dtype=dtype, device=device)
    shift = xp.zeros_like(m)
    total = xp.zeros_like(m)
    acc = xp.zeros((bh, hh, g, r, d_v), dtype=dtype, device=device)
    for c0, c1, full in tiles:
        s = _scores(pb, hc, q_scaled, k, g, r0, r1, c0, c1, full)
        m_new = xp.maximum(m, xp.max(s, axis=-1, keepdims=True))
        new_shift = xp.where(xp.isfinite(m_new), m_new, xp.zeros_like(m_new))
        alpha = 2.0 ** (m - new_shift)  # 2^-inf = 0 before the first visible key
        s -= new_shift
        p = exp2_inplace(xp, s)
        total = alpha * total + xp.sum(p, axis=-1, keepdims=True)
        drop = tile(pb.drop, hc, r0, r1, c0, c1)
        if drop is not None:
            p = p * drop
        acc = alpha * acc + _split(xp, _merge(xp, p) @ v[:, :, c0:c1, :], g)
        m, shift = m_new, new_shift
    positive = total > 0
    safe = xp.where(positive, total, xp.ones_like(total))
    o = acc / safe
    lse = xp.where(positive, shift * math.log(2.0) + xp.log(safe), -math.inf)
    if weights is not None:
        _fill_weights(pb, tiles, hc, r0, r1, q_scaled, k, g, lse, weights)
    return o, lse[..., 0]


def _bounded_forward(
    pb: Problem,
    plan: Plan,
    items: list[tuple[Heads | None, list[tuple[Heads, int]]]],
    o: Array,
    lse: Array,
    *,
    serial: bool,
) -> list[tuple[Heads | None, list[tuple[Heads, int]]]]:
    r"""The forward in one pass per tile with a fixed shift; returns the declined work items.

    By Cauchy-Schwarz, :math:`b_i = \mathrm{scale}\,|q_i| \max_j |k_j|` bounds every score of
    row ``i`` from above, so ``e = exp(S - b) <= 1`` never overflows and needs no running max
    (and no rescaling of the accumulators). In base 2 (see "Base 2" in the module notes):

    .. math::

        E = 2^{\log_2 e\,(S - b)}, \qquad \ell = \mathrm{rowsum}\,E, \qquad
        O = E V / \ell, \qquad \mathrm{lse} = b + \log \ell,

    the same quantities as the online softmax, since any shift cancels. A tile takes one of two
    forms (:meth:`_BoundedCall._sums`):

    * *augmented*, when a kv head's keys meet more than :data:`_AUGMENT_ROWS` query rows
      (``g n_q``): both row terms move into the GEMMs as an extra column, with the keys
      augmented once per call or head chunk (:class:`BoundedKeys`),

      .. math::

          [Q,\ -b]\,\log_2 e\,[\mathrm{scale}\,K,\ 1]^\top = \log_2 e\,(S - b), \qquad
          E\,[V,\ 1] = [E V,\ \ell],

      leaving one elementwise pass per tile, the ``exp2``;
    * *plain*, otherwise: ``log2(e) scale Q K^T``, the ``exp2``, and the row sum as a GEMV
      ``E 1``. The shift is not needed at all when nothing can overflow without it: if every
      row of the unit has :math:`b_i \le \log(\mathrm{finfo.max}) - 1 - \log n_k -
      \log\max(\max|V|, 1)` (:class:`_Bounds`), then each weight :math:`e^{S} \le e^{b}`, each
      row sum and each entry of :math:`E V` stay below ``finfo.max / e``, and the unit runs
      with shift 0 (``lse = log l``), one elementwise pass per tile (the ``exp2``). Otherwise
      ``- log2(e) b`` is a second pass. (Unit-variance inputs at ``d = 64`` have ``b`` near
      10; the limit is about 80 in float32 and 700 in float64.)

    The copies of ``K`` and ``V`` are made once per call, before the threads start, and pay
    off over many row blocks; with few rows the plain form costs less (the crossover,
    :data:`_AUGMENT_ROWS`, was measured: docs/efficient.md).

    The thread that owns a unit computes its rows' ``|q_i|``. The per-head ``max_j |k_j|`` and
    ``max |V|`` (:class:`_Bounds`), vectorized over the whole call, are the first work item in
    the plain form: one lane computes them while the others start on their first score GEMM,
    which does not need them (:class:`_Once`); the augmented form needs them before its first
    GEMM, so they are computed before the threads start. The LSE and the acceptance test are
    computed after the threads end, vectorized.

    Besides removing that serial time, the work item staggers the lanes. Lanes that start
    together on equal units stay in step, and finish each GEMM together: both then want the
    GIL at the same moment, and the one that waits sleeps (docs/efficient.md has the figures).

    Precision. With the shift ``c`` (``b`` or 0) the largest weight of row ``i`` is
    ``exp(m - c)``, and it may lie far below 1: the bound may exceed the true row max ``m`` by a
    wide margin. Weights lose precision once they approach the smallest normal number. A unit
    is accepted only if every row has ``l >= n_k exp(-G)``, which ensures
    ``exp(m - c) >= exp(-G)`` (``l <= n_k exp(m - c)``), with ``G = -log(smallest_normal) / 4``
    (21.8 in float32, 177 in float64): at least three quarters of the exponent range stay below
    the largest weight, for the other weights and their products with ``V`` (:class:`_Bounds`
    declines ``V`` too small for that). A subnormal contribution then errs by at most half its
    spacing, ``smallest_normal * eps / 2``, so after the division by ``l`` each of the ``n_k``
    terms of ``O`` errs by at most ``smallest_normal^(3/4) eps / 2 <= eps max|V| / 2``. (A
    subnormal weight from ``exp2`` errs by at most 2 such spacings: after the division,
    ``2 smallest_normal^(3/4) eps max|V| / n_k`` per term, far below that.)
    Otherwise (wide gaps, rows with no visible key, non-finite inputs) the unit is returned,
    for the online softmax to compute. With unit-variance random inputs the gap ``b - m`` is a
    few units, far inside the limit; it grows with the norms of queries and keys that point
    apart. Shift 0 accepts every unit that shift ``b`` would: ``b >= 0``, so its row sums are
    at least as large.
    """
    xp = pb.xp
    if math.prod(pb.v.shape) == 0:  # no keys, values or batch: nothing to bound
        return items
    call = _BoundedCall.of(pb, plan, o)
    shared = None
    if call.augment:
        call.bounds.compute()  # the augmented queries [Q, -b] need them before any GEMM
        if call.bounds.get() is None:
            return items
        shared = BoundedKeys.of(pb) if _share_keys(pb, items) else None
        work: list[Any] = items
    else:
        # the plain form first needs the bounds after a unit's first score GEMM: one lane
        # computes them as the first work item while the others start on their GEMMs
        work = [None, *items]

    def run(item: tuple[Heads | None, list[tuple[Heads, int]]] | None) -> None:
        if item is None:
            call.bounds.compute()
            return
        chunk, units = item
        keys = None  # the plain form
        if call.augment:
            keys = shared if shared is not None else BoundedKeys.of(pb, chunk)
        for hc, ri in units:
            call.unit(hc, ri, keys)

    _run(xp, run, work, serial=serial)
    accepted = call.total >= call.min_total  # also False for NaN
    lse[...] = (call.shift + xp.log(xp.where(accepted, call.total, 1.0)))[..., 0]
    if all_true(xp, accepted):
        return []
    declined = []
    for hc, ri in plan.units:
        r0, r1 = plan.rows[ri]
        if not all_true(xp, accepted[hc.b0 : hc.b1, hc.h0 : hc.h1, :, r0:r1, :]):
            declined.append((None, [(hc, ri)]))
    return declined


class _Once:
    """A value computed once, by one work item of a parallel run, and awaited by the others.

    :func:`~refattn._runtime.parallel_map` hands out items in order, so the item that computes
    it is taken before any item that waits for it: no wait can deadlock. An exception raised
    while computing is raised again to every waiter.
    """

    def __init__(self, fn: Any) -> None:
        self._fn = fn
        self._ready = threading.Event()
        self._value: Any = None
        self._error: BaseException | None = None

    def compute(self) -> None:
        try:
            self._value = self._fn()
        except BaseException as error:
            self._error = error
            raise
        finally:
            self._ready.set()

    def get(self) -> Any:
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self._value


@dataclass
class _BoundedCall:
    """One call of :func:`_bounded_forward`: its outputs, and what its units share.

    ``shift`` and ``total`` are ``(B, Hkv, g, n_q, 1)``: per row the shift used (``b`` or 0)
    and the row sum ``l``; a unit that declines sets its rows' ``l`` to 0.
    """

    pb: Problem
    plan: Plan
    o: Array
    shift: Array
    total: Array
    bounds: _Once
    augment: bool
    min_total: float

    @classmethod
    def of(cls, pb: Problem, plan: Plan, o: Array) -> _BoundedCall:
        xp = pb.xp
        shape = (*pb.q.shape[:-1], 1)
        shift = xp.empty(shape, dtype=pb.q.dtype, device=device_of(pb.q))
        # a row sum is at most n_k times its largest weight: l >= n_k exp(-G) => max >= exp(-G)
        min_total = pb.n_k * float(xp.finfo(pb.q.dtype).smallest_normal) ** 0.25
        augment = int(pb.q.shape[2]) * pb.n_q > _AUGMENT_ROWS
        return cls(
            pb,
            plan,
            o,
            shift,
            xp.empty_like(shift),
            _Once(lambda: _Bounds.of(pb)),
            augment,
            min_total,
        )

    def unit(self, hc: Heads, ri: int, keys: BoundedKeys | None) -> None:
        """Rows ``plan.rows[ri]`` of heads ``hc``: writes their ``o``, ``shift`` and ``total``.

        ``keys`` selects the augmented form, None the plain one (see :func:`_bounded_forward`).
        """
        xp = self.pb.xp
        r0, r1 = self.plan.rows[ri]
        rows = (slice(hc.b0, hc.b1), slice(hc.h0, hc.h1), slice(None), slice(r0, r1), ...)
        try:
            acc, ell = self._sums(hc, ri, rows, keys)
        except _Declined:  # l = 0
            self.shift[rows] = 0.0
            self.total[rows] = 0.0
            return
        # rows with a small (or NaN) sum are declined later; raised, they warn of nothing
        self.o[rows] = acc / xp.maximum(ell, self.min_total)
        self.total[rows] = ell

    def _sums(self, hc: Heads, ri: int, rows: Any, keys: BoundedKeys | None) -> tuple[Array, Array]:
        """``(E V, rowsum E)``, ``(b, h, g, r, d_v)`` and ``(b, h, g, r, 1)``.

        Summed over the unit's visible tiles, with ``E = exp(S - shift)`` (:meth:`_row_shift`).
        The plain form asks for the shift only once the first tile's scores are computed: the
        bounds may still be on their way. Raises :class:`_Declined` if the unit has no visible
        tile or the call has no bounds.
        """
        pb, xp, plan = self.pb, self.pb.xp, self.plan
        tiles = plan.tiles(hc, ri)
        if not tiles:
            raise _Declined
        q = pb.q[rows]
        g = int(q.shape[2])
        r0, r1 = plan.rows[ri]
        norms = xp.sqrt(xp.vecdot(q, q, axis=-1))[..., None]
        if keys is not None:
            q_in = _merge(xp, _append_column(xp, q, -self._row_shift(rows, norms, hc, False)))
            k, v = keys.heads(keys.k, hc), keys.heads(keys.v, hc)
        else:
            q_in = _merge(xp, q * (pb.scale * LOG2E))
            k, v = heads_of(pb.k, hc), heads_of(pb.v, hc)
            ones = xp.ones((pb.n_k, 1), dtype=q.dtype, device=device_of(q))
        acc = ell = shift = None
        for i, (c0, c1, full) in enumerate(tiles):
            s = _scores(pb, hc, q_in, k, g, r0, r1, c0, c1, full)
            if keys is None:
                if i == 0:
                    shift = self._row_shift(rows, norms, hc, True)
                    shift = None if shift is None else shift * LOG2E
                if shift is not None:
                    s -= shift
            e = _merge(xp, exp2_inplace(xp, s))
            acc = _accumulate(acc, _split(xp, e @ v[:, :, c0:c1, :], g))
            if keys is None:
                ell = _accumulate(ell, _split(xp, e @ ones[c0:c1, :], g))
        if keys is not None:
            return acc[..., :-1], acc[..., -1:]
        return acc, ell

    def _row_shift(self, rows: Any, norms: Array, hc: Heads, plain: bool) -> Array | None:
        """The rows' shift: their bounds ``b``, or None (shift 0) where ``plain`` allows it.

        Waits for the bounds if another lane is still computing them; raises
        :class:`_Declined` if the call has none.
        """
        xp = self.pb.xp
        bounds = self.bounds.get()
        if bounds is None:
            raise _Declined
        bound = norms * heads_of(bounds.key, hc)
        if plain and all_true(xp, bound <= bounds.unshifted):
            self.shift[rows] = 0.0
            return None
        self.shift[rows] = bound
        return bound


class _Declined(Exception):
    """A unit that the bounded forward leaves to the online softmax."""


def _accumulate(total: Array | None, part: Array) -> Array:
    """``total + part``, in place into ``total``; ``part`` itself when ``total`` is None."""
    if total is None:
        return part
    total += part
    return total


def _fill_weights(
    pb: Problem,
    tiles: Sequence[tuple[int, int, bool]],
    hc: Heads,
    r0: int,
    r1: int,
    q_scaled: Array,
    k: Array,
    g: int,
    lse: Array,
    weights: Array,
) -> None:
    """Second pass over the tiles: ``P = exp(S - lse)`` into ``weights`` (0 elsewhere)."""
    xp = pb.xp
    lse_safe = xp.where(xp.isfinite(lse), lse * LOG2E, xp.zeros_like(lse))  # base 2
    for c0, c1, full in tiles:
        s = _scores(pb, hc, q_scaled, k, g, r0, r1, c0, c1, full)
        s -= lse_safe
        weights[hc.b0 : hc.b1, hc.h0 : hc.h1, :, r0:r1, c0:c1] = exp2_inplace(xp, s)


# ----------------------------------------------------------------------------- backward


def tiled_backward(
    pb: Problem,
    plan: Plan,
    o: Array,
    lse: Array,
    d_o: Array | None,
    d_w: Array | None = None,
    d_lse: Array | None = None,
    learned: ScoreGradients | None = None,
) -> tuple[Array, Array, Array]:
    """LSE-recompute backward: ``(dQ, dK, dV)`` in the canonical layout (and each tile's
    ``dB`` into ``learned`` for a learnable bias or softcap).

    ``o (B, Hkv, g, n_q, d_v)`` and ``lse (B, Hkv, g, n_q)`` from :func:`tiled_forward`;
    cotangents ``d_o`` like ``o``, ``d_w (B, Hkv, g, n_q, n_k)`` for returned weights and
    ``d_lse`` like ``lse`` (each may be None).
    """
    xp = pb.xp
    d_q = xp.zeros_like(pb.q)
    d_k = xp.zeros_like(pb.k)
    d_v = xp.zeros_like(pb.v)
    if d_o is None and d_w is None and d_lse is None:
        return d_q, d_k, d_v
    threaded = _is_threaded(xp) and not plan.small
    n_lanes = max(1, min(n_threads(), len(plan.units))) if threaded else 1
    items = plan.work(n_lanes)
    lanes = [(d_k, d_v)] * n_lanes
    if items and items[0][0] is None:  # lanes take single units: private dK, dV per lane
        lanes[1:] = [(xp.zeros_like(pb.k), xp.zeros_like(pb.v)) for _ in range(n_lanes - 1)]
    share = _share_keys(pb, items)
    shared = AugmentedKeys.of(pb, with_v=d_o is not None) if share else None
    queue = iter(items)
    lock = threading.Lock()

    def lane(t: int) -> None:
        lane_dk, lane_dv = lanes[t]
        while True:
            with lock:
                item = next(queue, None)
            if item is None:
                return
            chunk, units = item
            keys = shared if share else AugmentedKeys.of(pb, d_o is not None, chunk)
            for hc, ri in units:
                r0, r1 = plan.rows[ri]
                tiles = plan.tiles(hc, ri)
                dq_u = _backward_unit(
                    pb,
                    tiles,
                    hc,
                    r0,
                    r1,
                    o,
                    lse,
                    d_o,
                    d_w,
                    d_lse,
                    lane_dk,
                    lane_dv,
                    keys,
                    learned,
                )
                d_q[hc.b0 : hc.b1, hc.h0 : hc.h1, :, r0:r1, :] = dq_u

    _run(xp, lane, range(n_lanes), serial=n_lanes == 1)
    for lane_dk, lane_dv in lanes[1:]:
        if lane_dk is not d_k:
            d_k += lane_dk
            d_v += lane_dv
    return d_q, d_k, d_v


def _backward_unit(
    pb: Problem,
    tiles: Sequence[tuple[int, int, bool]],
    hc: Heads,
    r0: int,
    r1: int,
    o: Array,
    lse: Array,
    d_o: Array | None,
    d_w: Array | None,
    d_lse: Array | None,
    d_k: Array,
    d_v: Array,
    keys: AugmentedKeys,
    learned: ScoreGradients | None = None,
) -> Array:
    r"""Rows ``r0:r1`` of heads ``hc``: returns their ``dQ``, adds into ``d_k``, ``d_v``.

    The per-row constants are folded into the GEMMs as an extra column (:class:`AugmentedKeys`):

    .. math::

        [\mathrm{scale}\,Q,\ -\mathrm{lse}]\,\log_2 e\,[K,\ 1]^\top
            = \log_2 e\,(S - \mathrm{lse}), \qquad
        [dO,\ -c]\,[V,\ 1]^\top = dO\,V^\top - c,

    so a tile costs two elementwise passes (``exp2`` and the product ``P o (dP - c)``) besides
    its four GEMMs. With dropout, ``dP = (dO V^T) o D`` and ``c`` is subtracted separately.

    ``d_k`` and ``d_v`` are updated by ``__setitem__`` on the whole array (not through a view),
    which is portable across array-API backends.
    """
    xp = pb.xp
    rows = (slice(hc.b0, hc.b1), slice(hc.h0, hc.h1), slice(None), slice(r0, r1), ...)
    q = pb.q[rows]
    g = int(q.shape[2])
    lse_u = lse[rows][..., None]
    lse_safe = xp.where(xp.isfinite(lse_u), lse_u, xp.zeros_like(lse_u))
    capped = pb.softcap is not None or pb.score_mod is not None
    # with a softcap or a score modifier the LSE cannot ride in the GEMM (they come first):
    # it is subtracted per tile
    q_shifted = _merge(
        xp, _append_column(xp, q * pb.scale, 0.0 * lse_safe if capped else -lse_safe)
    )
    q_scaled = q_shifted[..., :-1]
    lse_2 = lse_safe * LOG2E
    k, k_aug = heads_of(pb.k, hc), keys.heads(keys.k, hc)

    def weights(c0: int, c1: int, full: bool) -> tuple[Array, ScoreChain | None]:
        """``P = exp(S - lse)`` of one tile and its score chain (None without cap or mod)."""
        if not capped:
            s = _scores(pb, hc, q_shifted, k_aug, g, r0, r1, c0, c1, full)
            return exp2_inplace(xp, s), None
        s = _split(xp, q_shifted @ xp.matrix_transpose(k_aug[:, :, c0:c1, :]), g)
        s, chain = masked_scores_and_slope(pb, s, hc, r0, r1, c0, c1, full=full, unit=LOG2E)
        s -= lse_2
        return exp2_inplace(xp, s), chain

    # the per-row constant c = Delta - dlse (+ rowsum(P o dW)), computed before the tile loop
    c = xp.zeros_like(lse_u)
    if d_o is not None:
        c = c + xp.sum(d_o[rows] * o[rows], axis=-1, keepdims=True)
    if d_lse is not None:
        c = c - d_lse[rows][..., None]
    d_w_u = None if d_w is None else d_w[rows]
    if d_w_u is not None:
        for c0, c1, full in tiles:  # extra pass: rowsum(P o dW) needs the whole row
            c = c + xp.sum(weights(c0, c1, full)[0] * d_w_u[..., c0:c1], axis=-1, keepdims=True)
    d_o_m = d_o_shifted = None
    if d_o is not None:
        d_o_m = _merge(xp, d_o[rows])
        if keys.v is not None:
            d_o_shifted = _merge(xp, _append_column(xp, d_o[rows], -c))
    d_q = xp.zeros(tuple(q_scaled.shape), dtype=q.dtype, device=device_of(q))
    for c0, c1, full in tiles:
        p, chain = weights(c0, c1, full)
        drop = tile(pb.drop, hc, r0, r1, c0, c1)
        if d_o_m is not None:
            p_drop = p if drop is None else p * drop
            d_v[rows[0], rows[1], c0:c1, :] += xp.matrix_transpose(_merge(xp, p_drop)) @ d_o_m
            if d_o_shifted is not None:  # no dropout: dO V^T - c in one GEMM
                v_t = xp.matrix_transpose(keys.heads(keys.v, hc)[:, :, c0:c1, :])
                d_p = _split(xp, matmul_scratch(xp, d_o_shifted, v_t, "dp"), g)
            else:
                v_t = xp.matrix_transpose(heads_of(pb.v, hc)[:, :, c0:c1, :])
                d_p = _split(xp, matmul_scratch(xp, d_o_m, v_t, "dp"), g)
                d_p *= drop
                d_p -= c
            if d_w_u is not None:
                d_p += d_w_u[..., c0:c1]
            d_p *= p  # d_p is this tile's own array: dS = P o (dP - c) in place
        else:
            d_p = p * (-c if d_w_u is None else d_w_u[..., c0:c1] - c)
        if chain is not None:
            d_p = chain.to_bias(d_p)
        if learned is not None:
            learned.add(d_p, chain, hc, r0, r1, c0, c1)  # dB, before the cap's slope
        if chain is not None:
            d_p = chain.to_scores(d_p)
        d_s = _merge(xp, d_p)
        d_q += d_s @ k[:, :, c0:c1, :]
        d_k[rows[0], rows[1], c0:c1, :] += xp.matrix_transpose(d_s) @ q_scaled
    return _split(xp, d_q, g) * pb.scale


@dataclass
class AugmentedKeys(_ChunkKeys):
    """``LOG2E [K, 1]`` and, without dropout, ``[V, 1]`` (else None) for :func:`_backward_unit`.

    ``LOG2E`` on the keys puts the recomputed scores in base-2 units while the scaled queries,
    which ``dK`` needs, stay as they are.
    """

    k: Array
    v: Array | None

    @classmethod
    def of(cls, pb: Problem, with_v: bool, chunk: Heads | None = None) -> AugmentedKeys:
        xp = pb.xp
        k = pb.k if chunk is None else heads_of(pb.k, chunk)
        v = None
        if with_v and pb.drop is None:
            v = _append_column(xp, pb.v if chunk is None else heads_of(pb.v, chunk))
        return cls(chunk, _base2_keys(xp, k, 1.0), v)


# ----------------------------------------------------------------------------- SDPA


@dataclass
class TiledResiduals:
    """What the tiled forward saves: the problem (inputs), the plan, ``O`` and the LSE."""

    pb: Problem
    plan: Plan
    o: Array
    lse: Array
    saved_weights: Array | None = None

    def weights(self) -> Array | None:
        """The weights ``P`` if the forward returned them (they are an output), else None."""
        return self.saved_weights

    def vjp(
        self,
        d_o: Array | None,
        d_w: Array | None = None,
        d_lse: Array | None = None,
        learned: ScoreGradients | None = None,
    ) -> tuple[Array, Array, Array]:
        """Canonical ``(dQ, dK, dV)`` from canonical cotangents (see :func:`tiled_backward`)."""
        return tiled_backward(self.pb, self.plan, self.o, self.lse, d_o, d_w, d_lse, learned)


def forward(
    pb: Problem, *, want_weights: bool, plan: Plan | None = None
) -> tuple[Array, Array | None, Array, TiledResiduals]:
    """``(O, P or None, lse, residuals)`` in the canonical layout.

    The causal mask is never built: it is ``pb.pattern``, whose fully hidden tiles are skipped.
    ``want_weights`` works (the ``n_q x n_k`` weights are then an output, so they are
    materialized, from the final LSE), but the forward itself and the saved state stay
    ``O(n d)``.
    """
    plan = plan or make_plan(pb)
    o, lse, weights = tiled_forward(pb, plan, want_weights=want_weights)
    if pb.sinks is not None:  # the sinks' share of each row (Problem.add_sinks)
        lse, r = pb.add_sinks(lse)
        o = o * r[..., None]
        weights = None if weights is None else weights * r[..., None]
    return o, weights, lse, TiledResiduals(pb, plan, o, lse, weights)
