r"""Exact SDPA on Dask: one task per visible (query block, key block) pair, LSE-combine trees.

The inputs are dask arrays chunked along the sequence axis (-2) only; a chunk of ``q`` is a
*query block*, a chunk of ``k``/``v`` a *key block*. The graph, built here from the chunk
boundaries alone (nothing is computed while it is built):

* forward: for each query block ``r`` and each key block ``c`` it can see, a task
  :func:`~refattn.distributed.blocks.pair_forward` gives the pair's partial ``(O_rc, lse_rc)``;
  the partials of a row block are merged by a tree of
  :func:`~refattn.distributed.blocks.merge_partials` tasks (``split_every`` inputs each), whose
  root is that block of ``out`` and ``lse``. A pair that sees nothing (above the causal
  diagonal, or past every key length) is never scheduled; a row block that sees nothing at all
  is one task of zeros and ``-inf``.
* backward: for the same pairs, :func:`~refattn.distributed.blocks.pair_backward` gives the
  pair's ``(dQ_r, dK_c, dV_c)`` terms from the rows' global ``out``, ``lse`` and ``d_out``;
  trees of :func:`~refattn.distributed.blocks.sum_blocks` reduce ``dQ`` over key blocks and
  ``dK``, ``dV`` over query blocks.

Every reduction has a fixed shape and order, and each task runs refattn's kernels serially
(:func:`refattn._runtime.serial`), so a result is bitwise the same however the scheduler
places, loses and re-runs tasks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import dask
import dask.array as da
from dask.array.utils import meta_from_array

from .._backend import namespace, real_number
from ..ops.masks import check_alignment
from ..ops.sdpa.plan import EMPTY
from ..ops.sdpa.problem import check_block_size
from . import blocks

__all__ = ["scaled_dot_product_attention", "sdpa_backward", "vjp"]

Array = Any
OP = "refattn.distributed.scaled_dot_product_attention"


@dataclass(frozen=True)
class Pair:
    """One scheduled task: query block ``r`` against key block ``c``."""

    r: int
    c: int
    delta: int | None  # the pair's local causal offset (None: no causal rule inside it)
    c0: int  # global index of the key block's first key


@dataclass(frozen=True)
class Layout:
    """A validated call: the blocks, the visible pairs and the options every task takes."""

    q_chunks: tuple[int, ...]
    k_chunks: tuple[int, ...]
    pairs: tuple[Pair, ...]
    scale: float
    key_lengths: tuple[int, ...] | None
    shifts: tuple[int, ...] | None  # per sequence: its diagonal below the pairs' delta
    block_size: tuple[int, int] | None
    split_every: int
    d_v: int
    meta: Any

    def rows(self, r: int) -> list[Pair]:
        return [p for p in self.pairs if p.r == r]

    def cols(self, c: int) -> list[Pair]:
        return [p for p in self.pairs if p.c == c]

    def task_options(self, pair: Pair) -> dict[str, Any]:
        return {
            "delta": pair.delta,
            "c0": pair.c0,
            "key_lengths": self.key_lengths,
            "shifts": self.shifts,
            "scale": self.scale,
            "block_size": self.block_size,
        }


# ----------------------------------------------------------------------------- validation


def _check_dask(name: str, x: Any) -> None:
    if not isinstance(x, da.Array):
        raise TypeError(
            f"{OP}: {name} must be a dask array chunked along the sequence axis (-2), e.g. "
            f"dask.array.from_array(x, chunks=(..., block, -1)), got {type(x).__module__}."
            f"{type(x).__name__}"
        )


def _check_chunks(name: str, x: da.Array, seq: int = -2) -> None:
    """Only the sequence axis ``seq`` may have several chunks: a task takes every head and
    feature of a block."""
    keep = x.ndim + seq
    others = [(axis, c) for axis, c in enumerate(x.chunks) if axis != keep and len(c) > 1]
    if others:
        axis, c = others[0]
        raise ValueError(
            f"{OP}: {name} must be chunked along the sequence axis ({seq}) only, but axis "
            f"{axis} has {len(c)} chunks {c}; use {name}.rechunk({{{axis}: -1}})"
        )


def _check_key_lengths(key_lengths: Any, n_batch: int, n_k: int) -> tuple[int, ...] | None:
    """Concrete ints in ``[0, n_k]``, one per (flattened) batch element: the graph needs them to
    leave out the pairs that see only padding."""
    if key_lengths is None:
        return None
    if isinstance(key_lengths, da.Array):
        raise TypeError(
            f"{OP}: key_lengths must be concrete (a list or NumPy array of ints): the graph "
            "skips padded key blocks when it is built; compute it first"
        )
    try:
        values = [v.item() if hasattr(v, "item") else v for v in list(key_lengths)]
    except TypeError:
        raise TypeError(
            f"{OP}: key_lengths must be a sequence of ints, got {key_lengths!r}"
        ) from None
    if len(values) != n_batch or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in values
    ):
        raise ValueError(
            f"{OP}: key_lengths must hold {n_batch} ints (one per batch element, batch axes "
            f"flattened), got {key_lengths!r}"
        )
    bad = [v for v in values if not 0 <= v <= n_k]
    if bad:
        raise ValueError(f"{OP}: key_lengths must be in [0, n_k = {n_k}], got {bad[0]}")
    return tuple(values)


def _check_split_every(split_every: Any) -> int:
    if isinstance(split_every, bool) or not isinstance(split_every, int) or split_every < 2:
        raise ValueError(f"{OP}: split_every must be an int >= 2, got {split_every!r}")
    return split_every


def _check_qkv(q: Any, k: Any, v: Any) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_dask(name, x)
    if q.ndim < 3 or k.ndim != q.ndim or v.ndim != q.ndim:
        raise ValueError(
            f"{OP}: q, k and v must have the same number of dimensions, at least 3 "
            f"(..., H, n, d), got q {q.shape}, k {k.shape}, v {v.shape}"
        )
    dtypes = {str(x.dtype) for x in (q, k, v)}
    if len(dtypes) != 1 or q.dtype.name not in ("float32", "float64"):
        raise TypeError(
            f"{OP}: q, k and v must share one dtype, float32 or float64, got "
            f"{q.dtype}, {k.dtype}, {v.dtype}"
        )
    batch = q.shape[:-3]
    h_q, h_kv = q.shape[-3], k.shape[-3]
    if (
        k.shape[:-3] != batch
        or v.shape[:-3] != batch
        or v.shape[-3] != h_kv
        or k.shape[-1] != q.shape[-1]
        or v.shape[-2] != k.shape[-2]
        or h_kv == 0
        or h_q % h_kv
    ):
        raise ValueError(
            f"{OP}: shapes must be q (..., Hq, n_q, d_k), k (..., Hkv, n_k, d_k), v (..., Hkv, "
            f"n_k, d_v) with Hq a multiple of Hkv, got q {q.shape}, k {k.shape}, v {v.shape}"
        )
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_chunks(name, x)
    if k.chunks[-2] != v.chunks[-2]:
        raise ValueError(
            f"{OP}: k and v must have the same chunks along axis -2, got {k.chunks[-2]} and "
            f"{v.chunks[-2]}"
        )


def layout(
    q: Any,
    k: Any,
    v: Any,
    *,
    is_causal: bool,
    causal_alignment: str,
    scale: float | None,
    key_lengths: Any,
    block_size: Any,
    split_every: int,
) -> Layout:
    """Validate a call (before any task exists) and list the pairs that see any key."""
    _check_qkv(q, k, v)
    if not isinstance(is_causal, bool):
        raise TypeError(f"{OP}: is_causal must be a bool, got {is_causal!r}")
    check_alignment(causal_alignment)
    d_k = int(q.shape[-1])
    scale = 1.0 / math.sqrt(d_k) if scale is None else real_number(OP, "scale", scale)
    n_q, n_k = int(q.shape[-2]), int(k.shape[-2])
    lengths = _check_key_lengths(key_lengths, math.prod(q.shape[:-3]), n_k)
    offset = blocks.causal_offset(causal_alignment, n_q, n_k) if is_causal else None
    shifts = None
    if offset is not None and lengths is not None and causal_alignment == "lower_right":
        # each sequence on its own diagonal k_b - n_q; the pairs carry the loosest one
        offset = max(n - n_q for n in lengths)
        shifts = tuple(offset - (n - n_q) for n in lengths)
    q_chunks, k_chunks = tuple(q.chunks[-2]), tuple(k.chunks[-2])
    pairs = []
    r0 = 0
    for r, rows in enumerate(q_chunks):
        c0 = 0
        for c, cols in enumerate(k_chunks):
            delta = None if offset is None else offset + r0 - c0
            state, _ = blocks.pair_state(delta, rows, cols, c0, lengths)
            if state != EMPTY:
                pairs.append(Pair(r, c, delta, c0))
            c0 += cols
        r0 += rows
    return Layout(
        q_chunks=q_chunks,
        k_chunks=k_chunks,
        pairs=tuple(pairs),
        scale=scale,
        key_lengths=lengths,
        shifts=shifts,
        block_size=check_block_size(block_size, OP),
        split_every=_check_split_every(split_every),
        d_v=int(v.shape[-1]),
        meta=meta_from_array(q),
    )


def _check_like(
    name: str, x: Any, shape: tuple[int, ...], chunks: tuple[int, ...], dtype: Any, seq: int = -2
) -> None:
    """``x`` is a dask array of ``shape`` and ``dtype``, chunked like the rows on axis ``seq``."""
    _check_dask(name, x)
    if tuple(x.shape) != shape:
        raise ValueError(f"{OP}: {name} must have shape {shape}, got {tuple(x.shape)}")
    if x.dtype != dtype:
        raise TypeError(f"{OP}: {name} must have dtype {dtype}, got {x.dtype}")
    _check_chunks(name, x, seq)
    if tuple(x.chunks[seq]) != chunks:
        raise ValueError(
            f"{OP}: {name} must be chunked like q's rows along axis {seq}, {chunks}, got "
            f"{x.chunks[seq]}; use {name}.rechunk({{{seq}: q.chunks[-2]}})"
        )


# ----------------------------------------------------------------------------- graphs


def _blocks_of(x: da.Array) -> list[Any]:
    """The chunks of ``x`` along axis -2, as delayed objects (other axes have one chunk)."""
    return list(x.to_delayed(optimize_graph=False).reshape(-1))


def _tree(items: list[Any], fn: Callable[..., Any], split_every: int, nout: int | None) -> Any:
    """Reduce ``items`` with ``fn`` taking up to ``split_every`` at a time, in a fixed order."""
    task = dask.delayed(fn, pure=True, nout=nout)
    while len(items) > 1:
        items = [task(*items[i : i + split_every]) for i in range(0, len(items), split_every)]
    return items[0]


def _concat(parts: list[Any], shapes: list[tuple[int, ...]], meta: Any, axis: int = -2) -> da.Array:
    """The delayed blocks ``parts`` of ``shapes`` joined along the sequence ``axis``."""
    arrays = [
        da.from_delayed(part, shape=shape, dtype=meta.dtype, meta=meta)
        for part, shape in zip(parts, shapes, strict=True)
    ]
    return da.concatenate(arrays, axis=axis)


def _pick(index: int, *parts: tuple[Array, ...]) -> Array:
    """``sum_blocks`` of item ``index`` of each pair's gradient tuple."""
    return blocks.sum_blocks(*(p[index] for p in parts))


