"""Applying the pending batches: K first (new columns of A, multiplicatively or fresh), then V
(``AV += A'·ΔV`` with the new A), with work buffers reused across flushes."""

from __future__ import annotations

import math
from typing import Any

from .._backend import exp_inplace
from .arrays import fancy_setitem, put
from .drift import control_drift, raise_shifts, recompute_all, shift_target
from .queries import coo, key_rows, pending_key_rows
from .state import State
from .tuning import FULL_RECOMPUTE_FRACTION, MULTIPLICATIVE_EXPONENT, SCRATCH_ROWS, SHIFT_MARGIN

Array = Any


def apply_pending(st: State, *, check_drift: bool) -> None:
    """The flush. K first (new columns A[:, J]), then V (``AV += A'·ΔV`` with the new A)."""
    if st.pk:
        if len(set(st.pk.rows)) >= FULL_RECOMPUTE_FRACTION * st.nk:
            fold_pending(st)
            recompute_all(st)
            st.stats["flushes"] += 1
            st.stats["columns_recomputed"] += st.nk
            return
        apply_pending_keys(st)
    if st.pv:
        apply_pending_values(st)
    st.stats["flushes"] += 1
    st.flushes_since_rebuild += 1
    if not check_drift:
        return
    if st.rebuild_every is not None and st.flushes_since_rebuild >= st.rebuild_every:
        recompute_all(st)
        st.stats["rebuilds"] += 1
    else:
        control_drift(st)


