r"""Exact dynamic attention: ``softmax(scale·QKᵀ)V`` maintained under small updates.

:class:`DynamicAttention` keeps the output of attention exact (to rounding) while entries of K,
V and Q change one at a time or in batches, and appends and removes key/value tokens. Updates to
K and V are deferred into pending batches (COO on the host, summed into CSR with ``scipy.sparse``
or ``cupyx.scipy.sparse``) and applied lazily by :meth:`DynamicAttention.flush`, which recomputes
only the columns of ``A`` whose keys changed. :meth:`DynamicAttention.query` is exact while
updates are pending: it corrects the one requested entry from the pending batches in
``O(pending·d)``, without flushing.

Maintained state, with ``n_q`` queries, ``n_k`` keys and a per-query-row shift ``c`` (an upper
bound on that row's scores)::

    Aᵀ[r, i] = exp(scale·<Q[i], K[r]> - c[i])      (n_k, n_q)  column-contiguous A
    D[i]     = Σ_r A[i, r]                          (n_q,)
    AVᵀ[j, i] = Σ_r A[i, r]·V[r, j]                 (d_v, n_q)  transposed AV
    output   = (AVᵀ / D)ᵀ = D⁻¹·A·V                 (n_q, d_v)

The derivations, the drift bound and the cost model of the adaptive threshold are in
``docs/dynamic.md``.
"""

from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass
from typing import Any

from array_api_compat import device as _device_of
from array_api_compat import is_cupy_namespace, is_numpy_namespace

from ._backend import (
    check_floating,
    describe,
    exp_inplace,
    floating_dtype,
    is_sparse,
    namespace,
    sparse_module,
)

__all__ = ["DynamicAttention"]

Array = Any

# Error tolerance, in units of the unit roundoff u of the state's dtype. float64: 4096·u ≈ 4.5e-13,
# a factor 2 under the 1e-12 contract; float32: 64·u ≈ 3.8e-6. Three quarters of it bound the
# drift of D and AV (a query row whose bound exceeds that is recomputed), one quarter the error
# of the columns of A updated multiplicatively (a key row over budget is recomputed fresh).
_TOL_ULPS = {"float64": 4096.0, "float32": 64.0}
# A pending key row is applied multiplicatively, A'[:, r] = A[:, r]·exp(scale·Q·ΔK[r]ᵀ), when it
# has at most max(1, d // 8) entries and its exponent is bounded by this (no overflow, and no
# denormal entry is lifted into significance); otherwise its column is recomputed fresh.
_MULTIPLICATIVE_EXPONENT = 16.0
# A query whose correction has at most this many terms is finished with host scalar arithmetic.
_HOST_QUERY_TERMS = 64
# Work buffers for flushes are kept for up to this many rows (NumPy and CuPy only).
_SCRATCH_ROWS = 1024

# A flush that touches at least this fraction of the keys recomputes everything instead.
_FULL_RECOMPUTE_FRACTION = 0.75
# Rows (query rows) whose drift must be reset: beyond this fraction of n_q, rebuild everything.
_REFRESH_ALL_FRACTION = 0.125
# Adaptive threshold: fold the operation counters into the running estimate every this many.
_TUNE_EVERY = 32
_TUNE_WEIGHT = 0.3
# Headroom of the per-row shift: c_i = (row maximum) + _SHIFT_MARGIN, so stored entries are at most
# exp(-16) ≈ 1e-7 and a row is rescaled only when one of its scores rises 16 above its old maximum
# (never, in streams of small updates). It costs 16 of float64's ~1400 nats of exponent range.
_SHIFT_MARGIN = 16.0


@dataclass(frozen=True)
class _CostModel:
    """Nominal costs, in seconds, of what the adaptive threshold trades off.

    Measured for the NumPy backend on one CPU core (``docs/dynamic.md`` has the measurements).
    Only ratios matter: the threshold follows ``flush cost / (query rate · correction cost)``.
    """

    flush_call: float = 100e-6  # fixed cost of any flush: Python, drift update and check
    key_flush_call: float = 60e-6  # fixed extra cost of a flush with K rows pending
    value_flush_call: float = 80e-6  # fixed extra cost of a flush with V entries pending
    elem: float = 0.3e-9  # one element of a streaming pass over memory
    query_key_call: float = 30e-6  # extra cost of a query with K rows pending
    query_value_call: float = 14e-6  # extra cost of a query with only V entries pending
    query_key_row: float = 0.3e-6  # a query's extra cost per pending K row
    key_cache_add: float = 3e-6  # keeping the new K rows current, per K update

    def flush_key_part(self, n_q: int, d: int, d_v: int) -> float:
        """The K part of a flush beyond its per-row work: the passes over AVᵀ (the rank-|J|
        update) and over the length-n_q vectors (D, the drift bound, the shifts)."""
        return self.key_flush_call + self.elem * n_q * (2 * d_v + 16)

    def flush_value_part(self, n_q: int) -> float:
        return self.value_flush_call + self.elem * n_q * 2

    def per_update(self, T: int, lam: float, fk: float, n_q: int, d: int, d_v: int) -> float:
        """Expected cost per update of flushing every T updates (see ``docs/dynamic.md``).

        ``lam`` is the number of queries per update, ``fk`` the fraction of updates that are
        K updates. Queries spread evenly over the T states ``k = 0..T-1`` pending updates: a
        query with k pending costs ``query_key_call`` if any is a K update (probability
        ``1 - (1-fk)^k``), else ``query_value_call``, plus ``query_key_row`` per K update.
        """
        FK = self.flush_key_part(n_q, d, d_v)
        FV = self.flush_value_part(n_q)
        if T <= 1:
            return self.flush_call + fk * FK + (1.0 - fk) * FV
        fv = 1.0 - fk
        flush = self.flush_call + (1.0 - fv**T) * FK + (1.0 - fk**T) * FV
        # Σ_{k=1}^{T-1} (1 - fk)^k: the query states with only V updates pending
        only_v = (T - 1) if fk <= 0.0 else fv * (1.0 - fv ** (T - 1)) / fk
        queries = (
            self.query_key_call * (T - 1)
            - (self.query_key_call - self.query_value_call) * only_v
            + self.query_key_row * fk * T * (T - 1) / 2.0
        )
        return (flush + lam * queries) / T + fk * self.key_cache_add


_COST = _CostModel()


class _Pending:
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

    def copy(self) -> _Pending:
        other = _Pending(track_columns=self.track_columns)
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


class _KeyRows:
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


# --------------------------------------------------------------------------------------------
# Backend helpers. Gathers use ``xp.take`` (in the standard); scatters use fancy setitem where
# the backend has it (NumPy, CuPy) and a row loop elsewhere (array-api-strict, for checking).
# --------------------------------------------------------------------------------------------


