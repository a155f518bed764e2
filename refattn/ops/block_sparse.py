r"""Block-sparse exact attention: the tiled kernels run on the listed (query, key) blocks only.

``layout[a, c]`` True lists the pair (query block ``a``, key block ``c``), blocks of
``block_size`` positions (the last one short when ``n`` is not a multiple). Query ``i`` attends
key ``j`` iff ``layout[i // b, j // b]`` (and ``j <= i`` when causal):

.. math::

    O_i = \sum_{j \in N(i)} \mathrm{softmax}_j(\mathrm{scale}\; q_i \cdot k_j)\, v_j, \qquad
    N(i) = \{j : \mathrm{layout}[\lfloor i/b \rfloor, \lfloor j/b \rfloor]\}
    \;(\cap \{j \le i\}).

The tile plan of :mod:`refattn.ops.sdpa.tiled` is built from the layout itself: each query block
is one unit whose tiles are its listed key blocks, runs of adjacent ones merged (diagonal blocks
of a causal call are partial tiles, masked from indices; blocks above the diagonal are
dropped). The forward is the online softmax over those tiles, saving ``O`` and the LSE; the
backward recomputes ``P`` per listed tile with ``D = rowsum(dO o O)``. Cost ``O(nnz b^2 d)``,
memory ``O(n d)`` plus a few tiles per thread. A row that sees no key gets ``O = 0``,
``lse = -inf`` and zero gradients, as SDPA's fully masked rows do.

The layout is read on the host (NumPy, or scipy.sparse): it is index data that decides which
tiles exist, a Python-level plan like :func:`~refattn.ops.sdpa.plan.plan_tiles`, not array
math, so a device array is copied to the host once per call.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np  # host-side index construction only (the layout), see the module docstring

from .._backend import describe, is_sparse, itemsize
from .._op import Op
from .sdpa.plan import DEFAULT_BLOCK, EMPTY, FULL, TILE_BYTES, Heads, Pattern, Plan
from .sdpa.problem import Problem, check_block_size, prepare
from .sdpa.tiled import tiled_backward, tiled_forward

__all__ = ["block_sparse_attention", "block_sparse_mask", "host_layout"]

Array = Any

_OP = "block_sparse_attention"


def _n_blocks(n: int, b: int) -> int:
    return -(-n // b)


def host_layout(layout: Any, name: str = "layout") -> np.ndarray:
    """``layout`` as a host NumPy bool array (2-D or 3-D), checking its type.

    Dense layouts must be boolean. A ``scipy.sparse`` layout lists its stored entries, which
    must all be nonzero: a stored zero is ambiguous (listed or not?) and is refused.
    """
    if is_sparse(layout):
        coo = layout.tocoo()
        data = coo.data.get() if hasattr(coo.data, "get") else np.asarray(coo.data)
        if data.size and not np.all(data != 0):
            raise ValueError(
                f"refattn.{_OP}: {name} is a sparse matrix with {int(np.sum(data == 0))} "
                "explicitly stored zero(s); store only the listed blocks (call eliminate_zeros())"
            )
        dense = np.zeros(coo.shape, dtype=bool)
        rows = coo.row.get() if hasattr(coo.row, "get") else np.asarray(coo.row)
        cols = coo.col.get() if hasattr(coo.col, "get") else np.asarray(coo.col)
        dense[rows, cols] = True
        return dense
    if hasattr(layout, "get") and not isinstance(layout, np.ndarray):  # cupy
        host = layout.get()
    else:
        try:
            host = np.from_dlpack(layout) if not isinstance(layout, np.ndarray) else layout
        except (TypeError, AttributeError, BufferError, RuntimeError):
            host = np.asarray(layout)
    if host.dtype != np.bool_:
        raise TypeError(
            f"refattn.{_OP}: {name} must be a boolean block matrix (True = computed block), "
            f"got {describe(layout)}"
        )
    if host.ndim not in (2, 3):
        raise ValueError(
            f"refattn.{_OP}: {name} must be (n_q_blocks, n_k_blocks) or (heads, n_q_blocks, "
            f"n_k_blocks), got shape {tuple(host.shape)}"
        )
    return host


def block_sparse_mask(
    layout: Any,
    block_size: int | tuple[int, int],
    n_q: int,
    n_k: int | None = None,
    *,
    is_causal: bool = False,
) -> np.ndarray:
    """The element mask ``(…, n_q, n_k)`` (host NumPy bool) equivalent to a block layout.

    ``mask[…, i, j] = layout[…, i // b_q, j // b_k]`` (and ``j <= i`` when causal): for
    references and tests; :func:`block_sparse_attention` never builds it.
    """
    b_q, b_k = check_block_size(block_size, _OP) or (1, 1)
    n_k = n_q if n_k is None else n_k
    lay = host_layout(layout)
    keep = lay[..., np.arange(n_q) // b_q, :][..., np.arange(n_k) // b_k]
    if is_causal:
        keep = keep & np.tril(np.ones((n_q, n_k), dtype=bool))
    return keep


def _head_chunks(b: int, h_kv: int, per_unit: int) -> tuple[Heads, ...]:
    """Chunks of (batch, kv head) whose tiles together fit ``per_unit`` heads' worth."""
    per_unit = max(1, per_unit)
    if per_unit >= b * h_kv:
        return (Heads(0, b, 0, h_kv),)
    if per_unit >= h_kv:
        step = per_unit // h_kv
        return tuple(Heads(b0, min(b0 + step, b), 0, h_kv) for b0 in range(0, b, step))
    return tuple(
        Heads(b0, b0 + 1, h0, min(h0 + per_unit, h_kv))
        for b0 in range(b)
        for h0 in range(0, h_kv, per_unit)
    )


def _layout_plan(pb: Problem, layout: np.ndarray, blocks: tuple[int, int]) -> Plan:
    """The tile plan of one head's 2-D layout: per query block, its listed key blocks.

    Adjacent listed key blocks that are fully visible are merged into one tile of up to
    :data:`~refattn.ops.sdpa.plan.DEFAULT_BLOCK` keys (a window of BigBird blocks becomes one
    wide tile): the kernels then do one GEMM where they would do several small ones, and the
    positions computed are the same. Partial tiles (a causal call's diagonal) stay single.
    """
    b_q, b_k = blocks
    n_q, n_k = pb.n_q, pb.n_k
    rows = tuple((r0, min(r0 + b_q, n_q)) for r0 in range(0, n_q, b_q))
    cols = [(c0, min(c0 + b_k, n_k)) for c0 in range(0, n_k, b_k)]
    pattern = pb.pattern
    widest = max(b_k, DEFAULT_BLOCK)
    visible = []
    scores = 0
    for a, (r0, r1) in enumerate(rows):
        tiles: list[tuple[int, int, bool]] = []
        for c in np.flatnonzero(layout[a]).tolist():
            c0, c1 = cols[c]
            state = FULL if pattern is None else pattern.tile_state(r0, r1, c0, c1)
            if state == EMPTY:
                continue
            scores += (r1 - r0) * (c1 - c0)
            if tiles and state == FULL and tiles[-1][2] and tiles[-1][1] == c0:
                if c1 - tiles[-1][0] <= widest:
                    tiles[-1] = (tiles[-1][0], c1, True)
                    continue
            tiles.append((c0, c1, state == FULL))
        visible.append(tuple(tiles))
    b, h_kv, g = (int(s) for s in pb.q.shape[:3])
    elem = itemsize(pb.xp, pb.q.dtype)
    tile = max(1, g * b_q * widest * elem)
    heads = _head_chunks(b, h_kv, TILE_BYTES // tile)
    return Plan(heads, rows, tuple(visible), elem * b * h_kv * g * scores)


@dataclasses.dataclass
class BlockSparseResiduals:
    """Per group of heads sharing one layout: ``(sub-problem, plan, O, lse, (h, g) slices)``."""

    pb: Problem
    parts: list[tuple[Problem, Plan, Array, Array, int, int | None]]


def _block_sparse_fwd(
    q: Array,
    k: Array,
    v: Array,
    /,
    *,
    layout: Any,
    block_size: int | tuple[int, int],
    scale: float | None = None,
    is_causal: bool = False,
    enable_gqa: bool = False,
    return_lse: bool = False,
) -> tuple[Any, BlockSparseResiduals]:
    r"""Exact attention computed on the listed blocks of ``layout`` only.

    Parameters
    ----------
    q : (..., Hq, n_q, d_k)
    k : (..., Hkv, n_k, d_k)
    v : (..., Hkv, n_k, d_v)
        ``Hq`` a multiple of ``Hkv`` (GQA: query head ``h`` uses kv head ``h // (Hq // Hkv)``);
        with ``Hq != Hkv`` pass ``enable_gqa=True`` (torch's flag).
    layout : bool (nqb, nkb) or (Hq, nqb, nkb), or a 2-D scipy.sparse matrix
        ``nqb = ceil(n_q / b_q)``, ``nkb = ceil(n_k / b_k)``; shared by all heads, or one per
        query head. Read on the host.
    block_size : int or (b_q, b_k)
    scale : float, optional
        Defaults to ``1 / sqrt(d_k)``.
    is_causal : bool
        Also hide ``j > i`` (upper-left, as SDPA): diagonal blocks are masked inside.
    return_lse : bool
        Also return the per-row LSE (..., Hq, n_q), ``-inf`` for rows that see nothing.

    Returns
    -------
    out : (..., Hq, n_q, d_v), or ``(out, lse)``.
    """
    if not isinstance(is_causal, bool):
        raise TypeError(f"refattn.{_OP}: is_causal must be a bool, got {is_causal!r}")
    if not isinstance(enable_gqa, bool):
        raise TypeError(f"refattn.{_OP}: enable_gqa must be a bool, got {enable_gqa!r}")
    if block_size is None:
        raise ValueError(f"refattn.{_OP}: block_size is required (the layout's block size)")
    blocks = check_block_size(block_size, _OP)
    pb = prepare(q, k, v, scale=scale, op=_OP)
    _, h_kv, g = (int(s) for s in pb.q.shape[:3])
    if g > 1 and not enable_gqa:
        raise ValueError(
            f"refattn.{_OP}: q has {h_kv * g} heads and k, v {h_kv}; pass enable_gqa=True for "
            "grouped-query attention"
        )
    lay = host_layout(layout)
    want = (_n_blocks(pb.n_q, blocks[0]), _n_blocks(pb.n_k, blocks[1]))
    if tuple(lay.shape[-2:]) != want or (lay.ndim == 3 and lay.shape[0] != h_kv * g):
        expected = f"{want} or ({h_kv * g}, {want[0]}, {want[1]})"
        raise ValueError(
            f"refattn.{_OP}: layout must have shape {expected} for n_q={pb.n_q}, n_k={pb.n_k} "
            f"and block_size={blocks} (ceil(n / b) blocks, the last one short), got "
            f"{tuple(lay.shape)}"
        )
    if is_causal:
        pb = dataclasses.replace(pb, pattern=Pattern(causal=0))
    xp = pb.xp
    parts = []
    if lay.ndim == 2 or all(np.array_equal(lay[0], x) for x in lay[1:]):
        shared = lay if lay.ndim == 2 else lay[0]
        plan = _layout_plan(pb, shared, blocks)
        o, lse, _ = tiled_forward(pb, plan)
        parts.append((pb, plan, o, lse, 0, None))
    else:  # one tiled call per query head: the plan is shared by the heads of one call
        for h in range(h_kv):
            for gi in range(g):
                sub = dataclasses.replace(
                    pb,
                    q=pb.q[:, h : h + 1, gi : gi + 1, ...],
                    k=pb.k[:, h : h + 1, ...],
                    v=pb.v[:, h : h + 1, ...],
                )
                plan = _layout_plan(sub, lay[h * g + gi], blocks)
                o_h, lse_h, _ = tiled_forward(sub, plan)
                parts.append((sub, plan, o_h, lse_h, h, gi))
        o = _assemble(xp, [p[2] for p in parts], h_kv, g)
        lse = _assemble(xp, [p[3] for p in parts], h_kv, g)
    residuals = BlockSparseResiduals(pb, parts)
    return pb.result(o, None, lse, return_lse=return_lse), residuals


def _assemble(xp: Any, pieces: list[Array], h_kv: int, g: int) -> Array:
    """Per-(kv head, group member) pieces ``(B, 1, 1, …)`` into ``(B, Hkv, g, …)``."""
    heads = [xp.concat(pieces[h * g : (h + 1) * g], axis=2) for h in range(h_kv)]
    return xp.concat(heads, axis=1)


def _block_sparse_bwd(
    residuals: BlockSparseResiduals, cotangent: Any, /, *, return_lse: bool = False
) -> tuple[Array, Array, Array]:
    r"""VJP: the softmax-attention VJP restricted to the listed blocks.

    With :math:`P_{ij} = e^{S_{ij} - \mathrm{lse}_i}` on listed pairs (0 elsewhere), recomputed
    per listed tile from the saved LSE, and :math:`\Delta_i = dO_i \cdot O_i`:

    .. math::

        dV_j = \sum_i P_{ij}\, dO_i, \qquad
        dS_{ij} = P_{ij}\,(dO_i \cdot v_j - \Delta_i + d\mathrm{lse}_i), \\
        dQ_i = \mathrm{scale} \sum_j dS_{ij}\, k_j, \qquad
        dK_j = \mathrm{scale} \sum_i dS_{ij}\, q_i .

    Unlisted pairs have ``P = 0``, hence ``dS = 0``: skipping their tiles is exact.
    """
    pb = residuals.pb
    xp = pb.xp
    d_o, _, d_lse = pb.cotangents(cotangent, return_weights=False, return_lse=return_lse)
    parts = residuals.parts
    if parts[0][5] is None:
        sub, plan, o, lse, _, _ = parts[0]
        return pb.gradients(*tiled_backward(sub, plan, o, lse, d_o, None, d_lse))
    _, h_kv, g = (int(s) for s in pb.q.shape[:3])
    d_qs, d_ks, d_vs = [], [], []
    for sub, plan, o, lse, h, gi in parts:
        sl = (slice(None), slice(h, h + 1), slice(gi, gi + 1), ...)
        d_o_h = None if d_o is None else d_o[sl]
        d_lse_h = None if d_lse is None else d_lse[sl]
        d_q, d_k, d_v = tiled_backward(sub, plan, o, lse, d_o_h, None, d_lse_h)
        d_qs.append(d_q)
        if gi == 0:
            d_ks.append(d_k)
            d_vs.append(d_v)
        else:
            d_ks[-1] = d_ks[-1] + d_k
            d_vs[-1] = d_vs[-1] + d_v
    return pb.gradients(
        _assemble(xp, d_qs, h_kv, g), xp.concat(d_ks, axis=1), xp.concat(d_vs, axis=1)
    )


block_sparse_attention = Op(
    _block_sparse_fwd, _block_sparse_bwd, name="block_sparse_attention", register=True
)
