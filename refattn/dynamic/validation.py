"""Validation of the caller's update arguments (indices, deltas, rows), on host copies: the
pending batches live on the host, so only these small inputs go there."""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any

from .._backend import (
    describe,
    is_sparse,
)

Array = Any


def host_input(x: Any) -> Any:
    """A host NumPy array of the caller's small bookkeeping input (indices, deltas).

    The attention state itself never goes through here; only index lists and delta vectors do,
    because the pending COO batches live on the host.
    """
    import numpy

    if type(x).__module__.split(".")[0] == "cupy":
        return x.get()
    return numpy.asarray(x)


def is_complex_or_bool(dtype: Any) -> bool:
    name = str(dtype)
    return "complex" in name or "bool" in name


def scalar_delta(where: str, value: Any, max_abs: float) -> float:
    """A finite real scalar from ``value`` (Python or NumPy number, or a 0-d array)."""
    if isinstance(value, (bool, str, bytes)):
        raise TypeError(f"{where}: delta must be a real number, got {value!r}")
    if isinstance(value, numbers.Real):
        out = float(value)
    elif getattr(value, "shape", None) == () and not is_complex_or_bool(
        getattr(value, "dtype", "complex")
    ):
        out = float(value)
    else:
        raise TypeError(
            f"{where}: delta must be a real number or a 0-d real array, got {describe(value)}"
        )
    if not math.isfinite(out) or abs(out) > max_abs:
        raise ValueError(f"{where}: delta must be finite in the state's dtype, got {out!r}")
    return out


def check_index(where: str, name: str, value: Any, size: int, what: str) -> int:
    """``operator.index(value)``, checked to lie in ``[0, size)``."""
    if isinstance(value, bool):
        raise TypeError(f"{where}: {name} must be an integer, got {value!r}")
    try:
        k = operator.index(value)
    except TypeError:
        raise TypeError(f"{where}: {name} must be an integer, got {value!r}") from None
    if not 0 <= k < size:
        raise IndexError(
            f"{where}: {name}={k} is out of range for {what} (expected 0 <= {name} < {size})"
        )
    return k


def host_indices(where: str, name: str, values: Any, size: int, what: str) -> list[int]:
    """The caller's 1-D integer index array as a host list, every entry checked in range."""
    arr = host_input(values)
    if arr.ndim != 1:
        raise ValueError(f"{where}: {name} must be 1-D, got shape {tuple(arr.shape)}")
    if arr.size == 0:
        return []
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{where}: {name} must hold integers, got dtype {arr.dtype}")
    bad = (arr < 0) | (arr >= size)
    if bad.any():
        pos = int(bad.argmax())
        raise IndexError(
            f"{where}: {name}[{pos}]={int(arr[pos])} is out of range for {what} "
            f"(expected 0 <= {name} < {size})"
        )
    return [int(v) for v in arr.tolist()]


def host_deltas(where: str, values: Any, max_abs: float) -> list[float]:
    """The caller's 1-D real delta vector as a host list of finite floats."""
    arr = host_input(values)
    if arr.ndim != 1:
        raise ValueError(f"{where}: deltas must be 1-D, got shape {tuple(arr.shape)}")
    if arr.size == 0:
        return []
    if arr.dtype.kind not in "iuf":
        raise TypeError(f"{where}: deltas must be real numbers, got dtype {arr.dtype}")
    out = arr.astype("float64")
    bad = ~(abs(out) <= max_abs)  # catches nan, inf and values that overflow float32
    if bad.any():
        pos = int(bad.argmax())
        raise ValueError(
            f"{where}: deltas[{pos}]={float(out[pos])!r} is not finite in the state's dtype"
        )
    return out.tolist()


def densify(x: Any) -> Any:
    """Dense copy of a scipy.sparse / cupyx.scipy.sparse matrix; other inputs unchanged."""
    return x.toarray() if is_sparse(x) else x
