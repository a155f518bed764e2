"""Applying the pending batches: K first (new columns of A, multiplicatively or fresh), then V
(``AV += A'·ΔV`` with the new A), with work buffers reused across flushes."""

from __future__ import annotations

import math
from typing import Any

from .._backend import (
    exp_inplace,
)
from .arrays import fancy_setitem, put
from .tuning import FULL_RECOMPUTE_FRACTION, MULTIPLICATIVE_EXPONENT, SCRATCH_ROWS, SHIFT_MARGIN

Array = Any


class Flushing:
    """The flush of :class:`~refattn.dynamic.DynamicAttention` (a part of it)."""

    # ----------------------------------------------------------------------------------------
    # applying updates
    # ----------------------------------------------------------------------------------------

    def _apply_pending(self, *, control_drift: bool) -> None:
        """The flush. K first (new columns A[:, J]), then V (``AV += A'·ΔV`` with the new A)."""
        if self._pk:
            if len(set(self._pk.rows)) >= FULL_RECOMPUTE_FRACTION * self._nk:
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
                and bound[k] <= MULTIPLICATIVE_EXPONENT
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
                lift_to = xp.where(lifted, self._c + xp.log(safe) + SHIFT_MARGIN, self._c)
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
        put(xp, self._K, J, J_dev, KJ, axis=0)
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
        put(xp, self._At, rows, idx, new, axis=0)
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
        if not self._native_sparse or rows > SCRATCH_ROWS:
            return None
        buf = self._work.get(name)
        if buf is None or buf.shape[0] < rows or buf.shape[1] != cols:
            size = max(rows, 2 * buf.shape[0] if buf is not None else 0)
            shape = (min(size, SCRATCH_ROWS), cols)
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
        put(xp, self._AVt, C, C_dev, xp.take(self._AVt, C_dev, axis=0) + G, axis=0)
        self._add_entries(self._V, rows, cols, vals)
        per_col = math.sqrt(self._pv.max_per_column())
        self._drift += (2.0 * self._u * (1.0 + per_col)) * xp.abs(self._D)
        self._pv.clear()

    def _add_entries(self, M: Array, rows: list[int], cols: list[int], vals: list[float]) -> None:
        """``M[rows[t], cols[t]] += vals[t]`` for distinct ``(row, col)`` pairs, in place."""
        xp = self._xp
        if fancy_setitem(xp):
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
            put(xp, self._K, J, J_dev, KJ, axis=0)
            self._pk.clear()
            self._k_cache = None
        if self._pv:
            rows, _, cols, vals = self._pv.summed()
            self._add_entries(self._V, rows, cols, vals)
            self._pv.clear()

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
