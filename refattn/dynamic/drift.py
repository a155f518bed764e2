"""Drift control: the per-row shifts that keep every stored exponent <= 0, and the rounding
drift bound of ``D`` and ``AV`` (rows over budget are recomputed, all rows past a fraction)."""

from __future__ import annotations

from typing import Any

from .._backend import (
    exp_inplace,
)
from .arrays import put
from .tuning import REFRESH_ALL_FRACTION, SHIFT_MARGIN
from .validation import host_input

Array = Any


class DriftControl:
    """Drift control of :class:`~refattn.dynamic.DynamicAttention` (a part of it)."""

    def _shift_target(self, smax: Array) -> Array:
        """The shifts that new maximum scores ``smax`` call for: ``smax + margin`` where they
        exceed the current shift, else the current shift."""
        return self._xp.where(smax > self._c, smax + SHIFT_MARGIN, self._c)

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
        if count > REFRESH_ALL_FRACTION * self._n_q * 2:
            self._At[:nk, ...] *= f_all
            self._AVt *= f_all
            self._D *= f_all
            self._drift *= f_all
        else:
            I = [int(v) for v in host_input(idx).tolist()]
            f = xp.take(f_all, idx)
            view = self._At[:nk, ...]
            put(xp, view, I, idx, xp.take(view, idx, axis=1) * f, axis=1)
            put(xp, self._AVt, I, idx, xp.take(self._AVt, idx, axis=1) * f, axis=1)
            put(xp, self._D, I, idx, xp.take(self._D, idx) * f, axis=0)
            put(xp, self._drift, I, idx, xp.take(self._drift, idx) * f, axis=0)
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
        if int(idx.shape[0]) > REFRESH_ALL_FRACTION * self._n_q:
            self._recompute_all()
            self._stats["rebuilds"] += 1
            return
        self._refresh_rows([int(v) for v in host_input(idx).tolist()])

    def _refresh_rows(self, rows: list[int]) -> None:
        """Recompute query rows (columns of Aᵀ) from the committed K and V, fresh shifts."""
        xp = self._xp
        nk = self._nk
        idx = xp.asarray(rows, dtype=xp.int64, device=self._device)
        S = self._scale * (self._K[:nk, ...] @ xp.take(self._Q, idx, axis=0).T)  # (n_k, |I|)
        c = xp.max(S, axis=0) + SHIFT_MARGIN
        E = xp.exp(S - c)
        put(xp, self._At[:nk, ...], rows, idx, E, axis=1)
        put(xp, self._AVt, rows, idx, self._V[:nk, ...].T @ E, axis=1)
        put(xp, self._c, rows, idx, c, axis=0)
        put(xp, self._D, rows, idx, xp.sum(E, axis=0), axis=0)
        put(xp, self._drift, rows, idx, xp.zeros_like(c), axis=0)
        self._stats["rows_refreshed"] += len(rows)

    def _recompute_all(self) -> None:
        """Full recompute from the committed K and V: fresh shifts, zero drift."""
        xp = self._xp
        nk = self._nk
        K, V = self._K[:nk, ...], self._V[:nk, ...]
        S = self._scale * (K @ self._Q.T)  # (n_k, n_q): the layout of Aᵀ
        c = xp.max(S, axis=0) + SHIFT_MARGIN
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
