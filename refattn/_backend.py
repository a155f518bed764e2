"""Backend dispatch: array namespaces, dtype checks, sparse modules, device-side helpers.

Every public function finds its namespace here, once, from its inputs::

    xp = namespace(q, k, v)

and passes it down as ``xp=``. Nothing below that line names ``numpy``. The namespace is the
array-api-compat wrapper for NumPy and CuPy, or the array library itself when it already follows
the standard (array-api-strict). ``scipy.sparse`` is not covered by the array API, so
:func:`sparse_module` picks ``scipy.sparse`` or ``cupyx.scipy.sparse`` from the namespace.

This module only dispatches; it does no work at import. The CPU performance runtime (the thread
pool, BLAS throttling, the split GEMM, per-thread work arrays) is :mod:`refattn._runtime`.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

import array_api_compat
from array_api_compat import array_namespace, is_cupy_namespace, is_numpy_namespace

__all__ = [
    "LOG2E",
    "all_true",
    "check_floating",
    "default_namespace",
    "describe",
    "device_of",
    "exp2_inplace",
    "exp_inplace",
    "floating_dtype",
    "is_cupy_namespace",
    "is_numpy_namespace",
    "is_sparse",
    "itemsize",
    "namespace",
    "real_number",
    "sparse_module",
]

Array = Any


def namespace(*arrays: Any) -> ModuleType:
    """The array namespace shared by ``arrays`` (``None`` entries are skipped).

    Raises TypeError when the arrays come from different libraries, or when none is given.
    """
    present = [a for a in arrays if a is not None]
    if not present:
        raise TypeError("refattn: no array was given to infer the array namespace from")
    try:
        return array_namespace(*present)
    except TypeError as exc:
        kinds = sorted({type(a).__module__ + "." + type(a).__name__ for a in present})
        raise TypeError(
            f"refattn: inputs must all come from one array library, got {', '.join(kinds)}"
        ) from exc


def default_namespace() -> ModuleType:
    """The NumPy namespace (array-api-compat's wrapper), for functions given no arrays."""
    import numpy

    return array_namespace(numpy.empty(0))


def describe(x: Any) -> str:
    """``"shape (2, 3) float32"`` for error messages."""
    shape = getattr(x, "shape", None)
    dtype = getattr(x, "dtype", None)
    if shape is None:
        return f"{type(x).__name__} {x!r}"
    return f"shape {tuple(shape)} {dtype}"


def check_floating(xp: ModuleType, name: str, x: Array) -> None:
    """TypeError unless ``x`` is float32 or float64, the dtypes refattn computes in.

    float16 and bfloat16 are rejected on purpose: a reference computed in them would carry their
    rounding. Kernels in those dtypes are compared against refattn's float64 results with the
    low-precision baselines of :mod:`refattn.testing` (inputs cast up first).
    """
    if x.dtype not in (xp.float32, xp.float64):
        raise TypeError(
            f"refattn: {name} must have a real floating dtype, float32 or float64, got "
            f"{x.dtype}; for float16 or bfloat16 kernels, cast the inputs up and compare with "
            "refattn.testing's low-precision baselines"
        )


def real_number(op: str, name: str, value: Any) -> float:
    """``value`` as a finite Python float, else an error naming ``name``.

    ``float()`` alone would take ``"1"`` and ``True``; a string or a bool where a number belongs
    is a caller's mistake, so both are a TypeError. The result is a Python float, so float32
    inputs stay float32 under NumPy 2's promotion rules.
    """
    if isinstance(value, (str, bytes, bool)):
        raise TypeError(f"refattn.{op}: {name} must be a real number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"refattn.{op}: {name} must be a real number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"refattn.{op}: {name} must be finite, got {value!r}")
    return number


def itemsize(xp: ModuleType, dtype: Any) -> int:
    """Bytes per element of a real floating ``dtype``, for memory budgets.

    Other dtypes count as 8: the callers reject them later, with an error naming the argument.
    """
    if not xp.isdtype(dtype, "real floating"):
        return 8
    return int(xp.finfo(dtype).bits) // 8


def floating_dtype(xp: ModuleType, name_to_array: dict[str, Array]) -> Any:
    """Check every array is real floating and share one dtype; return that dtype.

    refattn does not promote silently between float32 and float64: mixing them is a TypeError
    that names the arguments, so that a float32 kernel is never compared to a float64 result by
    accident.
    """
    dtypes: dict[str, Any] = {}
    for name, x in name_to_array.items():
        if x is None:
            continue
        check_floating(xp, name, x)
        dtypes[name] = x.dtype
    distinct = set(dtypes.values())
    if len(distinct) > 1:
        seen = ", ".join(f"{n}: {d}" for n, d in dtypes.items())
        raise TypeError(f"refattn: inputs must share one floating dtype, got {seen}")
    return next(iter(distinct))


def sparse_module(xp: ModuleType) -> ModuleType:
    """``scipy.sparse`` for NumPy-like namespaces, ``cupyx.scipy.sparse`` for CuPy."""
    if is_cupy_namespace(xp):
        import cupyx.scipy.sparse

        return cupyx.scipy.sparse
    import scipy.sparse

    return scipy.sparse


def is_sparse(x: Any) -> bool:
    """True for scipy.sparse and cupyx.scipy.sparse matrices and arrays."""
    import scipy.sparse

    if scipy.sparse.issparse(x):
        return True
    module = type(x).__module__
    if module.startswith("cupyx.scipy.sparse"):
        import cupyx.scipy.sparse

        return bool(cupyx.scipy.sparse.issparse(x))
    return False


def exp_inplace(xp: ModuleType, x: Array) -> Array:
    """``exp(x)``, overwriting ``x`` where the backend allows it (NumPy, CuPy).

    Only for arrays the caller owns. Saves one allocation and one memory pass over a score block.
    """
    if is_numpy_namespace(xp) or is_cupy_namespace(xp):
        return xp.exp(x, out=x)
    return xp.exp(x)


#: ``log2(e)``: ``exp(x) = exp2(LOG2E * x)``
LOG2E = 1.0 / math.log(2.0)


def exp2_inplace(xp: ModuleType, x: Array) -> Array:
    """``2**x``, overwriting ``x`` where the backend allows it (NumPy, CuPy).

    The tiled kernels take their weights as ``exp2(LOG2E * s)`` with ``LOG2E`` folded into a
    GEMM operand, as FlashAttention does on GPUs: NumPy's float32 ``exp2`` runs at twice the
    speed of its ``exp`` and is as accurate (within 1 ulp; docs/efficient.md has the figures).
    """
    if is_numpy_namespace(xp) or is_cupy_namespace(xp):
        return xp.exp2(x, out=x)
    return 2.0**x


def all_true(xp: ModuleType, x: Array) -> bool:
    """``bool(all(x))`` on the host.

    On CuPy the one-element result is fetched explicitly (``.get()``): a deliberate, documented
    synchronisation, allowed under ``cupy.cuda.transfer_guard("disallow")``.
    """
    result = xp.all(x)
    if is_cupy_namespace(xp):
        result = result.get()
    return bool(result)


def device_of(x: Array) -> Any:
    """The device ``x`` lives on (array-api-compat's ``device``)."""
    return array_api_compat.device(x)


def to_host(x: Any) -> Any:
    """A NumPy array of ``x`` from any backend, dtype kept: CuPy through ``.get()``, torch
    through ``.detach().cpu()``, others through DLPack, plain sequences through
    ``numpy.asarray``. (NumPy's own ``asarray`` refuses CuPy and would copy a torch tensor
    that requires grad only after an error.)"""
    import numpy as np

    if hasattr(x, "get"):  # CuPy
        x = x.get()
    if hasattr(x, "detach"):  # torch
        x = x.detach().cpu().numpy()
    try:
        return np.asarray(np.from_dlpack(x))
    except (TypeError, AttributeError, BufferError, RuntimeError):
        return np.asarray(x)


def host_float64(x: Any) -> Any:
    """A float64 NumPy copy of ``x`` from any backend (:func:`to_host`): for work that runs on
    the host (gradcheck's Jacobians, max-flow, figures)."""
    import numpy as np

    return np.asarray(to_host(x), dtype=np.float64)
