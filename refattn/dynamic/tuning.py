"""The tolerances and thresholds of :class:`~refattn.dynamic.DynamicAttention`, the cost model
of a flush, and the adaptive threshold that minimises the modelled cost per update
(``docs/dynamic.md`` derives it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Array = Any


# Error tolerance, in units of the unit roundoff u of the state's dtype. float64: 4096·u ≈ 4.5e-13,
# a factor 2 under the 1e-12 contract; float32: 64·u ≈ 3.8e-6. Three quarters of it bound the
# drift of D and AV (a query row whose bound exceeds that is recomputed), one quarter the error
# of the columns of A updated multiplicatively (a key row over budget is recomputed fresh).
TOL_ULPS = {"float64": 4096.0, "float32": 64.0}
# A pending key row is applied multiplicatively, A'[:, r] = A[:, r]·exp(scale·Q·ΔK[r]ᵀ), when it
# has at most max(1, d // 8) entries and its exponent is bounded by this (no overflow, and no
# denormal entry is lifted into significance); otherwise its column is recomputed fresh.
MULTIPLICATIVE_EXPONENT = 16.0
# A query whose correction has at most this many terms is finished with host scalar arithmetic.
HOST_QUERY_TERMS = 64
# Work buffers for flushes are kept for up to this many rows (NumPy and CuPy only).
SCRATCH_ROWS = 1024

# A flush that touches at least this fraction of the keys recomputes everything instead.
FULL_RECOMPUTE_FRACTION = 0.75
# Rows (query rows) whose drift must be reset: beyond this fraction of n_q, rebuild everything.
REFRESH_ALL_FRACTION = 0.125
# Adaptive threshold: fold the operation counters into the running estimate every this many.
TUNE_EVERY = 32
TUNE_WEIGHT = 0.3
# Headroom of the per-row shift: c_i = (row maximum) + SHIFT_MARGIN, so stored entries are at most
# exp(-16) ≈ 1e-7 and a row is rescaled only when one of its scores rises 16 above its old maximum
# (never, in streams of small updates). It costs 16 of float64's ~1400 nats of exponent range.
SHIFT_MARGIN = 16.0


@dataclass(frozen=True)
class CostModel:
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


COST = CostModel()


class UpdatePolicy:
    """When to flush: at a fixed number of pending updates, or at the adaptive threshold.

    The policy sees only operation counts and the shape ``(n_q, n_k, d, d_v)``; the flush is the
    caller's. It keeps exponential averages, over windows of ``TUNE_EVERY`` operations, of
    updates, K updates and queries (``query`` and ``weights``), and sets :attr:`threshold` to
    the T that minimises :meth:`CostModel.per_update` for the observed queries per update and K
    share (``docs/dynamic.md``).
    """

    def __init__(self, fixed: int | None, shape: tuple[int, int, int, int]) -> None:
        self.fixed = fixed
        self.win_updates = self.win_key_updates = self.win_queries = 0
        self.rate_updates = 1.0
        self.rate_queries = 1.0
        self.rate_key_updates = 0.5
        self.threshold = fixed or 1
        if fixed is None:
            self.tune(shape)

    def record_updates(self, count: int, key_count: int, shape: tuple[int, int, int, int]) -> None:
        """``count`` updates were deferred, ``key_count`` of them to K."""
        self.win_updates += count
        self.win_key_updates += key_count
        if self.win_updates + self.win_queries >= TUNE_EVERY:
            self.tune(shape)

    def record_query(self, shape: tuple[int, int, int, int]) -> None:
        """One query (``query`` or ``weights``) was answered."""
        self.win_queries += 1
        if self.win_updates + self.win_queries >= TUNE_EVERY:
            self.tune(shape)

    def tune(self, shape: tuple[int, int, int, int]) -> None:
        """Fold the window's counts into the running rates and re-derive the threshold."""
        w = TUNE_WEIGHT
        if self.win_updates or self.win_queries:
            self.rate_updates = (1 - w) * self.rate_updates + w * self.win_updates
            self.rate_queries = (1 - w) * self.rate_queries + w * self.win_queries
            self.rate_key_updates = (1 - w) * self.rate_key_updates + w * self.win_key_updates
            self.win_updates = self.win_key_updates = self.win_queries = 0
        self.threshold = self.fixed if self.fixed is not None else self.adaptive_threshold(shape)

    def adaptive_threshold(self, shape: tuple[int, int, int, int]) -> int:
        """The T on a geometric grid (ratio about 1.5) that minimises the modelled cost per
        update, capped at ``max(64, 2·n_k)``."""
        n_q, n_k, d, d_v = shape
        cap = max(64, 2 * n_k)
        lam = self.rate_queries / max(self.rate_updates, 1e-9)
        fk = min(1.0, self.rate_key_updates / max(self.rate_updates, 1e-9))
        args = (lam, fk, n_q, d, d_v)
        best_t, best_cost = 1, COST.per_update(1, *args)
        t = 2
        while t <= cap:
            cost = COST.per_update(t, *args)
            if cost < best_cost:
                best_t, best_cost = t, cost
            t = t + 1 if t < 4 else int(t * 1.5)
        return best_t
