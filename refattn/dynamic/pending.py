"""The pending update store: additive entry updates held as COO lists on the host until a flush
sums them (``scipy.sparse`` / ``cupyx.scipy.sparse``), and the cache of pending key rows."""

from __future__ import annotations

from typing import Any

from array_api_compat import device as _device_of

Array = Any


class Pending:
    """Pending additive entry updates ``M[row, col] += delta`` of one matrix.

    Held as host COO lists (what ``scipy.sparse.coo_matrix`` takes), summed into CSR when a flush
    or a query needs them. ``by_col`` (kept for V only) maps ``col -> {row: summed delta}`` so that
    a query for output column j visits only that column's pending entries.
    """

    __slots__ = ("by_col", "cols", "rows", "track_columns", "vals")

    def __init__(self, *, track_columns: bool) -> None:
        self.rows: list[int] = []
        self.cols: list[int] = []
        self.vals: list[float] = []
        self.track_columns = track_columns
        self.by_col: dict[int, dict[int, float]] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, row: int, col: int, val: float) -> None:
        self.rows.append(row)
        self.cols.append(col)
        self.vals.append(val)
        if self.track_columns:
            entries = self.by_col.get(col)
            if entries is None:
                entries = self.by_col[col] = {}
            entries[row] = entries.get(row, 0.0) + val

    def extend(self, rows: list[int], cols: list[int], vals: list[float]) -> None:
        self.rows.extend(rows)
        self.cols.extend(cols)
        self.vals.extend(vals)
        if self.track_columns:
            for row, col, val in zip(rows, cols, vals, strict=True):
                entries = self.by_col.setdefault(col, {})
                entries[row] = entries.get(row, 0.0) + val

    def clear(self) -> None:
        self.rows, self.cols, self.vals, self.by_col = [], [], [], {}

    def copy(self) -> Pending:
        other = Pending(track_columns=self.track_columns)
        other.extend(list(self.rows), list(self.cols), list(self.vals))
        return other

    def drop_row(self, r: int) -> None:
        """Forget row r's entries and renumber the rows after it (row r was removed)."""
        kept = [(row - (row > r), col, val) for row, col, val in self._entries() if row != r]
        self.clear()
        if kept:
            rows, cols, vals = (list(t) for t in zip(*kept, strict=True))
            self.extend(rows, cols, vals)

    def _entries(self) -> zip:
        return zip(self.rows, self.cols, self.vals, strict=True)

    def summed(self) -> tuple[list[int], list[int], list[int], list[float]]:
        """The entries summed per ``(row, col)`` (V only): ``rows, column slots, cols, vals``,
        where a column's slot is its position in ``by_col``."""
        rows: list[int] = []
        slots: list[int] = []
        cols: list[int] = []
        vals: list[float] = []
        for slot, (col, entries) in enumerate(self.by_col.items()):
            rows.extend(entries)
            vals.extend(entries.values())
            slots.extend([slot] * len(entries))
            cols.extend([col] * len(entries))
        return rows, slots, cols, vals

    def max_per_column(self) -> int:
        """Largest number of distinct pending rows in one column (V only)."""
        return max((len(e) for e in self.by_col.values()), default=0)


class KeyRows:
    """The pending K rows J and their new values ``K[J] + ΔK[J]``, for queries and flushes.

    Built from the pending batch summed into CSR, then kept up to date by single updates
    (``O(d)`` for a new row, ``O(1)`` otherwise) so that a stream of updates and queries does
    not re-sum the batch at every query. Buffers grow by doubling; rows ``[0, m)`` are live.
    """

    __slots__ = ("J", "buf", "idx", "m", "pos")

    def __init__(self, J: list[int], idx: Array, KJ: Array) -> None:
        self.J = J
        self.pos = {r: k for k, r in enumerate(J)}
        self.idx = idx
        self.buf = KJ
        self.m = len(J)

    def view(self) -> tuple[list[int], Array, Array, dict[int, int]]:
        m = self.m
        return self.J, self.idx[:m], self.buf[:m, ...], self.pos

    def add(self, xp: Any, K: Array, r: int, c: int, v: float) -> None:
        k = self.pos.get(r)
        if k is None:
            k = self.m
            if k == self.buf.shape[0]:
                cap = max(8, 2 * k)
                buf = xp.zeros((cap, self.buf.shape[1]), dtype=self.buf.dtype, device=_device_of(K))
                idx = xp.zeros((cap,), dtype=self.idx.dtype, device=_device_of(K))
                buf[:k, ...] = self.buf[:k, ...]
                idx[:k] = self.idx[:k]
                self.buf, self.idx = buf, idx
            self.buf[k, ...] = K[r, ...]
            self.idx[k] = r
            self.pos[r] = k
            self.J.append(r)
            self.m = k + 1
        self.buf[k, c] = self.buf[k, c] + v
