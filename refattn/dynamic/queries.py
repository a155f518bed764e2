"""Exact queries while updates are pending: one entry of the output corrected from the pending
batches in ``O(pending·d)``, or one row recomputed fresh, without a flush."""

from __future__ import annotations

import math
from typing import Any

from array_api_compat import is_cupy_namespace

from .arrays import put
from .pending import KeyRows
from .state import State
from .tuning import HOST_QUERY_TERMS
from .validation import host_input

Array = Any


def key_rows(st: State) -> tuple[list[int], Array, Array, dict[int, int]]:
    """Pending K rows J (host list and device index), their new values ``K[J] + ΔK[J]``
    (shape (|J|, d)) and ``row -> position in J``; kept current by later single updates."""
    if st.k_cache is None:
        J, J_dev, dK, _, _, _ = pending_key_rows(st)
        st.k_cache = KeyRows(J, J_dev, st.xp.take(st.K, J_dev, axis=0) + dK)
    return st.k_cache.view()


def pending_key_rows(st: State) -> tuple[list[int], Array, Array, Any, list[float], list[int]]:
    """The pending K batch summed into CSR over its touched rows J: ``(J, J_dev, ΔK[J]
    dense, ΔK[J] CSR, bound, nnz)``, with per row the number of entries and a bound on
    ``max_i |scale·<Q[i], ΔK[r]>|`` (from per-column bounds on |Q|)."""
    xp = st.xp
    pend = st.pk
    slot: dict[int, int] = {}
    inv = [slot.setdefault(r, len(slot)) for r in pend.rows]
    J = list(slot)
    bound = [0.0] * len(J)
    nnz = [0] * len(J)
    qmax, scale = st.qmax, abs(st.scale)
    for k, c, v in zip(inv, pend.cols, pend.vals, strict=True):
        bound[k] += scale * abs(v) * qmax[c]
        nnz[k] += 1
    M = coo(st, pend.vals, inv, pend.cols, (len(J), st.d)).tocsr()  # sums repeats
    dense = M.toarray()
    if not st.native_sparse:
        dense = xp.asarray(dense, device=st.device)
    return J, xp.asarray(J, dtype=xp.int64, device=st.device), dense, M, bound, nnz


def coo(st: State, vals: list[float], rows: list[int], cols: list[int], shape: tuple) -> Any:
    if is_cupy_namespace(st.xp):
        xp = st.xp
        vals = xp.asarray(vals, dtype=st.dtype)
        rows = xp.asarray(rows, dtype=xp.int32)
        cols = xp.asarray(cols, dtype=xp.int32)
    return st.sp.coo_matrix((vals, (rows, cols)), shape=shape, dtype=st.dtype_name)


def query_pending(st: State, i: int, j: int) -> float:
    """The exact correction of entry (i, j) for the pending updates (``DynamicAttention.query``).

    Few terms (at most ``HOST_QUERY_TERMS``): one gather of the O(|J| + |R|) numbers it
    needs, then scalar arithmetic on the host (``math.fsum``); the per-call overhead of
    array operations on tiny arrays would dominate otherwise. More terms: array operations.
    """
    n_terms = len(key_rows(st)[0]) if st.pk else 0
    entries = st.pv.by_col.get(j) if st.pv else None
    n_terms += len(entries) if entries else 0
    if n_terms <= HOST_QUERY_TERMS:
        return query_pending_host(st, i, j, entries)
    return query_pending_arrays(st, i, j)


def query_pending_host(st: State, i: int, j: int, entries: dict[int, float] | None) -> float:
    xp = st.xp
    parts = [xp.stack([st.D[i], st.AVt[j, i], st.c[i], st.drift[i]])]
    nJ = 0
    pos: dict[int, int] = {}
    if st.pk:
        J, J_dev, KJ, pos = key_rows(st)
        nJ = len(J)
        s = st.scale * (KJ @ st.Q[i, :])
        parts += [s, st.At[J_dev, i], st.V[J_dev, j]]
    R = list(entries) if entries else []
    if R:
        parts.append(st.At[xp.asarray(R, dtype=xp.int64, device=st.device), i])
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
    return checked(st, i, j, num, D, drift, spread, nJ + len(R))


