"""The maintained state of :class:`~refattn.dynamic.DynamicAttention`, in one place.

Every part of the package (:mod:`.queries`, :mod:`.flush`, :mod:`.drift`) is a set of functions
of a :class:`State`; :class:`~refattn.dynamic.DynamicAttention` owns one and validates every
input before a part touches it. Keeping the fields here, named and documented once, is what lets
a reader follow one part without the others: a function's effect is on the fields it names.
"""

from __future__ import annotations

import math
from typing import Any

from array_api_compat import device as _device_of

from .._backend import sparse_module
from .arrays import fancy_setitem
from .magnitudes import Magnitudes
from .pending import KeyRows, Pending
from .tuning import MULTIPLICATIVE_EXPONENT, TOL_ULPS

Array = Any

STAT_NAMES = (
    "key_updates",
    "value_updates",
    "query_updates",
    "appends",
    "removes",
    "queries",
    "flushes",
    "columns_recomputed",
    "rows_refreshed",
    "rows_rescaled",
    "rebuilds",
)


class State:
    """The arrays, bounds and pending batches of one dynamic attention.

    With ``n_q`` queries, ``nk`` live keys and per-query-row shifts ``c``:

    ====================  ==========================================================
    ``Q``, ``QT``         (n_q, d) queries and their row-major transpose (d, n_q)
    ``K``, ``V``          (cap, d), (cap, d_v) buffers; rows ``[0, nk)`` are live
    ``At``                (cap, n_q): ``Aᵀ[r, i] = exp(scale·<Q[i], K[r]> - c[i])``
    ``D``, ``AVt``        (n_q,) row sums of A and (d_v, n_q) ``(A·V)ᵀ``
    ``c``, ``drift``      (n_q,) shifts and first-order rounding bounds on ``D``, ``AV``
    ``pk``, ``pv``        the pending K and V batches (:class:`~.pending.Pending`)
    ``k_cache``           ``K[J] + ΔK[J]`` for the pending K rows J, or None
    ``key_err``           per key row, the error bound of its column of A, in units of u
    ``bounds``, ``qmax``  the overflow guard (:class:`~.magnitudes.Magnitudes`), |Q| per column
    ``u``, ``tol``        unit roundoff; the drift tolerance relative to D
    ``key_budget``        the multiplicative-update budget of a column of A, in units of u
    ``tiny``              D below this is recomputed (denormal territory, see ``__init__``)
    ``work``              reusable flush buffers by name
    ``stats``             the counters behind ``DynamicAttention.stats``
    ====================  ==========================================================

    ``At``, ``D``, ``AVt``, ``c`` and ``drift`` are set by :func:`.drift.recompute_all`.
    """

    At: Array
    D: Array
    AVt: Array
    c: Array
    drift: Array

    def __init__(
        self,
        xp: Any,
        dtype: Any,
        Q: Array,
        K: Array,
        V: Array,
        *,
        scale: float,
        bounds: Magnitudes,
        rebuild_every: int | None,
    ) -> None:
        self.xp = xp
        self.dtype = dtype
        self.dtype_name = "float64" if dtype == xp.float64 else "float32"
        self.device = _device_of(Q)
        self.native_sparse = fancy_setitem(xp)  # scipy/cupyx sparse @ the backend's arrays
        self.sp = sparse_module(xp)
        finfo = xp.finfo(dtype)
        self.u = float(finfo.eps) / 2.0
        self.max_abs = float(finfo.max)
        tol = TOL_ULPS[self.dtype_name]
        self.tol = 0.75 * tol * self.u  # drift of D and AV, relative to D
        self.key_budget = 0.25 * tol  # multiplicative error of a column of A, in units of u
        # D below this is recomputed: denormal entries, even lifted by exp(16), are negligible
        self.tiny = (
            float(finfo.smallest_normal) * math.exp(MULTIPLICATIVE_EXPONENT) / float(finfo.eps) ** 2
        )
        self.scale = scale
        self.rebuild_every = rebuild_every

        (n_q, d), (n_k, d_v) = Q.shape, V.shape
        self.Q = xp.asarray(Q, copy=True)
        self.QT = xp.zeros((d, n_q), dtype=dtype, device=self.device)  # row-major Qᵀ
        self.QT[...] = self.Q.T
        self.bounds = bounds
        self.qmax = bounds.q  # the same list: kept current by update_query
        self.key_err: dict[int, float] = {}
        self.K = xp.asarray(K, copy=True)
        self.V = xp.asarray(V, copy=True)
        self.nk = n_k
        self.n_q, self.d, self.d_v = n_q, d, d_v
        self.pk = Pending(track_columns=False)
        self.pv = Pending(track_columns=True)
        self.k_cache: KeyRows | None = None
        self.work: dict[str, Array] = {}
        self.stats = dict.fromkeys(STAT_NAMES, 0)
        self.flushes_since_rebuild = 0

    @property
    def pending(self) -> int:
        """Pending K and V entry updates, repeated entries counted as given."""
        return len(self.pk) + len(self.pv)

    def grow(self, rows: int) -> None:
        """Grow the K, V and Aᵀ buffers (by half) so that ``rows`` rows fit."""
        cap = self.K.shape[0]
        if rows <= cap:
            return
        new_cap = max(rows, cap + max(16, cap // 2))
        xp, nk = self.xp, self.nk
        for name, width in (("K", self.d), ("V", self.d_v), ("At", self.n_q)):
            buf = xp.zeros((new_cap, width), dtype=self.dtype, device=self.device)
            buf[:nk, ...] = getattr(self, name)[:nk, ...]
            setattr(self, name, buf)

    def clone(self) -> State:
        """A copy whose arrays, bounds and pending batches are independent of ``self``'s."""
        xp = self.xp
        other = object.__new__(State)
        other.__dict__.update(self.__dict__)
        for name in ("Q", "QT", "K", "V", "At", "AVt", "D", "c", "drift"):
            setattr(other, name, xp.asarray(getattr(self, name), copy=True))
        other.bounds = self.bounds.copy()
        other.qmax = other.bounds.q
        other.key_err = dict(self.key_err)
        other.pk = self.pk.copy()
        other.pv = self.pv.copy()
        other.k_cache = None
        other.work = {}
        other.stats = dict(self.stats)
        return other