class _Magnitudes:
    r"""Host-side upper bounds on ``max_r |X[r, c]|`` per column of Q, K and V.

    They make "an update whose result is not finite is rejected before any state changes"
    cheap: an update is checked against the bounds it would leave (:meth:`admit`, ``O(1)`` per
    delta), never against the device arrays. With :math:`\bar q_c, \bar k_c, \bar v_c` the
    bounds,

    .. math::

        |(Q K^\top)_{ir}| = |\textstyle\sum_c Q_{ic} K_{rc}| \le \sum_c \bar q_c \bar k_c = B,

    and the state is admitted when :math:`\max(1, |\mathrm{scale}|)\, B \le \sqrt{\mathrm{max}}`
    (``K Q^T`` is formed before it is scaled, and the state multiplies scores by deltas and
    subtracts shifts from them, which then stays finite; softmax weights are exactly 0 or 1 long
    before such scores), every :math:`\bar q_c, \bar k_c \le \mathrm{max}`, and
    :math:`n_k e^{16} \max_c \bar v_c \le \mathrm{max}/2` (the unnormalised sums ``AV``,
    whose weights the lazy shifts let grow to ``e^16``, stay finite). A delta grows its column's
    bound by ``|delta|`` (and ``B`` by ``|delta|`` times the other matrix's bound there); an
    appended row raises the bounds to its entries. Bounds only grow (removals keep them): they
    are upper bounds, so they can reject a state whose exact scores would fit only when the
    bounds come within a few factors of ``sqrt(max)``, far beyond what attention inputs hold.
    """

    def __init__(
        self, q: list[float], k: list[float], v: list[float], scale: float, max_abs: float
    ) -> None:
        self.q, self.k, self.v = q, k, v
        self.scale_factor = max(1.0, abs(scale))
        self.max_abs = max_abs
        self.raw = math.fsum(a * b for a, b in zip(q, k, strict=True))
        self.v_max = max(v)
        #: the limits of :meth:`_check`, for the per-update fast paths
        self.raw_limit = math.sqrt(max_abs) / self.scale_factor
        self.v_limit = max_abs / (2.0 * math.exp(_MULTIPLICATIVE_EXPONENT))

    def admit_key(self, where: str, n_k: int, c: int, delta: float) -> None:
        """:meth:`admit` for one K delta in column ``c``: a few float operations when it fits."""
        a = abs(delta)
        raw = self.raw + a * self.q[c]
        if raw <= self.raw_limit and self.k[c] + a <= self.max_abs:
            self.k[c] += a
            self.raw = raw
        else:
            self.admit(where, "delta", n_k, k=[(c, delta)])  # raises with the message

    def admit_value(self, where: str, n_k: int, c: int, delta: float) -> None:
        """:meth:`admit` for one V delta in column ``c``."""
        bound = self.v[c] + abs(delta)
        if bound * n_k <= self.v_limit:
            self.v[c] = bound
            if bound > self.v_max:
                self.v_max = bound
        else:
            self.admit(where, "delta", n_k, v=[(c, delta)])

    @classmethod
    def of(cls, xp: Any, Q: Array, K: Array, V: Array, scale: float, max_abs: float) -> _Magnitudes:
        def col_max(x: Array) -> list[float]:
            return [float(m) for m in _to_host(xp.max(xp.abs(x), axis=0)).tolist()]

        return cls(col_max(Q), col_max(K), col_max(V), scale, max_abs)

    def copy(self) -> _Magnitudes:
        other = object.__new__(_Magnitudes)
        other.__dict__.update(self.__dict__)
        other.q, other.k, other.v = list(self.q), list(self.k), list(self.v)
        return other

    def admit(
        self, where: str, what: str, n_k: int, *, q: Any = (), k: Any = (), v: Any = ()
    ) -> None:
        """Check the bounds that the ``(column, delta)`` pairs would leave; apply them if fine.

        Raises ValueError naming ``what`` (and changes nothing) otherwise.
        """
        grow: list[dict[int, float]] = [{}, {}, {}]
        for add, pairs in zip(grow, (q, k, v), strict=True):
            for c, delta in pairs:
                add[c] = add.get(c, 0.0) + abs(delta)
        dq, dk, dv = grow
        raw = self.raw + math.fsum(
            [a * (self.k[c] + dk.get(c, 0.0)) for c, a in dq.items()]
            + [a * self.q[c] for c, a in dk.items()]
        )
        entry = max(
            [self.q[c] + a for c, a in dq.items()] + [self.k[c] + a for c, a in dk.items()],
            default=0.0,
        )
        v_max = max([self.v_max] + [self.v[c] + a for c, a in dv.items()])
        self._check(where, what, n_k, entry, raw, v_max)
        for bounds, add in zip((self.q, self.k, self.v), grow, strict=True):
            for c, a in add.items():
                bounds[c] += a
        self.raw, self.v_max = raw, v_max

    def admit_rows(self, where: str, what: str, n_k: int, k_row: Array, v_row: Array) -> None:
        """:meth:`admit` for an appended key row and value row (``O(d + d_v)``)."""
        k_abs = [abs(float(e)) for e in _to_host(k_row).tolist()]
        v_abs = [abs(float(e)) for e in _to_host(v_row).tolist()]
        k = [max(a, b) for a, b in zip(self.k, k_abs, strict=True)]
        raw = math.fsum(a * b for a, b in zip(self.q, k, strict=True))
        v_max = max(self.v_max, *v_abs)
        self._check(where, what, n_k, max(k_abs), raw, v_max)
        self.k = k
        self.v = [max(a, b) for a, b in zip(self.v, v_abs, strict=True)]
        self.raw, self.v_max = raw, v_max

    def check(self, where: str, what: str, n_k: int) -> None:
        """ValueError naming ``what`` if the current bounds allow a non-finite state."""
        self._check(where, what, n_k, max(max(self.q), max(self.k)), self.raw, self.v_max)

    def _check(
        self, where: str, what: str, n_k: int, entry: float, raw: float, v_max: float
    ) -> None:
        limit = self.max_abs
        if not entry <= limit:
            raise ValueError(
                f"{where}: {what} would make an entry of Q or K reach {entry:.3g}, beyond the "
                f"state's dtype (|entries| <= {limit:.3g}); nothing was changed"
            )
        score = self.scale_factor * raw
        if not score <= math.sqrt(limit):
            raise ValueError(
                f"{where}: {what} would let the scores Q K^T or scale*Q K^T reach {score:.3g} "
                f"(bound sum_c max|Q[:, c]| max|K[:, c]|, times max(1, |scale|)), beyond "
                f"{math.sqrt(limit):.3g}, the square root of the dtype's range that keeps the "
                "state's products of scores and deltas finite; nothing was changed"
            )
        if not n_k * math.exp(_MULTIPLICATIVE_EXPONENT) * v_max <= limit / 2.0:
            raise ValueError(
                f"{where}: {what} would let the values reach {v_max:.3g}, so that sums of "
                f"{n_k} weighted values could overflow the state's dtype; nothing was changed"
            )


def _fancy_setitem(xp: Any) -> bool:
    return is_numpy_namespace(xp) or is_cupy_namespace(xp)


def _put(xp: Any, a: Array, idx: list[int], idx_dev: Array, values: Array, *, axis: int) -> None:
    """``a[idx] = values`` along ``axis`` (0 or 1), in place."""
    if _fancy_setitem(xp):
        if axis == 0:
            a[idx_dev, ...] = values
        else:
            a[:, idx_dev] = values
        return
    for k, r in enumerate(idx):
        if axis == 0:
            a[r, ...] = values[k, ...] if values.ndim > 1 else values[k]
        else:
            a[:, r] = values[:, k]


def _to_host(x: Any) -> Any:
    """A host NumPy array of the caller's small bookkeeping input (indices, deltas).

    The attention state itself never goes through here; only index lists and delta vectors do,
    because the pending COO batches live on the host.
    """
    import numpy

    if type(x).__module__.split(".")[0] == "cupy":
        return x.get()
    return numpy.asarray(x)


def _is_complex_or_bool(dtype: Any) -> bool:
    name = str(dtype)
    return "complex" in name or "bool" in name


def _scalar_delta(where: str, value: Any, max_abs: float) -> float:
    """A finite real scalar from ``value`` (Python or NumPy number, or a 0-d array)."""
    if isinstance(value, (bool, str, bytes)):
        raise TypeError(f"{where}: delta must be a real number, got {value!r}")
    if isinstance(value, numbers.Real):
        out = float(value)
    elif getattr(value, "shape", None) == () and not _is_complex_or_bool(
        getattr(value, "dtype", "complex")
    ):
        out = float(value)
    else:
        raise TypeError(
            f"{where}: delta must be a real number or a 0-d real array, got {describe(value)}"
        )
    if not math.isfinite(out) or abs(out) > max_abs:
        raise ValueError(f"{where}: delta must be finite in the state's dtype, got {out!r}")
    return out


def _index(where: str, name: str, value: Any, size: int, what: str) -> int:
    """``operator.index(value)``, checked to lie in ``[0, size)``."""
    if isinstance(value, bool):
        raise TypeError(f"{where}: {name} must be an integer, got {value!r}")
    try:
        k = operator.index(value)
    except TypeError:
        raise TypeError(f"{where}: {name} must be an integer, got {value!r}") from None
    if not 0 <= k < size:
        raise IndexError(
            f"{where}: {name}={k} is out of range for {what} (expected 0 <= {name} < {size})"
        )
    return k


