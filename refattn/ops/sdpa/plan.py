r"""Tile plans for the tiled kernels: structured masks as index rules, and the work they leave.

Integer logic only, no arrays: a :class:`Pattern` says which (query, key) pairs a structured
mask keeps, :func:`plan_tiles` cuts a call into blocks and lists, per query block, the key
tiles that hold any visible pair (each marked full or partial). The kernels in
:mod:`refattn.ops.sdpa.tiled` skip every other tile; :func:`refattn.ops.sdpa.scores.pattern_keep`
builds a partial tile's boolean mask when it is computed.
"""

from __future__ import annotations

import bisect
import functools
import itertools
from dataclasses import dataclass

__all__ = [
    "DEFAULT_BLOCK",
    "EMPTY",
    "FULL",
    "PARTIAL",
    "Heads",
    "Lengths",
    "Pattern",
    "Plan",
    "causal_pattern",
    "default_block",
    "plan_tiles",
]

#: default query and key block size (rows and columns of a tile)
DEFAULT_BLOCK = 512
#: largest tile (all heads of a unit) in bytes; units take as many heads as fit
TILE_BYTES = 2 * 2**20
#: calls whose scores take fewer bytes than this run serially (threads would cost more)
SERIAL_BYTES = 2**20

#: what :meth:`Pattern.tile_state` says of a tile
EMPTY, PARTIAL, FULL = 0, 1, 2


@dataclass(frozen=True)
class Pattern:
    r"""A structured keep-mask, evaluated from indices (never materialized).

    Query ``i`` may attend key ``j`` iff

    .. math::

        (j - i \le \mathrm{causal}) \wedge \bigl(\mathrm{band}(i, j) \vee i < G \vee j < G
        \vee j < Z\bigr),
        \qquad \mathrm{band}(i, j) = (i - j \le \mathrm{left}) \wedge (j - i \le \mathrm{right}),

    where a ``None`` bound is absent, ``G = n_global`` (global tokens: their rows see every key
    and their columns are seen by every query) and ``Z = n_sink`` (StreamingLLM's sink tokens:
    columns only, a sink's own row keeps the band); besides, no query ``i >= rows`` and no
    key ``j >= keys`` is visible (one sequence of a padded batch, :attr:`Lengths.patterns`;
    ``None``: no bound).

    * causal SDPA: ``Pattern(causal=0)`` (upper-left) or ``causal=n_k - n_q`` (lower-right),
      :func:`causal_pattern`;
    * sliding window ``w``: ``Pattern(left=w, right=w, n_global=G)``, causal:
      ``Pattern(causal=0, left=w, n_global=G)``.
    """

    causal: int | None = None
    left: int | None = None
    right: int | None = None
    n_global: int = 0
    rows: int | None = None
    keys: int | None = None
    n_sink: int = 0

    def tile_state(self, r0: int, r1: int, c0: int, c1: int) -> int:
        """Whether rows ``r0:r1`` x keys ``c0:c1`` are all hidden, all visible, or mixed."""
        rows, keys = self.rows, self.keys
        if (rows is not None and r0 >= rows) or (keys is not None and c0 >= keys):
            return EMPTY
        causal_full = (rows is None or r1 <= rows) and (keys is None or c1 <= keys)
        if self.causal is not None:
            if c0 - (r1 - 1) > self.causal:  # the smallest j - i is already too large
                return EMPTY
            causal_full = causal_full and (c1 - 1) - r0 <= self.causal
        left, right, g = self.left, self.right, self.n_global
        z = max(g, self.n_sink)  # keys every query may see
        band_empty = (left is not None and r0 - (c1 - 1) > left) or (
            right is not None and c0 - (r1 - 1) > right
        )
        band_full = (left is None or (r1 - 1) - c0 <= left) and (
            right is None or (c1 - 1) - r0 <= right
        )
        global_full = r1 <= g or c1 <= z
        global_empty = r0 >= g and c0 >= z
        if band_empty and global_empty:
            return EMPTY
        if (band_full or global_full) and causal_full:
            return FULL
        return PARTIAL

    def key_ranges(self, r0: int, r1: int, n_k: int) -> list[tuple[int, int]]:
        """Key intervals that may hold visible keys for rows ``r0:r1`` (a superset)."""
        hi = n_k if self.keys is None else min(n_k, self.keys)
        hi = hi if self.causal is None else max(0, min(hi, r1 + self.causal))
        if r0 < self.n_global:
            return [(0, hi)]
        lo_band = 0 if self.left is None else max(0, r0 - self.left)
        hi_band = hi if self.right is None else min(hi, r1 + self.right)
        return [(0, min(max(self.n_global, self.n_sink), hi)), (lo_band, hi_band)]


