"""Backend helpers of the dynamic state, and the direct formula it must equal."""

from __future__ import annotations

from typing import Any

from array_api_compat import is_cupy_namespace, is_numpy_namespace

Array = Any


# --------------------------------------------------------------------------------------------
# Backend helpers. Gathers use ``xp.take`` (in the standard); scatters use fancy setitem where
# the backend has it (NumPy, CuPy) and a row loop elsewhere (array-api-strict, for checking).
# --------------------------------------------------------------------------------------------


def fancy_setitem(xp: Any) -> bool:
    return is_numpy_namespace(xp) or is_cupy_namespace(xp)


def put(xp: Any, a: Array, idx: list[int], idx_dev: Array, values: Array, *, axis: int) -> None:
    """``a[idx] = values`` along ``axis`` (0 or 1), in place."""
    if fancy_setitem(xp):
        if axis == 0:
            a[idx_dev, ...] = values
        else:
            a[:, idx_dev] = values
        return
    for k, r in enumerate(idx):
        if axis == 0:
            a[r, ...] = values[k, ...] if values.ndim > 1 else values[k]
        else:
            a[:, r] = values[:, k]


def reference_output(xp: Any, Q: Array, K: Array, V: Array, scale: float) -> Array:
    """Fresh float64 ``softmax(scale·QKᵀ)V`` with the row maximum subtracted."""
    Q, K, V = (xp.astype(a, xp.float64) for a in (Q, K, V))
    S = scale * (Q @ K.T)
    S = S - xp.max(S, axis=1, keepdims=True)
    E = xp.exp(S)
    return (E @ V) / xp.sum(E, axis=1, keepdims=True)
