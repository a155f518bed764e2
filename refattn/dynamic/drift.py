"""Drift control: the per-row shifts that keep every stored exponent <= 0, and the rounding
drift bound of ``D`` and ``AV`` (rows over budget are recomputed, all rows past a fraction)."""

from __future__ import annotations

from typing import Any

from .._backend import exp_inplace
from .arrays import put
from .state import State
from .tuning import REFRESH_ALL_FRACTION, SHIFT_MARGIN
from .validation import host_input

Array = Any


def shift_target(st: State, smax: Array) -> Array:
    """The shifts that new maximum scores ``smax`` call for: ``smax + margin`` where they
    exceed the current shift, else the current shift."""
    return st.xp.where(smax > st.c, smax + SHIFT_MARGIN, st.c)


def raise_shifts(st: State, target: Array) -> Array | None:
    """Raise the shifts to ``target`` where it is higher, rescaling those rows.

    ``A[i, :]``, ``D_i`` and ``AV[i, :]`` are multiplied by ``f_i = exp(c_i - target_i) < 1``,
    so the stored ``exp(s - c_i)`` stays ``<= 1`` and never overflows. Returns ``f`` (ones
    where nothing changed), or None when no row was raised.
    """
    xp = st.xp
    mask = target > st.c
    if not bool(xp.any(mask)):
        return None
    nk = st.nk
    c_new = xp.where(mask, target, st.c)
    f_all = xp.exp(st.c - c_new)
    idx = xp.nonzero(mask)[0]
    count = int(idx.shape[0])
    if count > REFRESH_ALL_FRACTION * st.n_q * 2:
        st.At[:nk, ...] *= f_all
        st.AVt *= f_all
        st.D *= f_all
        st.drift *= f_all
    else:
        I = [int(v) for v in host_input(idx).tolist()]
        f = xp.take(f_all, idx)
        view = st.At[:nk, ...]
        put(xp, view, I, idx, xp.take(view, idx, axis=1) * f, axis=1)
        put(xp, st.AVt, I, idx, xp.take(st.AVt, idx, axis=1) * f, axis=1)
        put(xp, st.D, I, idx, xp.take(st.D, idx) * f, axis=0)
        put(xp, st.drift, I, idx, xp.take(st.drift, idx) * f, axis=0)
    st.drift += st.u * xp.where(mask, xp.abs(st.D), xp.zeros_like(st.D))
    st.c = c_new
    st.stats["rows_rescaled"] += count
    return f_all


def control_drift(st: State) -> None:
    """Recompute the query rows whose drift bound is over tolerance (or whose D underflowed);
    everything, when that is more than 1/8 of the rows."""
    xp = st.xp
    bad = ~(st.D >= st.tiny) | (st.drift > st.tol * st.D)
    if not bool(xp.any(bad)):
        return
    idx = xp.nonzero(bad)[0]
    if int(idx.shape[0]) > REFRESH_ALL_FRACTION * st.n_q:
        recompute_all(st)
        st.stats["rebuilds"] += 1
        return
    refresh_rows(st, [int(v) for v in host_input(idx).tolist()])


def refresh_rows(st: State, rows: list[int]) -> None:
    """Recompute query rows (columns of Aᵀ) from the committed K and V, fresh shifts."""
    xp = st.xp
    nk = st.nk
    idx = xp.asarray(rows, dtype=xp.int64, device=st.device)
    S = st.scale * (st.K[:nk, ...] @ xp.take(st.Q, idx, axis=0).T)  # (n_k, |I|)
    c = xp.max(S, axis=0) + SHIFT_MARGIN
    E = xp.exp(S - c)
    put(xp, st.At[:nk, ...], rows, idx, E, axis=1)
    put(xp, st.AVt, rows, idx, st.V[:nk, ...].T @ E, axis=1)
    put(xp, st.c, rows, idx, c, axis=0)
    put(xp, st.D, rows, idx, xp.sum(E, axis=0), axis=0)
    put(xp, st.drift, rows, idx, xp.zeros_like(c), axis=0)
    st.stats["rows_refreshed"] += len(rows)


def recompute_all(st: State) -> None:
    """Full recompute from the committed K and V: fresh shifts, zero drift."""
    xp = st.xp
    nk = st.nk
    K, V = st.K[:nk, ...], st.V[:nk, ...]
    S = st.scale * (K @ st.Q.T)  # (n_k, n_q): the layout of Aᵀ
    c = xp.max(S, axis=0) + SHIFT_MARGIN
    S -= c
    E = exp_inplace(xp, S)
    cap = st.K.shape[0]
    if cap == nk:
        st.At = E
    else:
        st.At = xp.zeros((cap, st.n_q), dtype=st.dtype, device=st.device)
        st.At[:nk, ...] = E
    st.c = c
    st.D = xp.sum(E, axis=0)
    st.AVt = V.T @ E
    st.drift = xp.zeros_like(c)
    st.key_err = {}
    st.flushes_since_rebuild = 0