def _host_indices(where: str, name: str, values: Any, size: int, what: str) -> list[int]:
    """The caller's 1-D integer index array as a host list, every entry checked in range."""
    arr = _to_host(values)
    if arr.ndim != 1:
        raise ValueError(f"{where}: {name} must be 1-D, got shape {tuple(arr.shape)}")
    if arr.size == 0:
        return []
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{where}: {name} must hold integers, got dtype {arr.dtype}")
    bad = (arr < 0) | (arr >= size)
    if bad.any():
        pos = int(bad.argmax())
        raise IndexError(
            f"{where}: {name}[{pos}]={int(arr[pos])} is out of range for {what} "
            f"(expected 0 <= {name} < {size})"
        )
    return [int(v) for v in arr.tolist()]


def _host_deltas(where: str, values: Any, max_abs: float) -> list[float]:
    """The caller's 1-D real delta vector as a host list of finite floats."""
    arr = _to_host(values)
    if arr.ndim != 1:
        raise ValueError(f"{where}: deltas must be 1-D, got shape {tuple(arr.shape)}")
    if arr.size == 0:
        return []
    if arr.dtype.kind not in "iuf":
        raise TypeError(f"{where}: deltas must be real numbers, got dtype {arr.dtype}")
    out = arr.astype("float64")
    bad = ~(abs(out) <= max_abs)  # catches nan, inf and values that overflow float32
    if bad.any():
        pos = int(bad.argmax())
        raise ValueError(
            f"{where}: deltas[{pos}]={float(out[pos])!r} is not finite in the state's dtype"
        )
    return out.tolist()


def _densify(x: Any) -> Any:
    """Dense copy of a scipy.sparse / cupyx.scipy.sparse matrix; other inputs unchanged."""
    return x.toarray() if is_sparse(x) else x


def _reference_output(xp: Any, Q: Array, K: Array, V: Array, scale: float) -> Array:
    """Fresh float64 ``softmax(scale·QKᵀ)V`` with the row maximum subtracted."""
    Q, K, V = (xp.astype(a, xp.float64) for a in (Q, K, V))
    S = scale * (Q @ K.T)
    S = S - xp.max(S, axis=1, keepdims=True)
    E = xp.exp(S)
    return (E @ V) / xp.sum(E, axis=1, keepdims=True)


