"""The public class :class:`DynamicAttention`: its state, the updates, appends, removals and
queries a user calls, and the validation that runs before any state changes. The work itself is
in the parts it is made of: :mod:`.pending` (the COO batches), :mod:`.queries` (exact answers
while updates are pending), :mod:`.flush` (applying the batches), :mod:`.drift` (the row shifts
and the rounding-drift bound), :mod:`.tuning` (the cost model and the adaptive threshold),
:mod:`.magnitudes` (the overflow guard)."""

from __future__ import annotations

import math
import numbers
from typing import Any

from array_api_compat import device as _device_of

from .._backend import (
    check_floating,
    describe,
    floating_dtype,
    namespace,
    sparse_module,
)
from .arrays import fancy_setitem, put, reference_output
from .drift import DriftControl
from .flush import Flushing
from .magnitudes import Magnitudes
from .pending import KeyRows, Pending
from .queries import QueryPaths
from .tuning import MULTIPLICATIVE_EXPONENT, TOL_ULPS, AdaptiveThreshold
from .validation import (
    check_index,
    densify,
    host_deltas,
    host_indices,
    host_input,
    is_complex_or_bool,
    scalar_delta,
)

__all__ = ["DynamicAttention"]

Array = Any


class DynamicAttention(QueryPaths, Flushing, DriftControl, AdaptiveThreshold):
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
        Qd, Kd, Vd = densify(Q), densify(K), densify(V)
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
        bounds = Magnitudes.of(xp, Qd, Kd, Vd, float(scale), float(xp.finfo(dtype).max))
        bounds.check(where, "Q, K, V and scale", n_k)

        self._xp = xp
        self._dtype = dtype
        self._dtype_name = "float64" if dtype == xp.float64 else "float32"
        self._device = _device_of(Qd)
        self._native_sparse = fancy_setitem(xp)  # scipy/cupyx sparse @ the backend's arrays
        self._sp = sparse_module(xp)
        finfo = xp.finfo(dtype)
        self._u = float(finfo.eps) / 2.0
        self._max_abs = float(finfo.max)
        tol = TOL_ULPS[self._dtype_name]
        self._tol = 0.75 * tol * self._u  # drift of D and AV, relative to D
        self._key_budget = 0.25 * tol  # multiplicative error of a column of A, in units of u
        # D below this is recomputed: denormal entries, even lifted by exp(16), are negligible
        self._tiny = (
            float(finfo.smallest_normal) * math.exp(MULTIPLICATIVE_EXPONENT) / float(finfo.eps) ** 2
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
        self._pk = Pending(track_columns=False)
        self._pv = Pending(track_columns=True)
        self._k_cache: KeyRows | None = None
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
        r = check_index(where, "i", i, self._nk, f"K with {self._nk} rows")
        c = check_index(where, "j", j, self._d, f"K with {self._d} columns")
        v = scalar_delta(where, delta, self._max_abs)
        self._bounds.admit_key(where, self._nk, c, v)
        self._pk.add(r, c, v)
        if self._k_cache is not None:
            self._k_cache.add(self._xp, self._K, r, c, v)
        self._stats["key_updates"] += 1
        self._after_updates(1, 1)

    def update_value(self, i: int, j: int, delta: float) -> None:
        """``V[i, j] += delta``, deferred. Column j of AV changes by ``delta·A[:, i]``."""
        where = "refattn.DynamicAttention.update_value"
        r = check_index(where, "i", i, self._nk, f"V with {self._nk} rows")
        c = check_index(where, "j", j, self._d_v, f"V with {self._d_v} columns")
        v = scalar_delta(where, delta, self._max_abs)
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
        r = check_index(where, "i", i, self._n_q, f"Q with {self._n_q} rows")
        c = check_index(where, "j", j, self._d, f"Q with {self._d} columns")
        v = scalar_delta(where, delta, self._max_abs)
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
        i = check_index(where, "i", i, self._n_q, f"the {self._n_q} query rows")
        j = check_index(where, "j", j, self._d_v, f"the {self._d_v} output columns")
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
        i = check_index(where, "i", i, self._n_q, f"the {self._n_q} query rows")
        xp = self._xp
        self._stats["queries"] += 1
        self._after_query()
        a = xp.asarray(self._At[: self._nk, i], copy=True)
        if self._pk:
            J, J_dev, KJ, _ = self._key_rows()
            s = self._scale * (KJ @ self._Q[i, :])
            m = xp.maximum(self._c[i], xp.max(s))
            a = a * xp.exp(self._c[i] - m)
            put(xp, a, J, J_dev, xp.exp(s - m), axis=0)
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
        r = check_index(where, "r", r, self._nk, f"K and V with {self._nk} rows")
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
        ref = reference_output(xp, state._Q, state._K[:nk, ...], state._V[:nk, ...], self._scale)
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
        r = host_indices(where, "rows", rows, self._nk, f"{name} with {self._nk} rows")
        c = host_indices(where, "cols", cols, n_cols, f"{name} with {n_cols} columns")
        v = host_deltas(where, deltas, self._max_abs)
        if not len(r) == len(c) == len(v):
            raise ValueError(
                f"{where}: rows, cols and deltas must have the same length, got "
                f"{len(r)}, {len(c)} and {len(v)}"
            )
        return r, c, v

    def _row_input(self, where: str, name: str, x: Any, size: int) -> Array:
        xp = self._xp
        x = densify(x)
        if hasattr(x, "dtype"):
            if is_complex_or_bool(x.dtype) or "float" not in str(x.dtype):
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
                kind = host_input(x).dtype.kind
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