def scaled_dot_product_attention(
    q: da.Array,
    k: da.Array,
    v: da.Array,
    /,
    *,
    is_causal: bool = False,
    causal_alignment: str = "upper_left",
    scale: float | None = None,
    key_lengths: Sequence[int] | None = None,
    return_lse: bool = False,
    block_size: int | tuple[int, int] | None = None,
    split_every: int = 4,
) -> da.Array | tuple[da.Array, da.Array]:
    r"""Exact scaled dot-product attention on Dask arrays, lazily.

    The same op as :func:`refattn.scaled_dot_product_attention` (softmax weights, no bias or
    dropout), ``O = softmax(scale · QKᵀ, mask) V``, computed block pair by block pair (module
    docstring) and equal to the single-process tiled kernel to float rounding.

    Parameters
    ----------
    q : dask array (..., Hq, n_q, d_k), chunked along axis -2 only
    k : dask array (..., Hkv, n_k, d_k), chunked along axis -2 only
    v : dask array (..., Hkv, n_k, d_v), chunked like ``k``
        float32 or float64, one dtype; ``Hq`` a multiple of ``Hkv`` (GQA: query head ``h``
        uses kv head ``h // (Hq // Hkv)``). The chunks may be uneven; ``q``'s and ``k``'s need
        not match. A chunk holds every head: each task computes ``Hq x b_q x b_k`` scores, a
        few tiles at a time.
    is_causal, causal_alignment :
        As in the core op: key ``j`` is visible to query ``i`` iff ``j <= i`` ("upper_left") or
        ``j <= i + n_k - n_q`` ("lower_right"). Pairs entirely above the diagonal are not
        scheduled.
    scale : float, optional
        Defaults to ``1 / sqrt(d_k)``.
    key_lengths : sequence of ints, optional
        Padding: batch element ``b`` (batch axes flattened) sees keys ``j < key_lengths[b]``
        only; with "lower_right" its diagonal is its own, ``j <= i + key_lengths[b] - n_q``
        (the core op's rule). Concrete values, since pairs past every length are left out of
        the graph.
        A row that sees no key gives ``out = 0``, ``lse = -inf`` (and zero gradients).
    return_lse : bool
        Also return the LSE (..., Hq, n_q), chunked like ``q``.
    block_size : int or (block_q, block_k), optional
        Tile size *inside* each task (the core tiled kernel's; default 512).
    split_every : int >= 2
        Fan-in of the merge and sum trees: a row block's ``m`` partials take
        ``ceil(log_split_every m)`` levels.

    Returns
    -------
    out : dask array (..., Hq, n_q, d_v), chunked like ``q`` (and ``lse`` if requested).
    """
    lay = layout(
        q,
        k,
        v,
        is_causal=is_causal,
        causal_alignment=causal_alignment,
        scale=scale,
        key_lengths=key_lengths,
        block_size=block_size,
        split_every=split_every,
    )
    out, lse = _forward(lay, q, k, v)
    return (out, lse) if return_lse else out


