"""DLPack interop: pass torch tensors, JAX arrays and CuPy arrays to refattn without copying.

refattn's ops take NumPy arrays (CPU) or CuPy arrays (GPU). Arrays from other libraries speak
DLPack, the standard protocol for sharing a buffer between libraries, so they can be *viewed* as
NumPy/CuPy arrays: no data is copied and the view sees the same memory::

    import torch, refattn
    from refattn.interop.dlpack import from_dlpack, to_framework

    q = torch.randn(2, 4, 128, 64, dtype=torch.float64)
    k, v = torch.randn_like(q), torch.randn_like(q)
    out = refattn.scaled_dot_product_attention(from_dlpack(q), from_dlpack(k), from_dlpack(v))
    out_t = to_framework(out, "torch")          # a torch tensor sharing out's memory

What is zero-copy and what is not:

* torch CPU tensors -> NumPy: a view (``numpy.shares_memory`` is True). Tensors that require
  grad are detached first (also a view). bfloat16 tensors, which DLPack consumers like NumPy do
  not accept, are reinterpreted bit for bit through int16 and viewed as ``ml_dtypes.bfloat16``:
  still a view.
* torch CUDA tensors / JAX GPU arrays -> CuPy: a view on the same device.
* JAX CPU arrays -> NumPy: a read-only view (JAX arrays are immutable; refattn never writes its
  inputs).
* NumPy -> torch (:func:`to_framework`): a view. NumPy -> JAX: JAX may copy (it needs aligned
  buffers). NumPy bfloat16 -> torch goes through the same int16 reinterpretation, as a view.
  Read-only NumPy arrays (views of JAX arrays) cannot be exported through older DLPack
  versions and are copied.
* Device changes (a CUDA tensor asked for as NumPy) always copy, and only with ``copy=True``.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

__all__ = ["as_array", "from_dlpack", "is_dlpack_producer", "to_framework"]

Array = Any

#: DLPack device types (``__dlpack_device__()[0]``)
_CPU_DEVICES = {1, 3}  # kDLCPU, kDLCUDAHost (pinned host memory)
_CUDA_DEVICES = {2, 13, 10}  # kDLCUDA, kDLCUDAManaged, kDLROCM

FRAMEWORKS = ("numpy", "cupy", "torch", "jax")


def is_dlpack_producer(x: Any) -> bool:
    """True when ``x`` implements the DLPack protocol (``__dlpack__`` and ``__dlpack_device__``)."""
    return hasattr(x, "__dlpack__") and hasattr(x, "__dlpack_device__")


def _device_type(x: Any) -> int:
    return int(x.__dlpack_device__()[0])


def _library(x: Any) -> str:
    return type(x).__module__.split(".", 1)[0]


def _numpy_namespace() -> ModuleType:
    from .._backend import default_namespace

    return default_namespace()


def _cupy_namespace() -> ModuleType:
    try:
        import cupy
    except ImportError:
        raise TypeError(
            "refattn.interop.dlpack: the array lives on a CUDA device, so refattn needs CuPy to "
            "view it (pip install 'refattn[gpu]'), or pass copy=True with xp=<the NumPy "
            "namespace> to copy it to the host"
        ) from None
    from array_api_compat import array_namespace

    return array_namespace(cupy.empty(0))


def _torch_bfloat16(x: Any) -> bool:
    return _library(x) == "torch" and str(x.dtype) == "torch.bfloat16"


def _numpy_bfloat16(x: Any) -> bool:
    return _library(x) == "numpy" and getattr(getattr(x, "dtype", None), "name", "") == "bfloat16"


def _prepare_torch(x: Any) -> Any:
    """Detach (a view) and resolve lazy conjugation/negation bits, which DLPack cannot export."""
    if getattr(x, "requires_grad", False):
        x = x.detach()
    if hasattr(x, "is_conj") and x.is_conj():
        x = x.resolve_conj()
    if hasattr(x, "is_neg") and x.is_neg():
        x = x.resolve_neg()
    return x


def from_dlpack(x: Any, *, xp: ModuleType | None = None, copy: bool | None = None) -> Array:
    """View a DLPack-speaking array (torch, JAX, CuPy, NumPy, ...) as an array refattn takes.

    Parameters
    ----------
    x : object with ``__dlpack__``
        A torch tensor, JAX array, CuPy array, NumPy array, ...
    xp : array namespace, optional
        Where the result lives. By default NumPy for CPU data and CuPy for CUDA/ROCm data.
    copy : bool, optional
        ``None`` (default): share memory when possible, copy only if the consumer must.
        ``False``: never copy (BufferError/TypeError if impossible). ``True``: always copy.

    Returns
    -------
    An array of ``xp`` (NumPy's ``ndarray`` for the default CPU case) with ``x``'s shape, dtype and
    values, sharing ``x``'s memory unless a copy was needed or asked for.
    """
    if not is_dlpack_producer(x):
        raise TypeError(
            "refattn.interop.dlpack.from_dlpack: expected an object implementing DLPack "
            f"(__dlpack__, __dlpack_device__), got {type(x).__module__}.{type(x).__name__}"
        )
    if _library(x) == "torch":
        x = _prepare_torch(x)
    device_type = _device_type(x)
    if xp is None:
        if device_type in _CUDA_DEVICES:
            xp = _cupy_namespace()
        elif device_type in _CPU_DEVICES:
            xp = _numpy_namespace()
        else:
            raise TypeError(
                f"refattn.interop.dlpack.from_dlpack: unsupported DLPack device type "
                f"{device_type}; refattn runs on CPU (NumPy) and CUDA (CuPy) arrays"
            )
    from array_api_compat import is_numpy_namespace

    if _torch_bfloat16(x):
        return _torch_bfloat16_to(x, xp, copy)
    if is_numpy_namespace(xp) and device_type not in _CPU_DEVICES:
        if not copy:
            raise BufferError(
                "refattn.interop.dlpack.from_dlpack: the array is on a device (DLPack device "
                f"type {device_type}); viewing it as NumPy is impossible, pass copy=True to copy "
                "it to the host"
            )
        return _copy_to_host(x)
    if copy is None:
        return xp.from_dlpack(x)
    return xp.from_dlpack(x, copy=copy)


def _copy_to_host(x: Any) -> Array:
    import numpy

    if _library(x) == "torch":
        return x.cpu().numpy()
    if _library(x) == "cupy":
        return x.get()
    try:
        return numpy.from_dlpack(x, device="cpu", copy=True)
    except (BufferError, TypeError, ValueError, NotImplementedError):
        return numpy.asarray(x)  # e.g. JAX device arrays: a host transfer


def _torch_bfloat16_to(x: Any, xp: ModuleType, copy: bool | None) -> Array:
    """torch bfloat16 -> NumPy (ml_dtypes) / CuPy: share the bits through an int16 view."""
    import torch
    from array_api_compat import is_numpy_namespace

    if not is_numpy_namespace(xp):
        raise TypeError(
            "refattn.interop.dlpack.from_dlpack: bfloat16 arrays can only be viewed as NumPy "
            f"arrays (through ml_dtypes), not as {xp.__name__} arrays"
        )
    import ml_dtypes

    bits = x.view(torch.int16)
    if _device_type(bits) not in _CPU_DEVICES:
        if not copy:
            raise BufferError(
                "refattn.interop.dlpack.from_dlpack: a device bfloat16 tensor cannot be viewed "
                "as NumPy; pass copy=True"
            )
        bits = bits.cpu()
    import numpy

    host = numpy.from_dlpack(bits)
    if copy:
        host = host.copy()
    return host.view(ml_dtypes.bfloat16)


def as_array(x: Any, xp: ModuleType | None = None) -> Array:
    """``x`` as an array refattn's ops accept, without copying where possible.

    * An array already of ``xp`` (or, with ``xp=None``, a NumPy, CuPy or array-api-strict array)
      is returned as is.
    * Anything speaking DLPack (torch, JAX, ...) goes through :func:`from_dlpack`.
    * Anything else (lists, scalars) goes through ``xp.asarray`` (NumPy by default).
    """
    from array_api_compat import array_namespace, is_array_api_obj

    library = _library(x)
    if is_array_api_obj(x) and library in ("numpy", "cupy", "array_api_strict"):
        if xp is None or array_namespace(x) is xp:
            return x
    if is_dlpack_producer(x) and not (library == "numpy" and xp is None):
        return from_dlpack(x, xp=xp)
    xp = _numpy_namespace() if xp is None else xp
    return xp.asarray(x)


def to_framework(x: Array, framework: str, *, device: Any = None) -> Any:
    """Hand a refattn result to ``framework`` ("torch", "jax", "numpy", "cupy") through DLPack.

    The result shares ``x``'s memory where the consumer allows it (torch and NumPy do; JAX may
    copy for alignment). ``device`` (torch/JAX) moves the result afterwards, which copies.
    NumPy bfloat16 arrays (ml_dtypes) become torch bfloat16 tensors through an int16 view.
    """
    if framework not in FRAMEWORKS:
        raise ValueError(
            f"refattn.interop.dlpack.to_framework: framework must be one of "
            f"{', '.join(FRAMEWORKS)}, got {framework!r}"
        )
    if framework == "torch":
        import numpy
        import torch

        bits = x.view(numpy.int16) if _numpy_bfloat16(x) else x
        try:
            result = torch.from_dlpack(bits)
        except BufferError:  # e.g. a read-only NumPy array (older DLPack cannot flag it): copy
            result = torch.from_dlpack(numpy.array(bits))
        if _numpy_bfloat16(x):
            result = result.view(torch.bfloat16)
        return result if device is None else result.to(device)
    if framework == "jax":
        import jax
        import jax.numpy as jnp

        try:
            result = jnp.asarray(x) if _numpy_bfloat16(x) else jnp.from_dlpack(x)
        except BufferError:  # a read-only NumPy array: JAX copies it
            result = jnp.asarray(x)
        return result if device is None else jax.device_put(result, device)
    if framework == "cupy":
        return from_dlpack(x, xp=_cupy_namespace())
    return from_dlpack(x, xp=_numpy_namespace()) if is_dlpack_producer(x) else as_array(x)