class DynamicAttention:
    r"""Exact ``softmax(scale·QKᵀ)V`` under entry updates of K, V and Q, appends and removes.

    Parameters
    ----------
    Q : array or sparse matrix, shape (n_q, d)
    K : array or sparse matrix, shape (n_k, d)
    V : array or sparse matrix, shape (n_k, d_v)
        Dense arrays of one library (NumPy, CuPy, array-api-strict) or scipy.sparse /
        cupyx.scipy.sparse matrices (densified on construction; results equal the dense ones).
        All must share one real floating dtype (float32 or float64); the state keeps that
        dtype. The caller's arrays are copied and never modified.
    scale : float
        Scores are ``scale·QKᵀ``. The default 1.0 is the seeds' and the paper's ``exp(QKᵀ)``;
        pass ``1/sqrt(d)`` for transformer attention.
    threshold : int or None
        Flush automatically once this many updates are pending. ``None`` (default) adapts the
        threshold to the observed mix of updates and queries with a cost model
        (``docs/dynamic.md``); :attr:`threshold` reports its current value.
    rebuild_every : int or None
        Recompute everything after this many flushes (counts flushes, not updates: rounding
        drift grows per incremental application). Independently of it, the drift control
        recomputes a query row once a first-order bound on its accumulated rounding exceeds
        3072 units of roundoff (``≈ 3.4e-13`` in float64), and everything when more than 1/8
        of the rows are due.

    Notes
    -----
    ``UpdateK(r, j, δ)`` changes column r of ``A`` (every ``D_i`` and every row of ``AV``),
    ``UpdateV(r, j, δ)`` changes column j of ``AV`` by ``δ·A[:, r]``, and
    ``Query(i, j) = (D⁻¹AV)[i, j]``. Costs, with ``|J|`` pending distinct K rows and ``p``
    pending updates: update ``O(1)``; query ``O(|J|·d + p)``; flush ``O(n_q·|J|·(d + d_v) +
    n_q·nnz(ΔV))``; full recompute ``O(n_q·n_k·(d + d_v))``.

    Examples
    --------
    >>> import numpy as np, refattn
    >>> rng = np.random.default_rng(0)
    >>> Q, K, V = rng.random((6, 3)), rng.random((5, 3)), rng.random((5, 2))
    >>> att = refattn.DynamicAttention(Q, K, V)
    >>> att.update_key(2, 1, 0.5)
    >>> K[2, 1] += 0.5
    >>> S = Q @ K.T
    >>> W = np.exp(S - S.max(1, keepdims=True))
    >>> ref = (W / W.sum(1, keepdims=True)) @ V
    >>> bool(abs(att.query(4, 1) - ref[4, 1]) < 1e-14)
    True
    """

    def __init__(
        self,
        Q: Array,
        K: Array,
        V: Array,
        /,
        *,
        scale: float = 1.0,
        threshold: int | None = None,
        rebuild_every: int | None = None,
    ) -> None:
        where = "refattn.DynamicAttention"
        Qd, Kd, Vd = _densify(Q), _densify(K), _densify(V)
        xp = namespace(Qd, Kd, Vd)
        for name, x in (("Q", Qd), ("K", Kd), ("V", Vd)):
            if getattr(x, "ndim", None) != 2:
                raise ValueError(f"{where}: {name} must be 2-D, got {describe(x)}")
            check_floating(xp, f"DynamicAttention: {name}", x)
        dtype = floating_dtype(xp, {"Q": Qd, "K": Kd, "V": Vd})
        (n_q, d), (n_k, d_k), (n_v, d_v) = Qd.shape, Kd.shape, Vd.shape
        if d_k != d:
            raise ValueError(
                f"{where}: Q {describe(Qd)} and K {describe(Kd)} must have the same number of "
                f"columns (the key dimension d), got {d} and {d_k}"
            )
        if n_v != n_k:
            raise ValueError(
                f"{where}: K {describe(Kd)} and V {describe(Vd)} must have the same number of "
                f"rows (one value per key), got {n_k} and {n_v}"
            )
        if min(n_q, n_k, d, d_v) < 1:
            raise ValueError(
                f"{where}: Q, K and V must be non-empty, got Q {describe(Qd)}, K {describe(Kd)}, "
                f"V {describe(Vd)}"
            )
        for name, x in (("Q", Qd), ("K", Kd), ("V", Vd)):
            if not bool(xp.all(xp.isfinite(x))):
                raise ValueError(f"{where}: {name} must be finite, got NaN or inf entries")
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise TypeError(f"{where}: scale must be a real number, got {scale!r}")
        if not math.isfinite(float(scale)):
            raise ValueError(f"{where}: scale must be finite, got {scale!r}")
        self._threshold_fixed = self._check_count(where, "threshold", threshold)
        self._rebuild_every = self._check_count(where, "rebuild_every", rebuild_every)
        bounds = _Magnitudes.of(xp, Qd, Kd, Vd, float(scale), float(xp.finfo(dtype).max))
        bounds.check(where, "Q, K, V and scale", n_k)

        self._xp = xp
        self._dtype = dtype
        self._dtype_name = "float64" if dtype == xp.float64 else "float32"
        self._device = _device_of(Qd)
        self._native_sparse = _fancy_setitem(xp)  # scipy/cupyx sparse @ the backend's arrays
        self._sp = sparse_module(xp)
        finfo = xp.finfo(dtype)
        self._u = float(finfo.eps) / 2.0
        self._max_abs = float(finfo.max)
        tol = _TOL_ULPS[self._dtype_name]
        self._tol = 0.75 * tol * self._u  # drift of D and AV, relative to D
        self._key_budget = 0.25 * tol  # multiplicative error of a column of A, in units of u
        # D below this is recomputed: denormal entries, even lifted by exp(16), are negligible
        self._tiny = (
            float(finfo.smallest_normal)
            * math.exp(_MULTIPLICATIVE_EXPONENT)
            / float(finfo.eps) ** 2
        )
        self._scale = float(scale)

        self._Q = xp.asarray(Qd, copy=True)
        self._QT = xp.zeros((d, n_q), dtype=dtype, device=self._device)  # row-major Qᵀ
        self._QT[...] = self._Q.T
        # per-column bound on |Q| (host): bounds the exponents of multiplicative updates
        self._qmax = bounds.q  # the same list: kept current by update_query
        self._bounds = bounds
        # per key row: bound on the relative error of its column of A, in units of u (host)
        self._key_err: dict[int, float] = {}
        self._K = xp.asarray(Kd, copy=True)  # buffers: rows [0, n_k) are live
        self._V = xp.asarray(Vd, copy=True)
        self._nk = n_k
        self._n_q, self._d, self._d_v = n_q, d, d_v
        self._pk = _Pending(track_columns=False)
        self._pv = _Pending(track_columns=True)
        self._k_cache: _KeyRows | None = None
        self._work: dict[str, Array] = {}
        self._stats = {
            "key_updates": 0,
            "value_updates": 0,
            "query_updates": 0,
            "appends": 0,
            "removes": 0,
            "queries": 0,
            "flushes": 0,
            "columns_recomputed": 0,
            "rows_refreshed": 0,
            "rows_rescaled": 0,
            "rebuilds": 0,
        }
        self._flushes_since_rebuild = 0
        # adaptive threshold: running estimates of queries per update and of the K share
        self._win_updates = 0
        self._win_key_updates = 0
        self._win_queries = 0
        self._rate_updates = 1.0
        self._rate_queries = 1.0
        self._rate_key_updates = 0.5
        self._threshold_now = self._threshold_fixed or 1
        self._recompute_all()
        if self._threshold_fixed is None:
            self._tune()

    # ----------------------------------------------------------------------------------------
    # public API
    # ----------------------------------------------------------------------------------------

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(n_q, n_k, d, d_v)``: queries, keys (after appends/removes), key and value dims."""
        return (self._n_q, self._nk, self._d, self._d_v)

    @property
    def dtype(self) -> Any:
        """The floating dtype of the state and the outputs (that of the inputs)."""
        return self._dtype

    @property
    def pending(self) -> int:
        """Number of pending K and V entry updates (repeated entries counted as given)."""
        return len(self._pk) + len(self._pv)

    @property
    def threshold(self) -> int:
        """Pending updates that trigger a flush: the fixed value, or the adaptive one now."""
        return self._threshold_now

    @property
    def stats(self) -> dict[str, int]:
        """Counters (a copy): ``updates``, ``key_updates``, ``value_updates``,
        ``query_updates``, ``appends``, ``removes``, ``queries``, ``flushes``,
        ``columns_recomputed`` (columns of A recomputed by flushes), ``rows_refreshed`` (query
        rows recomputed to reset drift), ``rows_rescaled`` (per-row shifts raised) and
        ``rebuilds`` (full recomputes after construction).
        """
        out = dict(self._stats)
        out["updates"] = out["key_updates"] + out["value_updates"] + out["query_updates"]
        return out

    def update_key(self, i: int, j: int, delta: float) -> None:
        """``K[i, j] += delta``, deferred. Column i of A changes on the next flush."""
        where = "refattn.DynamicAttention.update_key"
        r = _index(where, "i", i, self._nk, f"K with {self._nk} rows")
        c = _index(where, "j", j, self._d, f"K with {self._d} columns")
        v = _scalar_delta(where, delta, self._max_abs)
        self._bounds.admit_key(where, self._nk, c, v)
        self._pk.add(r, c, v)
        if self._k_cache is not None:
            self._k_cache.add(self._xp, self._K, r, c, v)
        self._stats["key_updates"] += 1
        self._after_updates(1, 1)

    def update_value(self, i: int, j: int, delta: float) -> None:
        """``V[i, j] += delta``, deferred. Column j of AV changes by ``delta·A[:, i]``."""
        where = "refattn.DynamicAttention.update_value"
        r = _index(where, "i", i, self._nk, f"V with {self._nk} rows")
        c = _index(where, "j", j, self._d_v, f"V with {self._d_v} columns")
        v = _scalar_delta(where, delta, self._max_abs)
        self._bounds.admit_value(where, self._nk, c, v)
        self._pv.add(r, c, v)
        self._stats["value_updates"] += 1
        self._after_updates(1, 0)

    def update_keys(self, rows: Array, cols: Array, deltas: Array) -> None:
        """``K[rows[t], cols[t]] += deltas[t]`` for every t; repeated pairs accumulate.

        The batch is validated whole before anything changes.
        """
        where = "refattn.DynamicAttention.update_keys"
        r, c, v = self._batch(where, rows, cols, deltas, self._d, "K")
        if not r:
            return
        self._bounds.admit(where, "deltas", self._nk, k=zip(c, v, strict=True))
        self._pk.extend(r, c, v)
        if self._k_cache is not None and len(r) <= 32:
            for row, col, val in zip(r, c, v, strict=True):
                self._k_cache.add(self._xp, self._K, row, col, val)
        else:
            self._k_cache = None
        self._stats["key_updates"] += len(r)
        self._after_updates(len(r), len(r))

    def update_values(self, rows: Array, cols: Array, deltas: Array) -> None:
        """``V[rows[t], cols[t]] += deltas[t]`` for every t; repeated pairs accumulate.

        The batch is validated whole before anything changes.
        """
        where = "refattn.DynamicAttention.update_values"
        r, c, v = self._batch(where, rows, cols, deltas, self._d_v, "V")
        if not r:
            return
        self._bounds.admit(where, "deltas", self._nk, v=zip(c, v, strict=True))
        self._pv.extend(r, c, v)
        self._stats["value_updates"] += len(r)
        self._after_updates(len(r), 0)

    def update_query(self, i: int, j: int, delta: float) -> None:
        """``Q[i, j] += delta``, applied at once: row i of A is recomputed, ``O(n_k·(d+d_v))``."""
        where = "refattn.DynamicAttention.update_query"
        r = _index(where, "i", i, self._n_q, f"Q with {self._n_q} rows")
        c = _index(where, "j", j, self._d, f"Q with {self._d} columns")
        v = _scalar_delta(where, delta, self._max_abs)
        self._bounds.admit(where, "delta", self._nk, q=[(c, v)])
        self._Q[r, c] = self._Q[r, c] + v
        self._QT[c, r] = self._Q[r, c]
        self._refresh_rows([r])
        self._stats["query_updates"] += 1

    def query(self, i: int, j: int) -> float:
        r"""``softmax(scale·QKᵀ)V[i, j]`` with every pending update included, as a Python float.

        Nothing is flushed. With ``J`` the pending K rows, ``s'_r = scale·<Q[i], K[r] + ΔK[r]>``
        and a shift ``m = max(c_i, max_r s'_r)`` (so nothing overflows), ``f = exp(c_i - m)``::

            a'_r   = exp(s'_r - m),    δ_r = a'_r - f·A[i, r]            (r in J)
            D'_i   = f·D_i + Σ_J δ_r
            N'_ij  = f·AV[i, j] + Σ_J δ_r·V[r, j] + Σ_r A'[i, r]·ΔV[r, j]
            result = N'_ij / D'_i

        ``O(|J|·d)`` for the new scores plus ``O(nnz(ΔV[:, j]))``.
        """
        where = "refattn.DynamicAttention.query"
        i = _index(where, "i", i, self._n_q, f"the {self._n_q} query rows")
        j = _index(where, "j", j, self._d_v, f"the {self._d_v} output columns")
        self._stats["queries"] += 1
        self._after_query()
        if not self._pk and not self._pv:
            return float(self._AVt[j, i] / self._D[i])
        return self._query_pending(i, j)

    def weights(self, i: int) -> Array:
        """Row i of ``D⁻¹A`` (shape ``(n_k,)``, sums to 1), pending K updates included.

        ``O(n_k + |J|·d)``; nothing is flushed.
        """
        where = "refattn.DynamicAttention.weights"
        i = _index(where, "i", i, self._n_q, f"the {self._n_q} query rows")
        xp = self._xp
        self._stats["queries"] += 1
        self._after_query()
        a = xp.asarray(self._At[: self._nk, i], copy=True)
        if self._pk:
            J, J_dev, KJ, _ = self._key_rows()
            s = self._scale * (KJ @ self._Q[i, :])
            m = xp.maximum(self._c[i], xp.max(s))
            a = a * xp.exp(self._c[i] - m)
            _put(xp, a, J, J_dev, xp.exp(s - m), axis=0)
        total = xp.sum(a)
        if not bool(total >= self._tiny):
            return self._fresh_row(i)
        return a / total

    def output(self) -> Array:
        """The full ``(n_q, d_v)`` output ``D⁻¹AV``. Flushes pending updates first."""
        self.flush()
        return (self._AVt / self._D).T

    def flush(self) -> None:
        """Apply the pending K and V updates (see the class notes and ``docs/dynamic.md``)."""
        if not self._pk and not self._pv:
            return
        self._apply_pending(control_drift=True)

    def rebuild(self) -> None:
        """Apply pending updates and recompute everything: resets the shifts and the drift."""
        self._fold_pending()
        self._recompute_all()
        self._stats["rebuilds"] += 1

    def append(self, k_row: Array, v_row: Array) -> None:
        """Add a key/value token as row ``n_k`` of K and V; ``O(n_q·(d + d_v))`` amortized."""
        where = "refattn.DynamicAttention.append"
        k = self._row_input(where, "k_row", k_row, self._d)
        v = self._row_input(where, "v_row", v_row, self._d_v)
        self._bounds.admit_rows(where, "k_row, v_row", self._nk + 1, k, v)
        xp, nk = self._xp, self._nk
        self._ensure_capacity(nk + 1)
        s = self._scale * (self._Q @ k)
        self._raise_shifts(self._shift_target(s))
        a = xp.exp(s - self._c)
        self._K[nk, ...] = k
        self._V[nk, ...] = v
        self._At[nk, ...] = a
        self._D += a
        self._AVt += xp.reshape(v, (self._d_v, 1)) * xp.reshape(a, (1, self._n_q))
        self._drift += (2.0 * self._u) * (xp.abs(self._D) + a)
        self._nk = nk + 1
        self._stats["appends"] += 1
        self._control_drift()

    def remove(self, r: int) -> None:
        """Drop key/value row r; later rows move down by one (pending updates follow them).

        ``O(n_q·d_v)`` arithmetic plus moving the ``n_k - r - 1`` rows after it.
        """
        where = "refattn.DynamicAttention.remove"
        r = _index(where, "r", r, self._nk, f"K and V with {self._nk} rows")
        if self._nk == 1:
            raise ValueError(f"{where}: cannot remove the only key (softmax over no keys)")
        xp, nk = self._xp, self._nk
        a = xp.asarray(self._At[r, ...], copy=True)
        v = self._V[r, ...]
        self._D -= a
        self._AVt -= xp.reshape(v, (self._d_v, 1)) * xp.reshape(a, (1, self._n_q))
        self._drift += (2.0 * self._u) * (xp.abs(self._D) + 2.0 * a)
        for buf in (self._At, self._K, self._V):
            if r < nk - 1:
                buf[r : nk - 1, ...] = xp.asarray(buf[r + 1 : nk, ...], copy=True)
        self._nk = nk - 1
        self._pk.drop_row(r)
        self._pv.drop_row(r)
        self._key_err = {k - (k > r): e for k, e in self._key_err.items() if k != r}
        self._k_cache = None
        self._stats["removes"] += 1
        self._control_drift()

    def approximation_error(self) -> float:
        """Max relative error of the maintained output against a fresh float64 recompute.

        The pending updates are applied to a copy of the state (the same code as
        :meth:`flush`, without its drift control, so the measured drift is the state's own);
        ``self`` is not changed. The error is ``max_i max_j |out_ij - ref_ij| / max_j |ref_ij|``
        (relative per query row, in the infinity norm). ``O(n_q·n_k·(d + d_v))`` time and a
        copy of ``A``.
        """
        xp = self._xp
        state = self._clone()
        if state._pk or state._pv:
            state._apply_pending(control_drift=False)
        got = xp.astype((state._AVt / state._D).T, xp.float64)
        nk = state._nk
        ref = _reference_output(xp, state._Q, state._K[:nk, ...], state._V[:nk, ...], self._scale)
        err = xp.max(xp.abs(got - ref), axis=1)
        den = xp.max(xp.abs(ref), axis=1)
        den = xp.where(den > 0, den, xp.ones_like(den))
        return float(xp.max(err / den))

    # ----------------------------------------------------------------------------------------
    # validation
    # ----------------------------------------------------------------------------------------

    @staticmethod
    def _check_count(where: str, name: str, value: Any) -> int | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{where}: {name} must be None or a positive int, got {value!r}")
        if value < 1:
            raise ValueError(f"{where}: {name} must be None or a positive int, got {value!r}")
        return int(value)

    def _batch(
        self, where: str, rows: Any, cols: Any, deltas: Any, n_cols: int, name: str
    ) -> tuple[list[int], list[int], list[float]]:
        r = _host_indices(where, "rows", rows, self._nk, f"{name} with {self._nk} rows")
        c = _host_indices(where, "cols", cols, n_cols, f"{name} with {n_cols} columns")
        v = _host_deltas(where, deltas, self._max_abs)
        if not len(r) == len(c) == len(v):
            raise ValueError(
                f"{where}: rows, cols and deltas must have the same length, got "
                f"{len(r)}, {len(c)} and {len(v)}"
            )
        return r, c, v

    def _row_input(self, where: str, name: str, x: Any, size: int) -> Array:
        xp = self._xp
        x = _densify(x)
        if hasattr(x, "dtype"):
            if _is_complex_or_bool(x.dtype) or "float" not in str(x.dtype):
                raise TypeError(
                    f"{where}: {name} must be real floating ({self._dtype_name}), got {describe(x)}"
                )
            if str(x.dtype).split(".")[-1] != self._dtype_name:
                raise TypeError(
                    f"{where}: {name} must have the state's dtype {self._dtype_name}, "
                    f"got {describe(x)}"
                )
        else:  # a list or a scalar sequence: its own dtype must be floating too
            try:
                kind = _to_host(x).dtype.kind
            except (TypeError, ValueError) as exc:
                raise TypeError(f"{where}: {name} must be a real vector, got {x!r}") from exc
            if kind in "biu":
                raise TypeError(
                    f"{where}: {name} must hold floating-point numbers, got a sequence of "
                    f"{'bools' if kind == 'b' else 'integers'}"
                )
            if kind != "f":
                raise TypeError(f"{where}: {name} must be a real vector, got {x!r}")
        try:
            arr = xp.asarray(x, dtype=self._dtype, device=self._device)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{where}: {name} must be a real vector, got {describe(x)}") from exc
        if arr.ndim == 2 and arr.shape[0] == 1:
            arr = xp.reshape(arr, (arr.shape[1],))
        if tuple(arr.shape) != (size,):
            raise ValueError(f"{where}: {name} must have shape ({size},), got {describe(x)}")
        if not bool(xp.all(xp.isfinite(arr))):
            raise ValueError(f"{where}: {name} must be finite, got NaN or inf entries")
        return xp.asarray(arr, copy=True)

    # ----------------------------------------------------------------------------------------
    # the exact corrections
    # ----------------------------------------------------------------------------------------

    def _key_rows(self) -> tuple[list[int], Array, Array, dict[int, int]]:
        """Pending K rows J (host list and device index), their new values ``K[J] + ΔK[J]``
        (shape (|J|, d)) and ``row -> position in J``; kept current by later single updates."""
        if self._k_cache is None:
            J, J_dev, dK, _, _, _ = self._pending_key_rows()
            self._k_cache = _KeyRows(J, J_dev, self._xp.take(self._K, J_dev, axis=0) + dK)
        return self._k_cache.view()

    def _pending_key_rows(self) -> tuple[list[int], Array, Array, Any, list[float], list[int]]:
        """The pending K batch summed into CSR over its touched rows J: ``(J, J_dev, ΔK[J]
        dense, ΔK[J] CSR, bound, nnz)``, with per row the number of entries and a bound on
        ``max_i |scale·<Q[i], ΔK[r]>|`` (from per-column bounds on |Q|)."""
        xp = self._xp
        pend = self._pk
        slot: dict[int, int] = {}
        inv = [slot.setdefault(r, len(slot)) for r in pend.rows]
        J = list(slot)
        bound = [0.0] * len(J)
        nnz = [0] * len(J)
        qmax, scale = self._qmax, abs(self._scale)
        for k, c, v in zip(inv, pend.cols, pend.vals, strict=True):
            bound[k] += scale * abs(v) * qmax[c]
            nnz[k] += 1
        M = self._coo(pend.vals, inv, pend.cols, (len(J), self._d)).tocsr()  # sums repeats
        dense = M.toarray()
        if not self._native_sparse:
            dense = xp.asarray(dense, device=self._device)
        return J, xp.asarray(J, dtype=xp.int64, device=self._device), dense, M, bound, nnz

    def _coo(self, vals: list[float], rows: list[int], cols: list[int], shape: tuple) -> Any:
        if is_cupy_namespace(self._xp):
            xp = self._xp
            vals = xp.asarray(vals, dtype=self._dtype)
            rows = xp.asarray(rows, dtype=xp.int32)
            cols = xp.asarray(cols, dtype=xp.int32)
        return self._sp.coo_matrix((vals, (rows, cols)), shape=shape, dtype=self._dtype_name)

    def _query_pending(self, i: int, j: int) -> float:
        """The exact correction of entry (i, j) for the pending updates (see :meth:`query`).

        Few terms (at most ``_HOST_QUERY_TERMS``): one gather of the O(|J| + |R|) numbers it
        needs, then scalar arithmetic on the host (``math.fsum``); the per-call overhead of
        array operations on tiny arrays would dominate otherwise. More terms: array operations.
        """
        n_terms = len(self._key_rows()[0]) if self._pk else 0
        entries = self._pv.by_col.get(j) if self._pv else None
        n_terms += len(entries) if entries else 0
        if n_terms <= _HOST_QUERY_TERMS:
            return self._query_pending_host(i, j, entries)
        return self._query_pending_arrays(i, j)

    def _query_pending_host(self, i: int, j: int, entries: dict[int, float] | None) -> float:
        xp = self._xp
        parts = [xp.stack([self._D[i], self._AVt[j, i], self._c[i], self._drift[i]])]
        nJ = 0
        pos: dict[int, int] = {}
        if self._pk:
            J, J_dev, KJ, pos = self._key_rows()
            nJ = len(J)
            s = self._scale * (KJ @ self._Q[i, :])
            parts += [s, self._At[J_dev, i], self._V[J_dev, j]]
        R = list(entries) if entries else []
        if R:
            parts.append(self._At[xp.asarray(R, dtype=xp.int64, device=self._device), i])
        host = [float(v) for v in _to_host(xp.concat(parts)).tolist()]
        D, num, c, drift = host[:4]
        f, spread = 1.0, 0.0
        dA: list[float] = []
        if nJ:
            s_new, a_old, v_old = host[4 : 4 + nJ], host[4 + nJ : 4 + 2 * nJ], host[4 + 2 * nJ :]
            m = max(c, max(s_new))
            f = math.exp(c - m)
            dA = [math.exp(x - m) - f * a for x, a in zip(s_new, a_old, strict=True)]
            spread = f * D  # >= Σ_J old: the old entries are part of D
            drift *= f
            D = f * D + math.fsum(dA)
            num = f * num + math.fsum(v * da for v, da in zip(v_old, dA, strict=False))
        if R:
            a_R = host[4 + 3 * nJ :]
            terms = []
            for r, a, dv in zip(R, a_R, entries.values(), strict=True):
                k = pos.get(r)
                terms.append(dv * (f * a + (dA[k] if k is not None else 0.0)))
            num += math.fsum(terms)
        return self._checked(i, j, num, D, drift, spread, nJ + len(R))

    def _checked(
        self, i: int, j: int, num: float, D: float, drift: float, spread: float, n_terms: int
    ) -> float:
        """``num / D`` unless the first-order rounding bound of the corrections
        (``docs/dynamic.md``) is over tolerance or D underflowed: then row i from scratch."""
        err = drift + self._u * (2.0 * abs(D) + 2.0 * math.sqrt(n_terms) * (abs(D) + 2 * spread))
        if not (D >= self._tiny and err <= self._tol * D):
            return self._query_fresh(i, j)
        return num / D

    def _query_pending_arrays(self, i: int, j: int) -> float:
        xp = self._xp
        At = self._At  # A[i, r] = At[r, i]; gathers index it as At[rows, i]
        D_i = self._D[i]
        num = self._AVt[j, i]
        f = xp.ones_like(D_i)
        spread = xp.zeros_like(D_i)
        n_terms = 0
        dA = None
        pos: dict[int, int] = {}
        if self._pk:
            J, J_dev, KJ, pos = self._key_rows()
            s = self._scale * (KJ @ self._Q[i, :])
            c_i = self._c[i]
            m = xp.maximum(c_i, xp.max(s))
            f = xp.exp(c_i - m)
            new = xp.exp(s - m)
            old = f * At[J_dev, i]
            dA = new - old
            D_i = f * D_i + xp.sum(dA)
            num = f * num + xp.vecdot(self._V[J_dev, j], dA)
            spread = f * self._D[i]  # >= Σ_J old: the old entries are part of D
            n_terms = len(J)
        entries = self._pv.by_col.get(j) if self._pv else None
        if entries:
            R = list(entries)
            dv = xp.asarray(list(entries.values()), dtype=self._dtype, device=self._device)
            a = f * At[xp.asarray(R, dtype=xp.int64, device=self._device), i]
            hits = [(k, pos[r]) for k, r in enumerate(R) if r in pos]
            if hits:
                # rows with a pending K update too: their new A[i, r] is f·A[i, r] + δ_r
                ks, ps = (list(t) for t in zip(*hits, strict=True))
                idx = xp.asarray(ps, dtype=xp.int64, device=self._device)
                ks_dev = xp.asarray(ks, dtype=xp.int64, device=self._device)
                upd = xp.zeros(len(R), dtype=self._dtype, device=self._device)
                _put(xp, upd, ks, ks_dev, xp.take(dA, idx), axis=0)
                a = a + upd
            num = num + xp.vecdot(dv, a)
            n_terms += len(R)
        # one transfer of the scalars: the value, and the inputs of the drift check
        vals = _to_host(xp.stack([num, D_i, f * self._drift[i], spread])).tolist()
        numv, Dv, drift, spread_v = (float(x) for x in vals)
        return self._checked(i, j, numv, Dv, drift, spread_v, n_terms)

    def _fresh_row(self, i: int) -> Array:
        """Row i of the weights recomputed from scratch with the pending K updates applied,
        shape (n_k,). ``O(n_k·d)``: the fallback when a row's maintained sums are too inexact
        (D underflowed, or the drift bound is over tolerance)."""
        xp = self._xp
        K = xp.asarray(self._K[: self._nk, ...], copy=True)
        if self._pk:
            J, J_dev, KJ, _ = self._key_rows()
            _put(xp, K, J, J_dev, KJ, axis=0)
        s = self._scale * (K @ self._Q[i, :])
        e = xp.exp(s - xp.max(s))
        return e / xp.sum(e)

    def _query_fresh(self, i: int, j: int) -> float:
        xp = self._xp
        w = self._fresh_row(i)
        v = xp.asarray(self._V[: self._nk, j], copy=True)
        entries = self._pv.by_col.get(j) if self._pv else None
        if entries:
            R = list(entries)
            R_dev = xp.asarray(R, dtype=xp.int64, device=self._device)
            dv = xp.asarray(list(entries.values()), dtype=self._dtype, device=self._device)
            _put(xp, v, R, R_dev, xp.take(v, R_dev) + dv, axis=0)
        return float(xp.sum(w * v))

    # ----------------------------------------------------------------------------------------
    # applying updates
    # ----------------------------------------------------------------------------------------

    def _apply_pending(self, *, control_drift: bool) -> None:
        """The flush. K first (new columns A[:, J]), then V (``AV += A'·ΔV`` with the new A)."""
        if self._pk:
            if len(set(self._pk.rows)) >= _FULL_RECOMPUTE_FRACTION * self._nk:
                self._fold_pending()
                self._recompute_all()
                self._stats["flushes"] += 1
                self._stats["columns_recomputed"] += self._nk
                return
            self._apply_pending_keys()
        if self._pv:
            self._apply_pending_values()
        self._stats["flushes"] += 1
        self._flushes_since_rebuild += 1
        if not control_drift:
            return
        if self._rebuild_every is not None and self._flushes_since_rebuild >= self._rebuild_every:
            self._recompute_all()
            self._stats["rebuilds"] += 1
        else:
            self._control_drift()

    def _apply_pending_keys(self) -> None:
        """New columns ``A[:, J]`` for the pending K rows J; D and AV by the differences.

        A row with few pending entries is updated multiplicatively (``O(nnz·n_q)``)::

            A'[:, r] = A[:, r] ∘ exp(scale·Q·ΔK[r]ᵀ)      (ΔK[J] in CSR times row-major Qᵀ)

        the others are recomputed with one GEMM ``(|J|, d)·(d, n_q)``::

            A'[:, r] = exp(scale·Q·K'[r]ᵀ - c)

        Then ``ΔA = A' - A`` on those columns gives ``D += ΔA·1`` and ``AV += ΔA·V[J]``.
        """
        xp = self._xp
        J, J_dev, dK, M, bound, nnz = self._pending_key_rows()
        KJ = xp.take(self._K, J_dev, axis=0) + dK
        limit = max(1, self._d // 8)
        mult, fresh, increments = [], [], []
        for k, r in enumerate(J):
            inc = 2.0 + bound[k] * (nnz[k] + 1)  # rounding of exp and of its argument, in u
            if (
                nnz[k] <= limit
                and bound[k] <= _MULTIPLICATIVE_EXPONENT
                and self._key_err.get(r, 0.0) + inc <= self._key_budget
            ):
                mult.append(k)
                increments.append(inc)
            else:
                fresh.append(k)
        S_fresh = N_mult = old_mult = None
        raise_to = self._c
        if fresh:
            f_dev = xp.asarray(fresh, dtype=xp.int64, device=self._device)
            S_fresh = self._scale * (xp.take(KJ, f_dev, axis=0) @ self._Q.T)
            raise_to = self._shift_target(xp.max(S_fresh, axis=0))
        if mult:
            m_rows = [J[k] for k in mult]
            m_dev = xp.asarray(m_rows, dtype=xp.int64, device=self._device)
            M_mult = M if len(mult) == len(J) else M[mult]
            N_mult = exp_inplace(xp, self._scale * self._spmm(M_mult, self._QT))
            old_mult = self._take_rows(self._At, m_rows, m_dev, "old_mult")
            N_mult *= old_mult
            top = xp.max(N_mult, axis=0)  # exp(new max score - c)
            lifted = top > 1.0
            if bool(xp.any(lifted)):
                safe = xp.where(lifted, top, xp.ones_like(top))
                lift_to = xp.where(lifted, self._c + xp.log(safe) + _SHIFT_MARGIN, self._c)
                raise_to = xp.maximum(raise_to, lift_to)
        f = self._raise_shifts(raise_to)
        if f is not None and mult:
            N_mult *= f
            old_mult *= f
        if fresh:
            S_fresh -= self._c
            new = exp_inplace(xp, S_fresh)
            rows = [J[k] for k in fresh]
            self._commit_columns(rows, xp.asarray(rows, dtype=xp.int64), new, None)
            for r in rows:
                self._key_err.pop(r, None)
        if mult:
            self._commit_columns(m_rows, m_dev, N_mult, old_mult)
            for r, inc in zip(m_rows, increments, strict=True):
                self._key_err[r] = self._key_err.get(r, 0.0) + inc
        _put(xp, self._K, J, J_dev, KJ, axis=0)
        self._stats["columns_recomputed"] += len(J)
        self._pk.clear()
        self._k_cache = None

    def _commit_columns(self, rows: list[int], idx: Array, new: Array, old: Array | None) -> None:
        """Write the new columns ``A[:, rows]`` (rows of Aᵀ) and add their differences to D and
        AV; ``new`` is overwritten with ``ΔA``. ``old`` defaults to the stored columns."""
        xp = self._xp
        idx = xp.asarray(idx, device=self._device)
        if old is None:
            old = self._take_rows(self._At, rows, idx, "old_fresh")
        _put(xp, self._At, rows, idx, new, axis=0)
        spread = (2.0 * math.sqrt(len(rows))) * (xp.sum(old, axis=0) + xp.sum(new, axis=0))
        new -= old  # ΔA[:, rows]ᵀ
        self._D += xp.sum(new, axis=0)
        if len(rows) == 1:  # a rank-1 update: broadcasting beats a k = 1 GEMM by 3x
            self._AVt += xp.reshape(self._V[rows[0], ...], (self._d_v, 1)) * new
        else:
            VJt = xp.take(self._V, idx, axis=0).T
            out = self._scratch("av", self._d_v, self._n_q)
            self._AVt += VJt @ new if out is None else xp.matmul(VJt, new, out=out)
        self._drift += self._u * (2.0 * xp.abs(self._D) + spread)

    def _scratch(self, name: str, rows: int, cols: int) -> Array | None:
        """A reusable C-contiguous ``(rows, cols)`` work buffer for ``out=`` (NumPy, CuPy), or
        None (other backends, or too large to keep). Reusing it avoids allocating, and faulting
        in, a fresh array of the size of ``|J|`` columns of A at every flush."""
        if not self._native_sparse or rows > _SCRATCH_ROWS:
            return None
        buf = self._work.get(name)
        if buf is None or buf.shape[0] < rows or buf.shape[1] != cols:
            size = max(rows, 2 * buf.shape[0] if buf is not None else 0)
            shape = (min(size, _SCRATCH_ROWS), cols)
            buf = self._xp.empty(shape, dtype=self._dtype, device=self._device)
            self._work[name] = buf
        return buf[:rows, ...]

    def _take_rows(self, A: Array, rows: list[int], idx: Array, name: str) -> Array:
        """``A[idx]`` (rows), into a work buffer where the backend allows."""
        out = self._scratch(name, len(rows), A.shape[1])
        if out is None:
            return self._xp.take(A, idx, axis=0)
        return self._xp.take(A, idx, axis=0, out=out)

    def _spmm(self, M: Any, X: Array) -> Array:
        """``M @ X`` for a sparse M (scipy / cupyx) and a dense X of the backend."""
        if self._native_sparse:
            return M @ X
        return self._xp.asarray(M.toarray(), device=self._device) @ X

    def _apply_pending_values(self) -> None:
        """``AV += A'·ΔV`` and ``V += ΔV``, touching only the value columns C that changed.

        The pending entries, summed per ``(row, col)``, form ``(ΔVᵀ)[C]``, a (|C|, n_k) CSR
        matrix: ``(ΔVᵀ)[C]·Aᵀ`` costs ``nnz(ΔV)·n_q`` and rewrites only |C| rows of ``AVᵀ``.
        """
        xp = self._xp
        rows, slots, cols, vals = self._pv.summed()
        C = list(self._pv.by_col)
        C_dev = xp.asarray(C, dtype=xp.int64, device=self._device)
        dVt = self._coo(vals, slots, rows, (len(C), self._nk)).tocsr()
        if self._native_sparse:
            G = dVt @ self._At[: self._nk, ...]
        else:  # array-api-strict (for checking): the touched rows of Aᵀ, densified product
            R = sorted(set(rows))
            R_dev = xp.asarray(R, dtype=xp.int64, device=self._device)
            dense = xp.asarray(dVt[:, R].toarray(), device=self._device)
            G = dense @ xp.take(self._At, R_dev, axis=0)
        _put(xp, self._AVt, C, C_dev, xp.take(self._AVt, C_dev, axis=0) + G, axis=0)
        self._add_entries(self._V, rows, cols, vals)
        per_col = math.sqrt(self._pv.max_per_column())
        self._drift += (2.0 * self._u * (1.0 + per_col)) * xp.abs(self._D)
        self._pv.clear()

    def _add_entries(self, M: Array, rows: list[int], cols: list[int], vals: list[float]) -> None:
        """``M[rows[t], cols[t]] += vals[t]`` for distinct ``(row, col)`` pairs, in place."""
        xp = self._xp
        if _fancy_setitem(xp):
            r = xp.asarray(rows, dtype=xp.int64, device=self._device)
            c = xp.asarray(cols, dtype=xp.int64, device=self._device)
            M[r, c] += xp.asarray(vals, dtype=self._dtype, device=self._device)
            return
        for r, c, v in zip(rows, cols, vals, strict=True):
            M[r, c] = M[r, c] + v

    def _fold_pending(self) -> None:
        """Add the pending batches into K and V (no change to A, D, AV)."""
        xp = self._xp
        if self._pk:
            J, J_dev, KJ, _ = self._key_rows()
            _put(xp, self._K, J, J_dev, KJ, axis=0)
            self._pk.clear()
            self._k_cache = None
        if self._pv:
            rows, _, cols, vals = self._pv.summed()
            self._add_entries(self._V, rows, cols, vals)
            self._pv.clear()

    def _shift_target(self, smax: Array) -> Array:
        """The shifts that new maximum scores ``smax`` call for: ``smax + margin`` where they
        exceed the current shift, else the current shift."""
        return self._xp.where(smax > self._c, smax + _SHIFT_MARGIN, self._c)

    def _raise_shifts(self, target: Array) -> Array | None:
        """Raise the shifts to ``target`` where it is higher, rescaling those rows.

        ``A[i, :]``, ``D_i`` and ``AV[i, :]`` are multiplied by ``f_i = exp(c_i - target_i) < 1``,
        so the stored ``exp(s - c_i)`` stays ``<= 1`` and never overflows. Returns ``f`` (ones
        where nothing changed), or None when no row was raised.
        """
        xp = self._xp
        mask = target > self._c
        if not bool(xp.any(mask)):
            return None
        nk = self._nk
        c_new = xp.where(mask, target, self._c)
        f_all = xp.exp(self._c - c_new)
        idx = xp.nonzero(mask)[0]
        count = int(idx.shape[0])
        if count > _REFRESH_ALL_FRACTION * self._n_q * 2:
            self._At[:nk, ...] *= f_all
            self._AVt *= f_all
            self._D *= f_all
            self._drift *= f_all
        else:
            I = [int(v) for v in _to_host(idx).tolist()]
            f = xp.take(f_all, idx)
            view = self._At[:nk, ...]
            _put(xp, view, I, idx, xp.take(view, idx, axis=1) * f, axis=1)
            _put(xp, self._AVt, I, idx, xp.take(self._AVt, idx, axis=1) * f, axis=1)
            _put(xp, self._D, I, idx, xp.take(self._D, idx) * f, axis=0)
            _put(xp, self._drift, I, idx, xp.take(self._drift, idx) * f, axis=0)
        self._drift += self._u * xp.where(mask, xp.abs(self._D), xp.zeros_like(self._D))
        self._c = c_new
        self._stats["rows_rescaled"] += count
        return f_all

    def _control_drift(self) -> None:
        """Recompute the query rows whose drift bound is over tolerance (or whose D underflowed);
        everything, when that is more than 1/8 of the rows."""
        xp = self._xp
        bad = ~(self._D >= self._tiny) | (self._drift > self._tol * self._D)
        if not bool(xp.any(bad)):
            return
        idx = xp.nonzero(bad)[0]
        if int(idx.shape[0]) > _REFRESH_ALL_FRACTION * self._n_q:
            self._recompute_all()
            self._stats["rebuilds"] += 1
            return
        self._refresh_rows([int(v) for v in _to_host(idx).tolist()])

    def _refresh_rows(self, rows: list[int]) -> None:
        """Recompute query rows (columns of Aᵀ) from the committed K and V, fresh shifts."""
        xp = self._xp
        nk = self._nk
        idx = xp.asarray(rows, dtype=xp.int64, device=self._device)
        S = self._scale * (self._K[:nk, ...] @ xp.take(self._Q, idx, axis=0).T)  # (n_k, |I|)
        c = xp.max(S, axis=0) + _SHIFT_MARGIN
        E = xp.exp(S - c)
        _put(xp, self._At[:nk, ...], rows, idx, E, axis=1)
        _put(xp, self._AVt, rows, idx, self._V[:nk, ...].T @ E, axis=1)
        _put(xp, self._c, rows, idx, c, axis=0)
        _put(xp, self._D, rows, idx, xp.sum(E, axis=0), axis=0)
        _put(xp, self._drift, rows, idx, xp.zeros_like(c), axis=0)
        self._stats["rows_refreshed"] += len(rows)

    def _recompute_all(self) -> None:
        """Full recompute from the committed K and V: fresh shifts, zero drift."""
        xp = self._xp
        nk = self._nk
        K, V = self._K[:nk, ...], self._V[:nk, ...]
        S = self._scale * (K @ self._Q.T)  # (n_k, n_q): the layout of Aᵀ
        c = xp.max(S, axis=0) + _SHIFT_MARGIN
        S -= c
        E = exp_inplace(xp, S)
        cap = self._K.shape[0]
        if cap == nk:
            self._At = E
        else:
            self._At = xp.zeros((cap, self._n_q), dtype=self._dtype, device=self._device)
            self._At[:nk, ...] = E
        self._c = c
        self._D = xp.sum(E, axis=0)
        self._AVt = V.T @ E
        self._drift = xp.zeros_like(c)
        self._key_err = {}
        self._flushes_since_rebuild = 0

    def _ensure_capacity(self, rows: int) -> None:
        """Grow the K, V and Aᵀ buffers (by half) so that ``rows`` rows fit."""
        cap = self._K.shape[0]
        if rows <= cap:
            return
        new_cap = max(rows, cap + max(16, cap // 2))
        xp, nk = self._xp, self._nk
        for name, width in (("_K", self._d), ("_V", self._d_v), ("_At", self._n_q)):
            buf = xp.zeros((new_cap, width), dtype=self._dtype, device=self._device)
            buf[:nk, ...] = getattr(self, name)[:nk, ...]
            setattr(self, name, buf)

    def _clone(self) -> DynamicAttention:
        """A copy whose arrays and pending batches are independent of ``self``'s."""
        xp = self._xp
        other = object.__new__(DynamicAttention)
        other.__dict__.update(self.__dict__)
        for name in ("_Q", "_QT", "_K", "_V", "_At", "_AVt", "_D", "_c", "_drift"):
            setattr(other, name, xp.asarray(getattr(self, name), copy=True))
        other._bounds = self._bounds.copy()
        other._qmax = other._bounds.q
        other._key_err = dict(self._key_err)
        other._pk = self._pk.copy()
        other._pv = self._pv.copy()
        other._k_cache = None
        other._work = {}
        other._stats = dict(self._stats)
        return other

    # ----------------------------------------------------------------------------------------
    # the adaptive threshold
    # ----------------------------------------------------------------------------------------

    def _after_updates(self, count: int, key_count: int) -> None:
        self._win_updates += count
        self._win_key_updates += key_count
        if self._win_updates + self._win_queries >= _TUNE_EVERY:
            self._tune()
        if len(self._pk) + len(self._pv) >= self._threshold_now:
            self._apply_pending(control_drift=True)

    def _after_query(self) -> None:
        self._win_queries += 1
        if self._win_updates + self._win_queries >= _TUNE_EVERY:
            self._tune()

    def _tune(self) -> None:
        """Fold the operation counters into running rates and re-derive the threshold.

        The rates are exponential averages over windows of ``_TUNE_EVERY`` operations: updates,
        K updates and queries (``query`` and ``weights``). The threshold is the T that
        minimises :meth:`_CostModel.per_update` for the observed queries per update and K
        share (``docs/dynamic.md``).
        """
        w = _TUNE_WEIGHT
        if self._win_updates or self._win_queries:
            self._rate_updates = (1 - w) * self._rate_updates + w * self._win_updates
            self._rate_queries = (1 - w) * self._rate_queries + w * self._win_queries
            self._rate_key_updates = (1 - w) * self._rate_key_updates + w * self._win_key_updates
            self._win_updates = self._win_key_updates = self._win_queries = 0
        if self._threshold_fixed is not None:
            self._threshold_now = self._threshold_fixed
            return
        self._threshold_now = self._adaptive_threshold()

    def _adaptive_threshold(self) -> int:
        """The T on a geometric grid (ratio about 1.5) that minimises the modelled cost per
        update, capped at ``max(64, 2·n_k)``."""
        cap = max(64, 2 * self._nk)
        lam = self._rate_queries / max(self._rate_updates, 1e-9)
        fk = min(1.0, self._rate_key_updates / max(self._rate_updates, 1e-9))
        args = (lam, fk, self._n_q, self._d, self._d_v)
        best_t, best_cost = 1, _COST.per_update(1, *args)
        t = 2
        while t <= cap:
            cost = _COST.per_update(t, *args)
            if cost < best_cost:
                best_t, best_cost = t, cost
            t = t + 1 if t < 4 else int(t * 1.5)
        return best_t