def _forward(lay: Layout, q: da.Array, k: da.Array, v: da.Array) -> tuple[da.Array, da.Array]:
    q_blocks, k_blocks, v_blocks = _blocks_of(q), _blocks_of(k), _blocks_of(v)
    pair_task = dask.delayed(blocks.pair_forward, pure=True, nout=2)
    empty_task = dask.delayed(blocks.empty_partial, pure=True, nout=2)
    merged = []
    for r, q_block in enumerate(q_blocks):
        partials = [
            pair_task(q_block, k_blocks[p.c], v_blocks[p.c], **lay.task_options(p))
            for p in lay.rows(r)
        ]
        if not partials:
            merged.append(empty_task(q_block, lay.d_v))
        else:
            merged.append(_tree(partials, blocks.merge_partials, lay.split_every, nout=2))
    lead = tuple(q.shape[:-2])
    out = _concat([m[0] for m in merged], [(*lead, n, lay.d_v) for n in lay.q_chunks], lay.meta)
    lse_meta = meta_from_array(lay.meta, ndim=q.ndim - 1)
    lse = _concat([m[1] for m in merged], [(*lead, n) for n in lay.q_chunks], lse_meta, axis=-1)
    return out, lse


def sdpa_backward(
    q: da.Array,
    k: da.Array,
    v: da.Array,
    out: da.Array,
    lse: da.Array,
    d_out: da.Array,
    /,
    *,
    is_causal: bool = False,
    causal_alignment: str = "upper_left",
    scale: float | None = None,
    key_lengths: Sequence[int] | None = None,
    block_size: int | tuple[int, int] | None = None,
    split_every: int = 4,
) -> tuple[da.Array, da.Array, da.Array]:
    r"""``(dq, dk, dv)`` of :func:`scaled_dot_product_attention`, lazily.

    ``out`` and ``lse`` are the forward's (for example from ``return_lse=True``), ``d_out``
    the cotangent of ``out``, all chunked like ``q`` along axis -2; options as in the forward.
    With ``P = exp(S - lse)`` and ``Δ = rowsum(d_out ∘ out)``, each pair contributes
    ``dS = P ∘ (d_out Vᵀ - Δ)``, ``dQ += scale dS K``, ``dK += scale dSᵀ Q``, ``dV += Pᵀ d_out``
    (:mod:`refattn.distributed.blocks`). The gradients are chunked like ``q``, ``k``, ``v``.
    """
    lay = layout(
        q,
        k,
        v,
        is_causal=is_causal,
        causal_alignment=causal_alignment,
        scale=scale,
        key_lengths=key_lengths,
        block_size=block_size,
        split_every=split_every,
    )
    out_shape = (*q.shape[:-1], lay.d_v)
    _check_like("out", out, out_shape, lay.q_chunks, q.dtype)
    _check_like("d_out", d_out, out_shape, lay.q_chunks, q.dtype)
    _check_like("lse", lse, tuple(q.shape[:-1]), lay.q_chunks, q.dtype, seq=-1)
    return _backward(lay, q, k, v, out, lse, d_out)


