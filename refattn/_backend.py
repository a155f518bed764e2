"""Backend dispatch: array namespaces, dtype checks, sparse modules and the thread pool.

Every public function finds its namespace here, once, from its inputs::

    xp = namespace(q, k, v)

and passes it down as ``xp=``. Nothing below that line names ``numpy``. The namespace is the
array-api-compat wrapper for NumPy and CuPy, or the array library itself when it already follows
the standard (array-api-strict). ``scipy.sparse`` is not covered by the array API, so
:func:`sparse_module` picks ``scipy.sparse`` or ``cupyx.scipy.sparse`` from the namespace.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from typing import Any, TypeVar

import array_api_compat
from array_api_compat import array_namespace, is_cupy_namespace, is_numpy_namespace

__all__ = [
    "LOG2E",
    "all_true",
    "check_floating",
    "default_namespace",
    "describe",
    "exp2_inplace",
    "floating_dtype",
    "is_sparse",
    "itemsize",
    "matmul",
    "matmul_scratch",
    "n_threads",
    "namespace",
    "parallel_map",
    "sparse_module",
]

Array = Any
T = TypeVar("T")
R = TypeVar("R")


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
    """TypeError unless ``x`` has a real floating dtype."""
    if not xp.isdtype(x.dtype, "real floating"):
        raise TypeError(
            f"refattn: {name} must have a real floating dtype (float32 or float64), got {x.dtype}"
        )


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


def n_threads() -> int:
    """Worker threads for :func:`parallel_map`: ``REFATTN_NUM_THREADS`` or the CPU count."""
    env = os.environ.get("REFATTN_NUM_THREADS")
    if env:
        return max(1, int(env))
    return _cpu_count()


@functools.cache
def _cpu_count() -> int:
    """``os.cpu_count()``, read once: each call reads sysfs (13 us measured, several per op)."""
    return max(1, os.cpu_count() or 1)


_POOL: ThreadPoolExecutor | None = None
_THREAD_PREFIX = "refattn-pool"


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=n_threads(), thread_name_prefix=_THREAD_PREFIX)
    return _POOL


def _forget_pool_after_fork() -> None:
    """In a forked child, drop the parent's pool: its threads were not copied by ``fork``.

    Otherwise the child's executor still counts the parent's idle worker, queues work for
    it, and ``parallel_map`` waits forever (multiprocessing's "fork" start method, data
    loader workers). The child builds its own pool on first use.
    """
    global _POOL
    _POOL = None
    _WORKING.active = False


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_after_fork)


#: block freed once at import by :func:`_raise_malloc_mmap_threshold`
_MALLOC_PRIME_BYTES = 16 * 2**20


def _raise_malloc_mmap_threshold() -> bool:
    """Allocate and free one 16 MiB block, so that glibc keeps temporaries up to that size.

    glibc's ``malloc`` serves a request above its mmap threshold (128 KiB at start) with a
    fresh mapping, whose pages each fault on first touch, and returns it to the system on
    ``free``. The threshold rises only when such a mapped block is freed: to that block's size
    (up to 32 MiB), and the heap's trim threshold to twice that. Until a process has freed a
    block that large, every call of an op re-maps and re-faults its temporaries. Measured on
    the 2-core VM, in fresh processes: 1000 faults per float64 (8, 512, 64) forward +
    backward; 1300 per float32 (4, 512, 64) forward (4.85 ms, against 2.61 ms without them)
    and 3400 per forward + backward (12.3 ms against 7.0 ms). After this one free, at most 5
    per call for every benchmarked shape, at 1 and 2 threads (docs/efficient.md).

    The effect is the one any program gets after freeing a 16 MiB array; the block is
    never touched, so it costs two system calls. Nothing happens where the threshold is
    already higher or fixed (``mallopt``, ``MALLOC_MMAP_THRESHOLD_``), on other C
    libraries, or when the environment sets ``REFATTN_MALLOC_PRIME=0``. Returns whether
    the block was freed.
    """
    if os.environ.get("REFATTN_MALLOC_PRIME", "1") == "0":
        return False
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        libc.malloc.restype = ctypes.c_void_p
        libc.malloc.argtypes = [ctypes.c_size_t]
        libc.free.restype = None
        libc.free.argtypes = [ctypes.c_void_p]
    except (OSError, AttributeError):
        return False
    block = libc.malloc(_MALLOC_PRIME_BYTES)
    if not block:
        return False
    libc.free(block)
    return True


_raise_malloc_mmap_threshold()


def parallel_map(xp: ModuleType, fn: Callable[[T], R], items: Sequence[T] | Iterable[T]) -> list[R]:
    """``[fn(i) for i in items]``, run across CPU threads for NumPy.

    NumPy releases the GIL inside ufuncs and BLAS, so independent blocks of work (heads, query
    blocks) use both cores. While the blocks run, BLAS is limited to one thread per block
    (threadpoolctl), so that two blocks' GEMMs do not fight over the same cores. Other backends
    run serially: CuPy already runs in parallel on the device, and array-api-strict is for
    checking, not speed.

    The calling thread works too: it and up to ``n_threads() - 1`` pool threads take the items
    in order from a shared counter, so a call wakes one thread fewer (on a 2-core VM a sleeping
    thread's wake-up is a visible share of a millisecond-sized call). A call made while one of
    these threads is running an item runs serially, so nesting never waits on the pool.
    """
    items = list(items)
    if len(items) <= 1 or not is_numpy_namespace(xp) or n_threads() == 1 or _in_pool():
        return [fn(i) for i in items]
    controller = _blas_controller()
    if controller is None:  # threadpoolctl missing: let BLAS use the cores instead
        return [fn(i) for i in items]
    results: list[Any] = [None] * len(items)
    counter = itertools.count()  # next() on a count is atomic under the GIL

    def work() -> None:
        _WORKING.active = True
        try:
            for i in iter(lambda: next(counter), None):
                if i >= len(items):
                    return
                results[i] = fn(items[i])
        finally:
            _WORKING.active = False

    with controller.limit(limits=1, user_api="blas"):
        helpers = [_pool().submit(work) for _ in range(min(n_threads(), len(items)) - 1)]
        try:
            work()
        finally:
            for helper in helpers:  # wait for all before leaving (and re-raise their errors)
                helper.result()
    return results


_WORKING = threading.local()


def _in_pool() -> bool:
    """Whether this thread is running an item of :func:`parallel_map` (then nest serially)."""
    return getattr(_WORKING, "active", False)


_CONTROLLER: Any = None


def _blas_controller() -> Any:
    global _CONTROLLER
    if _CONTROLLER is None:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:
            _CONTROLLER = False
        else:
            _CONTROLLER = ThreadpoolController()
    return _CONTROLLER or None


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
    speed of its ``exp`` (float64: 1.15x), and stays within 1 ulp (measured: 0.99 ulp at most
    over 4M arguments in [-87, 0], against 2.4 ulp for ``exp``).
    """
    if is_numpy_namespace(xp) or is_cupy_namespace(xp):
        return xp.exp2(x, out=x)
    return 2.0**x


#: products with fewer multiply-adds than this run as one BLAS call
_SPLIT_GEMM_MACS = 2**23


def matmul(xp: ModuleType, a: Array, b: Array) -> Array:
    """``a @ b`` for 2-D ``a (m, k)`` and ``b (k, n)``; on NumPy, split across the thread pool.

    Large products are cut into row blocks of ``a`` (column blocks of ``b`` when ``a`` has
    fewer rows than ``b`` has columns), one single-threaded BLAS call per thread, written into
    one output; a product dominated by its reduction (``k >= 2 max(m, n)``, e.g. a weight
    gradient ``x^T dy``) is split along ``k`` instead and the partial products added.

    This keeps refattn's BLAS work on its own pool. OpenBLAS's worker threads spin for a while
    after each multi-threaded call; on 2 cores, attention kernels that ran right after a
    layer's projections were measured up to 1.6x slower while they spun. Other backends, and
    small products, get a plain ``a @ b``.
    """
    m, k = (int(s) for s in a.shape)
    n = int(b.shape[1])
    threads = n_threads()
    if not is_numpy_namespace(xp) or threads == 1 or m * k * n < _SPLIT_GEMM_MACS:
        return a @ b
    if k >= 2 * max(m, n):  # reduction-dominated (x^T dy): split k and add the partial products
        step = -(-k // threads)
        parts = parallel_map(
            xp, lambda i: a[:, i : i + step] @ b[i : i + step, :], range(0, k, step)
        )
        for part in parts[1:]:
            parts[0] += part
        return parts[0]
    out = xp.empty((m, n), dtype=xp.result_type(a, b))
    if m >= n:
        step = -(-m // threads)
        parts = [(a[i : i + step, :], b, out[i : i + step, :]) for i in range(0, m, step)]
    else:
        step = -(-n // threads)
        parts = [(a, b[:, j : j + step], out[:, j : j + step]) for j in range(0, n, step)]
    parallel_map(xp, lambda part: xp.matmul(part[0], part[1], out=part[2]), parts)
    return out


_SCRATCH = threading.local()
#: largest work array :func:`matmul_scratch` keeps per thread and slot
_SCRATCH_BYTES = 16 * 2**20


def matmul_scratch(xp: ModuleType, a: Array, b: Array, slot: str) -> Array:
    """``a @ b`` written into this thread's reusable work array ``slot`` (NumPy).

    For temporaries only: the result is overwritten by the thread's next call with the same
    ``slot``. A tile computed into a fresh array costs one page fault per 4 KiB page whenever
    the allocator has returned the memory to the system since the last call (measured on the
    2-core VM: about 1200 faults, 3 to 4 ms, per 8-head 512 x 512 float32 forward); a kept
    array costs none. Arrays of up to 16 MiB are kept, one per thread and slot, for the life of
    the thread. Other backends (CuPy has its own memory pool) get a plain ``a @ b``.
    """
    if not is_numpy_namespace(xp):
        return a @ b
    lead = _broadcast(tuple(a.shape[:-2]), tuple(b.shape[:-2]))
    shape = (*lead, int(a.shape[-2]), int(b.shape[-1]))
    dtype = xp.result_type(a, b)
    size = math.prod(shape)
    if size * itemsize(xp, dtype) > _SCRATCH_BYTES:
        return a @ b
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    buf = buffers.get((slot, dtype))
    if buf is None or buf.shape[0] < size:
        buf = buffers[(slot, dtype)] = xp.empty((size,), dtype=dtype)
    return xp.matmul(a, b, out=xp.reshape(buf[:size], shape))


def _broadcast(x: tuple[int, ...], y: tuple[int, ...]) -> tuple[int, ...]:
    """Broadcast shape of two batch shapes (both valid for ``matmul``)."""
    n = max(len(x), len(y))
    x, y = (1,) * (n - len(x)) + x, (1,) * (n - len(y)) + y
    return tuple(max(int(i), int(j)) if min(i, j) != 0 else 0 for i, j in zip(x, y, strict=True))


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