@dataclass(frozen=True)
class Heads:
    """A chunk of heads: canonical axes ``b0:b1`` (batch) and ``h0:h1`` (kv heads)."""

    b0: int
    b1: int
    h0: int
    h1: int


@dataclass(frozen=True)
class Plan:
    """How one call is cut into work (shared by the calls of one shape: read-only).

    Attributes
    ----------
    heads : tuple of :class:`Heads`
    rows : tuple of ``(r0, r1)`` query blocks
    visible : per query block, its non-empty key tiles ``(c0, c1, full)``
    score_bytes : scores computed by one pass over all tiles, in bytes
    by_chunk : None, or per head chunk its own ``visible`` (a padded batch with lengths: each
        chunk holds sequences of one rule, :attr:`Lengths.patterns`); see :meth:`tiles`
    """

    heads: tuple[Heads, ...]
    rows: tuple[tuple[int, int], ...]
    visible: tuple[tuple[tuple[int, int, bool], ...], ...]
    score_bytes: int = 0
    by_chunk: tuple[tuple[tuple[tuple[int, int, bool], ...], ...], ...] | None = None

    @functools.cached_property
    def _chunk_index(self) -> dict[Heads, int]:
        return {hc: i for i, hc in enumerate(self.heads)}

    def tiles(self, hc: Heads, ri: int) -> tuple[tuple[int, int, bool], ...]:
        """The key tiles ``(c0, c1, full)`` that row block ``ri`` of heads ``hc`` computes."""
        if self.by_chunk is None:
            return self.visible[ri]
        return self.by_chunk[self._chunk_index[hc]][ri]

    @functools.cached_property
    def units(self) -> tuple[tuple[Heads, int], ...]:
        """Every (head chunk, row block), the most tiles first.

        Taken from a shared queue by the threads, largest first (LPT scheduling), so that the
        unequal units of a causal or banded pattern finish together.
        """
        if self.by_chunk is not None:
            every = [(hc, ri) for hc in self.heads for ri in range(len(self.rows))]
            return tuple(sorted(every, key=lambda u: -len(self.tiles(*u))))
        order = sorted(range(len(self.rows)), key=lambda ri: -len(self.visible[ri]))
        return tuple((hc, ri) for hc in self.heads for ri in order)

    def work(self, n_lanes: int) -> list[tuple[Heads | None, list[tuple[Heads, int]]]]:
        """Work items ``(chunk, units)`` for ``n_lanes`` threads.

        With at least two head chunks per lane, an item is a whole head chunk (``chunk`` is its
        :class:`Heads`): what depends on the heads only (augmented keys) is prepared once per
        item, and items write disjoint heads of ``dK, dV``. Otherwise an item is one unit
        (``chunk`` None), in :attr:`units` order.
        """
        units = self.units
        if len(self.heads) >= 2 * n_lanes:
            return [(hc, [u for u in units if u[0] is hc]) for hc in self.heads]
        return [(None, [u]) for u in units]

    @property
    def n_tiles(self) -> int:
        """Computed tiles per head chunk, or with :attr:`by_chunk` over all chunks (for tests
        and benchmarks)."""
        if self.by_chunk is not None:
            return sum(len(t) for chunk in self.by_chunk for t in chunk)
        return sum(len(v) for v in self.visible)

    @property
    def small(self) -> bool:
        """Too little work for threads to pay off: run the units serially."""
        return self.score_bytes < SERIAL_BYTES


def _edges(n: int, block: int, *splits: int) -> list[int]:
    edges = set(range(0, n, block)) | {n}
    edges.update(split for split in splits if 0 < split < n)
    return sorted(edges)


