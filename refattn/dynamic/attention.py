"""The public class :class:`DynamicAttention`: the updates, appends, removals and queries a
user calls, and the validation that runs before any state changes. It owns two parts: a
:class:`~.state.State` (the maintained arrays, bounds and pending batches) and an
:class:`~.tuning.UpdatePolicy` (when to flush). The work is done by functions of the state:
:mod:`.queries` (exact answers while updates are pending), :mod:`.flush` (applying the
batches), :mod:`.drift` (the row shifts and the rounding-drift bound); :mod:`.pending` holds the
COO batches, :mod:`.magnitudes` the overflow guard."""

from __future__ import annotations

import math
import numbers
from typing import Any

from .._backend import check_floating, describe, floating_dtype, namespace
from .arrays import put, reference_output
from .drift import control_drift, raise_shifts, recompute_all, refresh_rows, shift_target
from .flush import apply_pending, fold_pending
from .magnitudes import Magnitudes
from .queries import fresh_row, key_rows, query_pending
from .state import State
from .tuning import UpdatePolicy
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
        threshold = self._check_count(where, "threshold", threshold)
        rebuild_every = self._check_count(where, "rebuild_every", rebuild_every)
        bounds = Magnitudes.of(xp, Qd, Kd, Vd, float(scale), float(xp.finfo(dtype).max))
        bounds.check(where, "Q, K, V and scale", n_k)

        self._st = State(
            xp, dtype, Qd, Kd, Vd, scale=float(scale), bounds=bounds, rebuild_every=rebuild_every
        )
        recompute_all(self._st)
        self._policy = UpdatePolicy(threshold, self.shape)

    # ----------------------------------------------------------------------------------------
    # public API
    # ----------------------------------------------------------------------------------------

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(n_q, n_k, d, d_v)``: queries, keys (after appends/removes), key and value dims."""
        st = self._st
        return (st.n_q, st.nk, st.d, st.d_v)

    @property
    def dtype(self) -> Any:
        """The floating dtype of the state and the outputs (that of the inputs)."""
        return self._st.dtype

    @property
    def pending(self) -> int:
        """Number of pending K and V entry updates (repeated entries counted as given)."""
        return self._st.pending

    @property
    def threshold(self) -> int:
        """Pending updates that trigger a flush: the fixed value, or the adaptive one now."""
        return self._policy.threshold

    @property
    def stats(self) -> dict[str, int]:
        """Counters (a copy): ``updates``, ``key_updates``, ``value_updates``,
        ``query_updates``, ``appends``, ``removes``, ``queries``, ``flushes``,
        ``columns_recomputed`` (columns of A recomputed by flushes), ``rows_refreshed`` (query
        rows recomputed to reset drift), ``rows_rescaled`` (per-row shifts raised) and
        ``rebuilds`` (full recomputes after construction).
        """
        out = dict(self._st.stats)
        out["updates"] = out["key_updates"] + out["value_updates"] + out["query_updates"]
        return out

    def update_key(self, i: int, j: int, delta: float) -> None:
        """``K[i, j] += delta``, deferred. Column i of A changes on the next flush."""
        where = "refattn.DynamicAttention.update_key"
        st = self._st
        r = check_index(where, "i", i, st.nk, f"K with {st.nk} rows")
        c = check_index(where, "j", j, st.d, f"K with {st.d} columns")
        v = scalar_delta(where, delta, st.max_abs)
        st.bounds.admit_key(where, st.nk, c, v)
        st.pk.add(r, c, v)
        if st.k_cache is not None:
            st.k_cache.add(st.xp, st.K, r, c, v)
        st.stats["key_updates"] += 1
        self._after_updates(1, 1)

    def update_value(self, i: int, j: int, delta: float) -> None:
        """``V[i, j] += delta``, deferred. Column j of AV changes by ``delta·A[:, i]``."""
        where = "refattn.DynamicAttention.update_value"
        st = self._st
        r = check_index(where, "i", i, st.nk, f"V with {st.nk} rows")
        c = check_index(where, "j", j, st.d_v, f"V with {st.d_v} columns")
        v = scalar_delta(where, delta, st.max_abs)
        st.bounds.admit_value(where, st.nk, c, v)
        st.pv.add(r, c, v)
        st.stats["value_updates"] += 1
        self._after_updates(1, 0)

    def update_keys(self, rows: Array, cols: Array, deltas: Array) -> None:
        """``K[rows[t], cols[t]] += deltas[t]`` for every t; repeated pairs accumulate.

        The batch is validated whole before anything changes.
        """
        where = "refattn.DynamicAttention.update_keys"
        st = self._st
        r, c, v = self._batch(where, rows, cols, deltas, st.d, "K")
        if not r:
            return
        st.bounds.admit(where, "deltas", st.nk, k=zip(c, v, strict=True))
        st.pk.extend(r, c, v)
        if st.k_cache is not None and len(r) <= 32:
            for row, col, val in zip(r, c, v, strict=True):
                st.k_cache.add(st.xp, st.K, row, col, val)
        else:
            st.k_cache = None
        st.stats["key_updates"] += len(r)
        self._after_updates(len(r), len(r))

    def update_values(self, rows: Array, cols: Array, deltas: Array) -> None:
        """``V[rows[t], cols[t]] += deltas[t]`` for every t; repeated pairs accumulate.

        The batch is validated whole before anything changes.
        """
        where = "refattn.DynamicAttention.update_values"
        st = self._st
        r, c, v = self._batch(where, rows, cols, deltas, st.d_v, "V")
        if not r:
            return
        st.bounds.admit(where, "deltas", st.nk, v=zip(c, v, strict=True))
        st.pv.extend(r, c, v)
        st.stats["value_updates"] += len(r)
        self._after_updates(len(r), 0)

    def update_query(self, i: int, j: int, delta: float) -> None:
        """``Q[i, j] += delta``, applied at once: row i of A is recomputed, ``O(n_k·(d+d_v))``."""
        where = "refattn.DynamicAttention.update_query"
        st = self._st
        r = check_index(where, "i", i, st.n_q, f"Q with {st.n_q} rows")
        c = check_index(where, "j", j, st.d, f"Q with {st.d} columns")
        v = scalar_delta(where, delta, st.max_abs)
        st.bounds.admit(where, "delta", st.nk, q=[(c, v)])
        st.Q[r, c] = st.Q[r, c] + v
        st.QT[c, r] = st.Q[r, c]
        refresh_rows(st, [r])
        st.stats["query_updates"] += 1

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
        st = self._st
        i = check_index(where, "i", i, st.n_q, f"the {st.n_q} query rows")
        j = check_index(where, "j", j, st.d_v, f"the {st.d_v} output columns")
        self._after_query()
        if not st.pk and not st.pv:
            return float(st.AVt[j, i] / st.D[i])
        return query_pending(st, i, j)

    def weights(self, i: int) -> Array:
        """Row i of ``D⁻¹A`` (shape ``(n_k,)``, sums to 1), pending K updates included.

        ``O(n_k + |J|·d)``; nothing is flushed.
        """
        where = "refattn.DynamicAttention.weights"
        st = self._st
        i = check_index(where, "i", i, st.n_q, f"the {st.n_q} query rows")
        xp = st.xp
        self._after_query()
        a = xp.asarray(st.At[: st.nk, i], copy=True)
        if st.pk:
            J, J_dev, KJ, _ = key_rows(st)
            s = st.scale * (KJ @ st.Q[i, :])
            m = xp.maximum(st.c[i], xp.max(s))
            a = a * xp.exp(st.c[i] - m)
            put(xp, a, J, J_dev, xp.exp(s - m), axis=0)
        total = xp.sum(a)
        if not bool(total >= st.tiny):
            return fresh_row(st, i)
        return a / total

    def output(self) -> Array:
        """The full ``(n_q, d_v)`` output ``D⁻¹AV``. Flushes pending updates first."""
        self.flush()
        return (self._st.AVt / self._st.D).T

    def flush(self) -> None:
        """Apply the pending K and V updates (see the class notes and ``docs/dynamic.md``)."""
        if self._st.pending:
            apply_pending(self._st, check_drift=True)

    def rebuild(self) -> None:
        """Apply pending updates and recompute everything: resets the shifts and the drift."""
        fold_pending(self._st)
        recompute_all(self._st)
        self._st.stats["rebuilds"] += 1

    def append(self, k_row: Array, v_row: Array) -> None:
        """Add a key/value token as row ``n_k`` of K and V; ``O(n_q·(d + d_v))`` amortized."""
        where = "refattn.DynamicAttention.append"
        st = self._st
        k = self._row_input(where, "k_row", k_row, st.d)
        v = self._row_input(where, "v_row", v_row, st.d_v)
        st.bounds.admit_rows(where, "k_row, v_row", st.nk + 1, k, v)
        xp, nk = st.xp, st.nk
        st.grow(nk + 1)
        s = st.scale * (st.Q @ k)
        raise_shifts(st, shift_target(st, s))
        a = xp.exp(s - st.c)
        st.K[nk, ...] = k
        st.V[nk, ...] = v
        st.At[nk, ...] = a
        st.D += a
        st.AVt += xp.reshape(v, (st.d_v, 1)) * xp.reshape(a, (1, st.n_q))
        st.drift += (2.0 * st.u) * (xp.abs(st.D) + a)
        st.nk = nk + 1
        st.stats["appends"] += 1
        control_drift(st)

    def remove(self, r: int) -> None:
        """Drop key/value row r; later rows move down by one (pending updates follow them).

        ``O(n_q·d_v)`` arithmetic plus moving the ``n_k - r - 1`` rows after it.
        """
        where = "refattn.DynamicAttention.remove"
        st = self._st
        r = check_index(where, "r", r, st.nk, f"K and V with {st.nk} rows")
        if st.nk == 1:
            raise ValueError(f"{where}: cannot remove the only key (softmax over no keys)")
        xp, nk = st.xp, st.nk
        a = xp.asarray(st.At[r, ...], copy=True)
        v = st.V[r, ...]
        st.D -= a
        st.AVt -= xp.reshape(v, (st.d_v, 1)) * xp.reshape(a, (1, st.n_q))
        st.drift += (2.0 * st.u) * (xp.abs(st.D) + 2.0 * a)
        for buf in (st.At, st.K, st.V):
            if r < nk - 1:
                buf[r : nk - 1, ...] = xp.asarray(buf[r + 1 : nk, ...], copy=True)
        st.nk = nk - 1
        st.pk.drop_row(r)
        st.pv.drop_row(r)
        st.key_err = {k - (k > r): e for k, e in st.key_err.items() if k != r}
        st.k_cache = None
        st.stats["removes"] += 1
        control_drift(st)

    def approximation_error(self) -> float:
        """Max relative error of the maintained output against a fresh float64 recompute.

        The pending updates are applied to a copy of the state (the same code as
        :meth:`flush`, without its drift control, so the measured drift is the state's own);
        ``self`` is not changed. The error is ``max_i max_j |out_ij - ref_ij| / max_j |ref_ij|``
        (relative per query row, in the infinity norm). ``O(n_q·n_k·(d + d_v))`` time and a
        copy of ``A``.
        """
        st = self._st.clone()
        xp = st.xp
        if st.pending:
            apply_pending(st, check_drift=False)
        got = xp.astype((st.AVt / st.D).T, xp.float64)
        nk = st.nk
        ref = reference_output(xp, st.Q, st.K[:nk, ...], st.V[:nk, ...], st.scale)
        err = xp.max(xp.abs(got - ref), axis=1)
        den = xp.max(xp.abs(ref), axis=1)
        den = xp.where(den > 0, den, xp.ones_like(den))
        return float(xp.max(err / den))

    # ----------------------------------------------------------------------------------------
    # the update policy
    # ----------------------------------------------------------------------------------------

    def _after_updates(self, count: int, key_count: int) -> None:
        """Tell the policy; flush when the pending updates reach its threshold."""
        self._policy.record_updates(count, key_count, self.shape)
        if self._st.pending >= self._policy.threshold:
            apply_pending(self._st, check_drift=True)

    def _after_query(self) -> None:
        self._st.stats["queries"] += 1
        self._policy.record_query(self.shape)

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
        nk = self._st.nk
        r = host_indices(where, "rows", rows, nk, f"{name} with {nk} rows")
        c = host_indices(where, "cols", cols, n_cols, f"{name} with {n_cols} columns")
        v = host_deltas(where, deltas, self._st.max_abs)
        if not len(r) == len(c) == len(v):
            raise ValueError(
                f"{where}: rows, cols and deltas must have the same length, got "
                f"{len(r)}, {len(c)} and {len(v)}"
            )
        return r, c, v

    def _row_input(self, where: str, name: str, x: Any, size: int) -> Array:
        xp, dtype_name = self._st.xp, self._st.dtype_name
        x = densify(x)
        if hasattr(x, "dtype"):
            if is_complex_or_bool(x.dtype) or "float" not in str(x.dtype):
                raise TypeError(
                    f"{where}: {name} must be real floating ({dtype_name}), got {describe(x)}"
                )
            if str(x.dtype).split(".")[-1] != dtype_name:
                raise TypeError(
                    f"{where}: {name} must have the state's dtype {dtype_name}, got {describe(x)}"
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
            arr = xp.asarray(x, dtype=self._st.dtype, device=self._st.device)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{where}: {name} must be a real vector, got {describe(x)}") from exc
        if arr.ndim == 2 and arr.shape[0] == 1:
            arr = xp.reshape(arr, (arr.shape[1],))
        if tuple(arr.shape) != (size,):
            raise ValueError(f"{where}: {name} must have shape ({size},), got {describe(x)}")
        if not bool(xp.all(xp.isfinite(arr))):
            raise ValueError(f"{where}: {name} must be finite, got NaN or inf entries")
        return xp.asarray(arr, copy=True)
