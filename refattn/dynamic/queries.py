"""Exact queries while updates are pending: one entry of the output corrected from the pending
batches in ``O(pending·d)``, or one row recomputed fresh, without a flush."""

from __future__ import annotations

import math
from typing import Any

from array_api_compat import is_cupy_namespace

from .arrays import put
from .pending import KeyRows
from .tuning import HOST_QUERY_TERMS
from .validation import host_input

Array = Any


class QueryPaths:
    """The query paths of :class:`~refattn.dynamic.DynamicAttention` (a part of it)."""

    # ----------------------------------------------------------------------------------------
    # the exact corrections
    # ----------------------------------------------------------------------------------------

    def _key_rows(self) -> tuple[list[int], Array, Array, dict[int, int]]:
        """Pending K rows J (host list and device index), their new values ``K[J] + ΔK[J]``
        (shape (|J|, d)) and ``row -> position in J``; kept current by later single updates."""
        if self._k_cache is None:
            J, J_dev, dK, _, _, _ = self._pending_key_rows()
            self._k_cache = KeyRows(J, J_dev, self._xp.take(self._K, J_dev, axis=0) + dK)
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

        Few terms (at most ``HOST_QUERY_TERMS``): one gather of the O(|J| + |R|) numbers it
        needs, then scalar arithmetic on the host (``math.fsum``); the per-call overhead of
        array operations on tiny arrays would dominate otherwise. More terms: array operations.
        """
        n_terms = len(self._key_rows()[0]) if self._pk else 0
        entries = self._pv.by_col.get(j) if self._pv else None
        n_terms += len(entries) if entries else 0
        if n_terms <= HOST_QUERY_TERMS:
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
        host = [float(v) for v in host_input(xp.concat(parts)).tolist()]
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
                put(xp, upd, ks, ks_dev, xp.take(dA, idx), axis=0)
                a = a + upd
            num = num + xp.vecdot(dv, a)
            n_terms += len(R)
        # one transfer of the scalars: the value, and the inputs of the drift check
        vals = host_input(xp.stack([num, D_i, f * self._drift[i], spread])).tolist()
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
            put(xp, K, J, J_dev, KJ, axis=0)
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
            put(xp, v, R, R_dev, xp.take(v, R_dev) + dv, axis=0)
        return float(xp.sum(w * v))