def checked(
    st: State, i: int, j: int, num: float, D: float, drift: float, spread: float, n_terms: int
) -> float:
    """``num / D`` unless the first-order rounding bound of the corrections
    (``docs/dynamic.md``) is over tolerance or D underflowed: then row i from scratch."""
    err = drift + st.u * (2.0 * abs(D) + 2.0 * math.sqrt(n_terms) * (abs(D) + 2 * spread))
    if not (D >= st.tiny and err <= st.tol * D):
        return query_fresh(st, i, j)
    return num / D


def query_pending_arrays(st: State, i: int, j: int) -> float:
    xp = st.xp
    At = st.At  # A[i, r] = At[r, i]; gathers index it as At[rows, i]
    D_i = st.D[i]
    num = st.AVt[j, i]
    f = xp.ones_like(D_i)
    spread = xp.zeros_like(D_i)
    n_terms = 0
    dA = None
    pos: dict[int, int] = {}
    if st.pk:
        J, J_dev, KJ, pos = key_rows(st)
        s = st.scale * (KJ @ st.Q[i, :])
        c_i = st.c[i]
        m = xp.maximum(c_i, xp.max(s))
        f = xp.exp(c_i - m)
        new = xp.exp(s - m)
        old = f * At[J_dev, i]
        dA = new - old
        D_i = f * D_i + xp.sum(dA)
        num = f * num + xp.vecdot(st.V[J_dev, j], dA)
        spread = f * st.D[i]  # >= Σ_J old: the old entries are part of D
        n_terms = len(J)
    entries = st.pv.by_col.get(j) if st.pv else None
    if entries:
        R = list(entries)
        dv = xp.asarray(list(entries.values()), dtype=st.dtype, device=st.device)
        a = f * At[xp.asarray(R, dtype=xp.int64, device=st.device), i]
        hits = [(k, pos[r]) for k, r in enumerate(R) if r in pos]
        if hits:
            # rows with a pending K update too: their new A[i, r] is f·A[i, r] + δ_r
            ks, ps = (list(t) for t in zip(*hits, strict=True))
            idx = xp.asarray(ps, dtype=xp.int64, device=st.device)
            ks_dev = xp.asarray(ks, dtype=xp.int64, device=st.device)
            upd = xp.zeros(len(R), dtype=st.dtype, device=st.device)
            put(xp, upd, ks, ks_dev, xp.take(dA, idx), axis=0)
            a = a + upd
        num = num + xp.vecdot(dv, a)
        n_terms += len(R)
    # one transfer of the scalars: the value, and the inputs of the drift check
    vals = host_input(xp.stack([num, D_i, f * st.drift[i], spread])).tolist()
    numv, Dv, drift, spread_v = (float(x) for x in vals)
    return checked(st, i, j, numv, Dv, drift, spread_v, n_terms)


def fresh_row(st: State, i: int) -> Array:
    """Row i of the weights recomputed from scratch with the pending K updates applied,
    shape (n_k,). ``O(n_k·d)``: the fallback when a row's maintained sums are too inexact
    (D underflowed, or the drift bound is over tolerance)."""
    xp = st.xp
    K = xp.asarray(st.K[: st.nk, ...], copy=True)
    if st.pk:
        J, J_dev, KJ, _ = key_rows(st)
        put(xp, K, J, J_dev, KJ, axis=0)
    s = st.scale * (K @ st.Q[i, :])
    e = xp.exp(s - xp.max(s))
    return e / xp.sum(e)


def query_fresh(st: State, i: int, j: int) -> float:
    xp = st.xp
    w = fresh_row(st, i)
    v = xp.asarray(st.V[: st.nk, j], copy=True)
    entries = st.pv.by_col.get(j) if st.pv else None
    if entries:
        R = list(entries)
        R_dev = xp.asarray(R, dtype=xp.int64, device=st.device)
        dv = xp.asarray(list(entries.values()), dtype=st.dtype, device=st.device)
        put(xp, v, R, R_dev, xp.take(v, R_dev) + dv, axis=0)
    return float(xp.sum(w * v))