@functools.lru_cache(maxsize=64)
def plan_tiles(
    b: int,
    h_kv: int,
    g: int,
    n_q: int,
    n_k: int,
    elem_bytes: int,
    pattern: Pattern | None,
    blocks: tuple[int, int],
    tile_bytes: int,
    per_batch: tuple[Pattern, ...] | None = None,
) -> Plan:
    """Blocks, head chunks and the visible tiles of a call (cached by shape: read-only).

    Queries ``(b, h_kv, g, n_q, ·)`` against ``n_k`` keys, ``elem_bytes`` per score. Query and
    key blocks are ``blocks = (block_q, block_k)``, with extra edges at ``pattern.n_global`` and
    (keys) ``pattern.n_sink`` so that global rows and global or sink columns form their own
    blocks. Heads are grouped so that a unit's
    tile stays under ``tile_bytes`` (:data:`TILE_BYTES` by default, see
    :func:`~refattn.ops.sdpa.tiled.make_plan`). Planning a causal call costs as much as a small
    forward, hence the cache. With ``per_batch`` (one exact :class:`Pattern` per batch element,
    a padded batch's :attr:`Lengths.patterns`) the chunks never mix rules and each lists its
    own tiles (:attr:`Plan.by_chunk`).
    """
    block_q, block_k = blocks
    split = pattern.n_global if pattern is not None else 0
    sink = pattern.n_sink if pattern is not None else 0
    row_edges = _edges(n_q, block_q, split)
    col_edges = _edges(n_k, block_k, split, sink)
    rows = tuple(itertools.pairwise(row_edges))
    cols = list(itertools.pairwise(col_edges))
    tile = max(1, g * min(block_q, max(n_q, 1)) * min(block_k, max(n_k, 1)) * elem_bytes)
    per_unit = max(1, tile_bytes // tile)
    if per_batch is not None:
        return _plan_by_sequence(
            h_kv, g, elem_bytes, rows, cols, col_edges, n_k, per_batch, per_unit
        )
    visible = tuple(_visible_tiles(pattern, r0, r1, cols, col_edges, n_k) for r0, r1 in rows)
    heads = tuple(_head_chunks(b, h_kv, per_unit))
    return Plan(heads, rows, visible, elem_bytes * b * h_kv * g * _scores(rows, visible))


def _scores(rows: tuple[tuple[int, int], ...], visible: tuple) -> int:
    return sum(
        (r1 - r0) * (c1 - c0)
        for (r0, r1), tiles in zip(rows, visible, strict=True)
        for c0, c1, _ in tiles
    )


def _plan_by_sequence(
    h_kv: int,
    g: int,
    elem_bytes: int,
    rows: tuple[tuple[int, int], ...],
    cols: list[tuple[int, int]],
    col_edges: list[int],
    n_k: int,
    per_batch: tuple[Pattern, ...],
    per_unit: int,
) -> Plan:
    """A padded batch's plan: runs of batch elements with one rule share head chunks, and each
    chunk lists the tiles its sequences see (the padding and each diagonal skipped exactly)."""
    heads, by_chunk, score_elems = [], [], 0
    cache: dict[Pattern, tuple] = {}
    b0 = 0
    while b0 < len(per_batch):
        b1 = b0 + 1
        while b1 < len(per_batch) and per_batch[b1] == per_batch[b0]:
            b1 += 1
        p = per_batch[b0]
        if p not in cache:
            cache[p] = tuple(_visible_tiles(p, r0, r1, cols, col_edges, n_k) for r0, r1 in rows)
        for hc in _head_chunks(b1 - b0, h_kv, per_unit):
            heads.append(Heads(hc.b0 + b0, hc.b1 + b0, hc.h0, hc.h1))
            by_chunk.append(cache[p])
            score_elems += (hc.b1 - hc.b0) * (hc.h1 - hc.h0) * g * _scores(rows, cache[p])
        b0 = b1
    # every tile some sequence computes, per row block (Plan.visible's meaning; informative)
    union = tuple(
        tuple(sorted({t for v in cache.values() for t in v[ri]})) for ri in range(len(rows))
    )
    return Plan(tuple(heads), rows, union, elem_bytes * score_elems, tuple(by_chunk))


def _visible_tiles(
    pattern: Pattern | None,
    r0: int,
    r1: int,
    cols: list[tuple[int, int]],
    col_edges: list[int],
    n_k: int,
) -> tuple[tuple[int, int, bool], ...]:
    if pattern is None:
        return tuple((c0, c1, True) for c0, c1 in cols)
    candidates: set[int] = set()
    for lo, hi in pattern.key_ranges(r0, r1, n_k):
        if hi <= lo:
            continue
        first = bisect.bisect_right(col_edges, lo) - 1
        last = bisect.bisect_left(col_edges, hi)
        candidates.update(range(max(first, 0), min(last, len(cols))))
    tiles = []
    for ci in sorted(candidates):
        c0, c1 = cols[ci]
        state = pattern.tile_state(r0, r1, c0, c1)
        if state != EMPTY:
            tiles.append((c0, c1, state == FULL))
    return tuple(tiles)


def _head_chunks(b: int, h_kv: int, per_unit: int) -> list[Heads]:
    if per_unit >= b * h_kv:
        return [Heads(0, b, 0, h_kv)]
    if per_unit >= h_kv:
        step = per_unit // h_kv
        return [Heads(b0, min(b0 + step, b), 0, h_kv) for b0 in range(0, b, step)]
    return [
        Heads(b0, b0 + 1, h0, min(h0 + per_unit, h_kv))
        for b0 in range(b)
        for h0 in range(0, h_kv, per_unit)
    ]


def default_block(pattern: Pattern | None) -> int:
    """The tiles' default size: :data:`DEFAULT_BLOCK`, or for a band half its width.

    A band of width ``w`` (the keys one row may see: ``left + right + 1``, the causal bound
    standing in for a missing ``right``) gets tiles of ``w / 2`` clipped to [64, 256], so that a
    row block meets about three key tiles and few of their entries are masked.
    """
    if pattern is None or pattern.left is None:
        return DEFAULT_BLOCK
    right = pattern.right if pattern.right is not None else pattern.causal
    if right is None:
        return DEFAULT_BLOCK
    return max(64, min(256, (pattern.left + right + 1) // 2))


@dataclass(frozen=True)
class Lengths:
    r"""The per-sequence rule of a padded batch: lengths, and the diagonal of each sequence.

    Batch element ``b`` (batch axes flattened) has the queries ``i < q[b]`` and the keys
    ``j < k[b]``; query ``i`` sees key ``j`` iff both are inside and

    .. math::

        (j - i \le o_b \text{ if causal}) \wedge (j - i \ge o_b - \mathrm{left})
        \wedge (j - i \le o_b + \mathrm{right}),

    with ``o_b = k[b] - q[b]`` ("lower_right": each sequence aligned on its own lengths, as
    FlashAttention's varlen kernels and ``attention_ref`` with padding masks) or ``o_b = 0``
    ("upper_left", where lengths change nothing but the padding); the first ``n_sink`` keys
    are visible through any window (not through the causal bound or the padding).
    :attr:`patterns` holds it per sequence.
    """

    q: tuple[int, ...]
    k: tuple[int, ...]
    offsets: tuple[int, ...]
    causal: bool
    left: int | None
    right: int | None
    n_sink: int = 0

    @functools.cached_property
    def patterns(self) -> tuple[Pattern, ...]:
        """Each sequence's rule as a :class:`Pattern` (exact: the kernels plan and mask each
        sequence's tiles with it). Built once: the tiled kernels read it for every tile."""
        return tuple(
            Pattern(
                causal=o if self.causal else None,
                left=None if self.left is None else self.left - o,
                right=None if self.right is None else self.right + o,
                rows=q,
                keys=k,
                n_sink=self.n_sink,
            )
            for q, k, o in zip(self.q, self.k, self.offsets, strict=True)
        )


def causal_pattern(
    is_causal: bool,
    alignment: str,
    n_q: int,
    n_k: int,
    window: tuple[int | None, int | None] | None = None,
    lengths: Lengths | None = None,
    n_sink: int = 0,
) -> Pattern | None:
    """The :class:`Pattern` of SDPA's causal mask and local window (None when neither is set).

    Both are aligned on the diagonal ``j = i + o``, with ``o = 0`` ("upper_left") or
    ``o = n_k - n_q`` ("lower_right"). The window ``(left, right)`` keeps keys
    ``i + o - left <= j <= i + o + right`` (None: unbounded on that side), that is
    ``i - j <= left - o`` and ``j - i <= right + o`` in :class:`Pattern`'s terms. The first
    ``n_sink`` keys (StreamingLLM's sink tokens) are kept through the window.

    With per-sequence ``lengths`` the offsets ``o_b`` differ between batch elements; the
    pattern is then their union (the loosest bound of every side, and the longest lengths),
    and each sequence's exact rule is in :attr:`Lengths.patterns`.
    """
    left, right = window if window is not None else (None, None)
    if lengths is not None:
        lo, hi = min(lengths.offsets, default=0), max(lengths.offsets, default=0)
        return Pattern(
            causal=hi if is_causal else None,
            left=None if left is None else left - lo,
            right=None if right is None else right + hi,
            rows=max(lengths.q, default=0),
            keys=max(lengths.k, default=0),
            n_sink=n_sink,
        )
    offset = 0 if alignment == "upper_left" else n_k - n_q
    if not is_causal and left is None and right is None:
        return None  # sink tokens are visible anyway
    return Pattern(
        causal=offset if is_causal else None,
        left=None if left is None else left - offset,
        right=None if right is None else right + offset,
        n_sink=n_sink if (left is not None or right is not None) else 0,
    )