def _backward(
    lay: Layout,
    q: da.Array,
    k: da.Array,
    v: da.Array,
    out: da.Array,
    lse: da.Array,
    d_out: da.Array,
) -> tuple[da.Array, da.Array, da.Array]:
    q_blocks, k_blocks, v_blocks = _blocks_of(q), _blocks_of(k), _blocks_of(v)
    o_blocks, l_blocks, g_blocks = _blocks_of(out), _blocks_of(lse), _blocks_of(d_out)
    pair_task = dask.delayed(blocks.pair_backward, pure=True, nout=3)
    terms = {
        (p.r, p.c): pair_task(
            q_blocks[p.r],
            k_blocks[p.c],
            v_blocks[p.c],
            o_blocks[p.r],
            l_blocks[p.r],
            g_blocks[p.r],
            **lay.task_options(p),
        )
        for p in lay.pairs
    }
    zeros, pick, n = (
        dask.delayed(_zeros_like, pure=True),
        dask.delayed(_pick, pure=True),
        lay.split_every,
    )

    def reduce(index: int, group: list[Pair], like: Any) -> Any:
        """The sum of the group's term ``index``: the first level picks it from the tuples."""
        if not group:
            return zeros(like)
        tuples = [terms[p.r, p.c] for p in group]
        first = [pick(index, *tuples[i : i + n]) for i in range(0, len(tuples), n)]
        return _tree(first, blocks.sum_blocks, n, nout=None)

    d_q = [reduce(0, lay.rows(r), q_blocks[r]) for r in range(len(lay.q_chunks))]
    d_k = [reduce(1, lay.cols(c), k_blocks[c]) for c in range(len(lay.k_chunks))]
    d_v = [reduce(2, lay.cols(c), v_blocks[c]) for c in range(len(lay.k_chunks))]
    q_lead, k_lead = tuple(q.shape[:-2]), tuple(k.shape[:-2])
    d_k_dim = int(q.shape[-1])
    return (
        _concat(d_q, [(*q_lead, n, d_k_dim) for n in lay.q_chunks], lay.meta),
        _concat(d_k, [(*k_lead, n, d_k_dim) for n in lay.k_chunks], lay.meta),
        _concat(d_v, [(*k_lead, n, lay.d_v) for n in lay.k_chunks], lay.meta),
    )