def apply_pending_keys(st: State) -> None:
    """New columns ``A[:, J]`` for the pending K rows J; D and AV by the differences.

    A row with few pending entries is updated multiplicatively (``O(nnz·n_q)``)::

        A'[:, r] = A[:, r] ∘ exp(scale·Q·ΔK[r]ᵀ)      (ΔK[J] in CSR times row-major Qᵀ)

    the others are recomputed with one GEMM ``(|J|, d)·(d, n_q)``::

        A'[:, r] = exp(scale·Q·K'[r]ᵀ - c)

    Then ``ΔA = A' - A`` on those columns gives ``D += ΔA·1`` and ``AV += ΔA·V[J]``.
    """
    xp = st.xp
    J, J_dev, dK, M, bound, nnz = pending_key_rows(st)
    KJ = xp.take(st.K, J_dev, axis=0) + dK
    limit = max(1, st.d // 8)
    mult, fresh, increments = [], [], []
    for k, r in enumerate(J):
        inc = 2.0 + bound[k] * (nnz[k] + 1)  # rounding of exp and of its argument, in u
        if (
            nnz[k] <= limit
            and bound[k] <= MULTIPLICATIVE_EXPONENT
            and st.key_err.get(r, 0.0) + inc <= st.key_budget
        ):
            mult.append(k)
            increments.append(inc)
        else:
            fresh.append(k)
    S_fresh = N_mult = old_mult = None
    raise_to = st.c
    if fresh:
        f_dev = xp.asarray(fresh, dtype=xp.int64, device=st.device)
        S_fresh = st.scale * (xp.take(KJ, f_dev, axis=0) @ st.Q.T)
        raise_to = shift_target(st, xp.max(S_fresh, axis=0))
    if mult:
        m_rows = [J[k] for k in mult]
        m_dev = xp.asarray(m_rows, dtype=xp.int64, device=st.device)
        M_mult = M if len(mult) == len(J) else M[mult]
        N_mult = exp_inplace(xp, st.scale * spmm(st, M_mult, st.QT))
        old_mult = take_rows(st, st.At, m_rows, m_dev, "old_mult")
        N_mult *= old_mult
        top = xp.max(N_mult, axis=0)  # exp(new max score - c)
        lifted = top > 1.0
        if bool(xp.any(lifted)):
            safe = xp.where(lifted, top, xp.ones_like(top))
            lift_to = xp.where(lifted, st.c + xp.log(safe) + SHIFT_MARGIN, st.c)
            raise_to = xp.maximum(raise_to, lift_to)
    f = raise_shifts(st, raise_to)
    if f is not None and mult:
        N_mult *= f
        old_mult *= f
    if fresh:
        S_fresh -= st.c
        new = exp_inplace(xp, S_fresh)
        rows = [J[k] for k in fresh]
        commit_columns(st, rows, xp.asarray(rows, dtype=xp.int64), new, None)
        for r in rows:
            st.key_err.pop(r, None)
    if mult:
        commit_columns(st, m_rows, m_dev, N_mult, old_mult)
        for r, inc in zip(m_rows, increments, strict=True):
            st.key_err[r] = st.key_err.get(r, 0.0) + inc
    put(xp, st.K, J, J_dev, KJ, axis=0)
    st.stats["columns_recomputed"] += len(J)
    st.pk.clear()
    st.k_cache = None


def commit_columns(st: State, rows: list[int], idx: Array, new: Array, old: Array | None) -> None:
    """Write the new columns ``A[:, rows]`` (rows of Aᵀ) and add their differences to D and
    AV; ``new`` is overwritten with ``ΔA``. ``old`` defaults to the stored columns."""
    xp = st.xp
    idx = xp.asarray(idx, device=st.device)
    if old is None:
        old = take_rows(st, st.At, rows, idx, "old_fresh")
    put(xp, st.At, rows, idx, new, axis=0)
    spread = (2.0 * math.sqrt(len(rows))) * (xp.sum(old, axis=0) + xp.sum(new, axis=0))
    new -= old  # ΔA[:, rows]ᵀ
    st.D += xp.sum(new, axis=0)
    if len(rows) == 1:  # a rank-1 update: broadcasting beats a k = 1 GEMM by 3x
        st.AVt += xp.reshape(st.V[rows[0], ...], (st.d_v, 1)) * new
    else:
        VJt = xp.take(st.V, idx, axis=0).T
        out = scratch(st, "av", st.d_v, st.n_q)
        st.AVt += VJt @ new if out is None else xp.matmul(VJt, new, out=out)
    st.drift += st.u * (2.0 * xp.abs(st.D) + spread)


def scratch(st: State, name: str, rows: int, cols: int) -> Array | None:
    """A reusable C-contiguous ``(rows, cols)`` work buffer for ``out=`` (NumPy, CuPy), or
    None (other backends, or too large to keep). Reusing it avoids allocating, and faulting
    in, a fresh array of the size of ``|J|`` columns of A at every flush."""
    if not st.native_sparse or rows > SCRATCH_ROWS:
        return None
    buf = st.work.get(name)
    if buf is None or buf.shape[0] < rows or buf.shape[1] != cols:
        size = max(rows, 2 * buf.shape[0] if buf is not None else 0)
        shape = (min(size, SCRATCH_ROWS), cols)
        buf = st.xp.empty(shape, dtype=st.dtype, device=st.device)
        st.work[name] = buf
    return buf[:rows, ...]


def take_rows(st: State, A: Array, rows: list[int], idx: Array, name: str) -> Array:
    """``A[idx]`` (rows), into a work buffer where the backend allows."""
    out = scratch(st, name, len(rows), A.shape[1])
    if out is None:
        return st.xp.take(A, idx, axis=0)
    return st.xp.take(A, idx, axis=0, out=out)


def spmm(st: State, M: Any, X: Array) -> Array:
    """``M @ X`` for a sparse M (scipy / cupyx) and a dense X of the backend."""
    if st.native_sparse:
        return M @ X
    return st.xp.asarray(M.toarray(), device=st.device) @ X


def apply_pending_values(st: State) -> None:
    """``AV += A'·ΔV`` and ``V += ΔV``, touching only the value columns C that changed.

    The pending entries, summed per ``(row, col)``, form ``(ΔVᵀ)[C]``, a (|C|, n_k) CSR
    matrix: ``(ΔVᵀ)[C]·Aᵀ`` costs ``nnz(ΔV)·n_q`` and rewrites only |C| rows of ``AVᵀ``.
    """
    xp = st.xp
    rows, slots, cols, vals = st.pv.summed()
    C = list(st.pv.by_col)
    C_dev = xp.asarray(C, dtype=xp.int64, device=st.device)
    dVt = coo(st, vals, slots, rows, (len(C), st.nk)).tocsr()
    if st.native_sparse:
        G = dVt @ st.At[: st.nk, ...]
    else:  # array-api-strict (for checking): the touched rows of Aᵀ, densified product
        R = sorted(set(rows))
        R_dev = xp.asarray(R, dtype=xp.int64, device=st.device)
        dense = xp.asarray(dVt[:, R].toarray(), device=st.device)
        G = dense @ xp.take(st.At, R_dev, axis=0)
    put(xp, st.AVt, C, C_dev, xp.take(st.AVt, C_dev, axis=0) + G, axis=0)
    add_entries(st, st.V, rows, cols, vals)
    per_col = math.sqrt(st.pv.max_per_column())
    st.drift += (2.0 * st.u * (1.0 + per_col)) * xp.abs(st.D)
    st.pv.clear()


def add_entries(st: State, M: Array, rows: list[int], cols: list[int], vals: list[float]) -> None:
    """``M[rows[t], cols[t]] += vals[t]`` for distinct ``(row, col)`` pairs, in place."""
    xp = st.xp
    if fancy_setitem(xp):
        r = xp.asarray(rows, dtype=xp.int64, device=st.device)
        c = xp.asarray(cols, dtype=xp.int64, device=st.device)
        M[r, c] += xp.asarray(vals, dtype=st.dtype, device=st.device)
        return
    for r, c, v in zip(rows, cols, vals, strict=True):
        M[r, c] = M[r, c] + v


def fold_pending(st: State) -> None:
    """Add the pending batches into K and V (no change to A, D, AV)."""
    xp = st.xp
    if st.pk:
        J, J_dev, KJ, _ = key_rows(st)
        put(xp, st.K, J, J_dev, KJ, axis=0)
        st.pk.clear()
        st.k_cache = None
    if st.pv:
        rows, _, cols, vals = st.pv.summed()
        add_entries(st, st.V, rows, cols, vals)
        st.pv.clear()
