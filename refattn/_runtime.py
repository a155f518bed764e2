"""The CPU runtime: refattn's thread pool, BLAS throttling, the split GEMM, work arrays.

NumPy releases the GIL inside ufuncs and BLAS, so independent blocks of an op (heads, query
blocks, tiles) can use every core from Python threads. This module owns those threads and keeps
BLAS to one thread per block while they run. It is used on NumPy only: every function here is a
plain serial call (or a plain ``a @ b``) for other backends, since CuPy already runs in parallel
on the device and array-api-strict is for checking, not speed.

Nothing runs at import. The first threaded call raises glibc's mmap threshold once
(:func:`prime_allocator`), so that an op's temporaries are reused rather than re-mapped.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from typing import Any, TypeVar

from ._backend import is_numpy_namespace, itemsize

__all__ = [
    "fix_malloc_thresholds",
    "matmul",
    "matmul_scratch",
    "n_threads",
    "parallel_map",
    "prime_allocator",
    "serial",
]

Array = Any
T = TypeVar("T")
R = TypeVar("R")


def n_threads() -> int:
    """Worker threads for :func:`parallel_map`: ``REFATTN_NUM_THREADS`` or the CPU count; 1
    inside a :func:`parallel_map` item or a :func:`serial` block (those run serially)."""
    if _in_pool():
        return 1
    env = os.environ.get("REFATTN_NUM_THREADS")
    if env:
        return max(1, int(env))
    return _cpu_count()


@functools.cache
def _cpu_count() -> int:
    """``os.cpu_count()``, read once: each call reads sysfs, and ops ask several times."""
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


#: block freed once by :func:`prime_allocator`
_MALLOC_PRIME_BYTES = 16 * 2**20


@functools.cache
def prime_allocator() -> bool:
    """Allocate and free one 16 MiB block, so that glibc keeps temporaries up to that size.

    glibc's ``malloc`` serves a request above its mmap threshold (128 KiB at start) with a
    fresh mapping, whose pages each fault on first touch, and returns it to the system on
    ``free``. The threshold rises only when such a mapped block is freed: to that block's size
    (up to 32 MiB), and the heap's trim threshold to twice that. Until a process has freed a
    block that large, every call of an op re-maps and re-faults its temporaries: thousands of
    page faults per SDPA call, which can double its time (docs/efficient.md has the figures).

    The effect is the one any program gets after freeing a 16 MiB array; the block is
    never touched, so it costs two system calls. It runs once per process, on the first call
    of :func:`parallel_map`, :func:`matmul` or :func:`matmul_scratch` with NumPy arrays (not at
    import: importing a library should not change the process). Nothing happens where the
    threshold is already higher or fixed (``mallopt``, ``MALLOC_MMAP_THRESHOLD_``), on other C
    libraries, or when the environment sets ``REFATTN_MALLOC_PRIME=0``. Returns whether the
    block was freed.
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


@functools.cache
def fix_malloc_thresholds() -> bool:
    """Fix glibc's mmap threshold at 16 MiB and trim threshold at 32 MiB in this process, once.

    For processes whose thresholds are fixed low, where :func:`prime_allocator` cannot help:
    Dask's nanny sets ``MALLOC_TRIM_THRESHOLD_=65536`` on every worker, and setting any glibc
    threshold turns the dynamic ones off, so each tile-sized temporary is mapped, page-faulted
    and unmapped again, and the heap is trimmed after almost every free (docs/distributed.md
    has the measurement). 16 and 32 MiB are where glibc's dynamic rule would take them after
    the priming block. Called by refattn.distributed's tasks; nothing happens where
    ``MALLOC_MMAP_THRESHOLD_`` is set, on other C libraries, or with ``REFATTN_MALLOC_PRIME=0``.
    Returns whether the thresholds were set.
    """
    if os.environ.get("REFATTN_MALLOC_PRIME", "1") == "0" or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.restype, mallopt.argtypes = ctypes.c_int, [ctypes.c_int, ctypes.c_int]
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    trim = mallopt(m_trim_threshold, 2 * _MALLOC_PRIME_BYTES)
    return bool(mallopt(m_mmap_threshold, _MALLOC_PRIME_BYTES) and trim)


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
    if is_numpy_namespace(xp):
        prime_allocator()
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


@contextlib.contextmanager
def serial() -> Iterator[None]:
    """Run refattn's kernels in this thread only, for the duration of the block.

    For callers that are themselves one of many parallel tasks (a Dask worker thread running
    a tile, say): the kernels then neither start threads nor split their work into lanes, so
    the cores are not oversubscribed and every result is bitwise reproducible (a lane's
    partial sums depend on which units it took).
    """
    before = _in_pool()
    _WORKING.active = True
    try:
        yield
    finally:
        _WORKING.active = before


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


#: products with fewer multiply-adds than this run as one BLAS call
_SPLIT_GEMM_MACS = 2**23


def matmul(xp: ModuleType, a: Array, b: Array) -> Array:
    """``a @ b`` for 2-D ``a (m, k)`` and ``b (k, n)``; on NumPy, split across the thread pool.

    Large products are cut into row blocks of ``a`` (column blocks of ``b`` when ``a`` has
    fewer rows than ``b`` has columns), one single-threaded BLAS call per thread, written into
    one output; a product dominated by its reduction (``k >= 2 max(m, n)``, e.g. a weight
    gradient ``x^T dy``) is split along ``k`` instead and the partial products added.

    This keeps refattn's BLAS work on its own pool: OpenBLAS's own worker threads spin for a
    while after each multi-threaded call, and attention kernels that run right after a layer's
    projections would compete with them for the cores. Other backends, and small products, get
    a plain ``a @ b``.
    """
    m, k = (int(s) for s in a.shape)
    n = int(b.shape[1])
    threads = n_threads()
    if not is_numpy_namespace(xp) or threads == 1 or m * k * n < _SPLIT_GEMM_MACS:
        return a @ b
    prime_allocator()
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
    the allocator has returned the memory to the system since the last call; a kept array
    costs none. Arrays of up to 16 MiB are kept, one per thread and slot, for the life of the
    thread. Other backends (CuPy has its own memory pool) get a plain ``a @ b``.
    """
    if not is_numpy_namespace(xp):
        return a @ b
    prime_allocator()
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