def _zeros_like(x: Array) -> Array:
    return namespace(x).zeros_like(x)


def vjp(
    q: da.Array,
    k: da.Array,
    v: da.Array,
    /,
    **options: Any,
) -> tuple[tuple[da.Array, da.Array], Callable[[da.Array], tuple[da.Array, da.Array, da.Array]]]:
    """``((out, lse), pullback)``, as :func:`refattn.vjp` for the core op.

    ``pullback(d_out)`` gives the lazy ``(dq, dk, dv)``; it reuses the forward's ``out`` and
    ``lse`` tasks, so ``dask.compute(out, dq, dk, dv)`` runs the forward once. Options are
    those of :func:`scaled_dot_product_attention` (without ``return_lse``).
    """
    if "return_lse" in options:
        raise TypeError(f"{OP}: vjp returns the LSE always; do not pass return_lse")
    lay = layout(q, k, v, **_with_defaults(options))
    out, lse = _forward(lay, q, k, v)

    def pullback(d_out: da.Array) -> tuple[da.Array, da.Array, da.Array]:
        _check_like("d_out", d_out, tuple(out.shape), lay.q_chunks, q.dtype)
        return _backward(lay, q, k, v, out, lse, d_out)

    return (out, lse), pullback


_DEFAULTS = {
    "is_causal": False,
    "causal_alignment": "upper_left",
    "scale": None,
    "key_lengths": None,
    "block_size": None,
    "split_every": 4,
}


def _with_defaults(options: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(_DEFAULTS))
    if unknown:
        raise TypeError(f"{OP}: unknown option {unknown[0]!r}; expected one of {sorted(_DEFAULTS)}")
    return {**_DEFAULTS, **options}
