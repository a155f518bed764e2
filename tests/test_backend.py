"""The backend helpers: the pooled GEMM, the thread pool's nesting rule, work arrays, exp2."""

from __future__ import annotations

import os
import select
import signal
import threading

import numpy as np
import pytest

from refattn import _backend, _runtime
from refattn._backend import default_namespace
from refattn._runtime import matmul, parallel_map


@pytest.fixture
def two_threads(monkeypatch):
    """Force the split paths: two pool threads, and no size threshold."""
    monkeypatch.setattr(_runtime, "n_threads", lambda: 2)
    monkeypatch.setattr(_runtime, "_SPLIT_GEMM_MACS", 0)


@pytest.mark.parametrize(
    ("m", "k", "n"),
    [
        (37, 11, 5),  # more rows than columns: row blocks of a
        (5, 11, 37),  # more columns: column blocks of b, written into column slices of out
        (6, 41, 7),  # reduction-dominated (x^T dy): k split, partial products added
        (1, 3, 1),
    ],
)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_matmul_equals_the_product(two_threads, m, k, n, dtype):
    xp = default_namespace()
    rng = np.random.default_rng(0)
    a = rng.standard_normal((m, k)).astype(dtype)
    b = rng.standard_normal((k, n)).astype(dtype)
    out = matmul(xp, a, b)
    assert out.dtype == dtype and out.shape == (m, n)
    ref = a.astype(np.float64) @ b.astype(np.float64)
    tol = 1e-13 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(out, ref, rtol=tol, atol=tol * np.abs(ref).max())


def test_matmul_on_strided_views(two_threads):
    # the layers call it on transposed views (x^T dy, dy W^T)
    xp = default_namespace()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((30, 8))
    w = rng.standard_normal((9, 8))
    np.testing.assert_allclose(matmul(xp, x.T, x), x.T @ x, rtol=1e-13)
    np.testing.assert_allclose(matmul(xp, x, w.T), x @ w.T, rtol=1e-13)


def test_matmul_runs_on_the_pool_with_blas_at_one_thread(two_threads, monkeypatch):
    # the split products run on two threads (the caller and a pool thread), each with BLAS
    # held to one thread, so that the two GEMMs do not oversubscribe the cores
    from threadpoolctl import threadpool_info

    seen = []
    real = _runtime.parallel_map

    def spy(xp, fn, items):
        def record(item):
            blas = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]
            seen.append((threading.current_thread().name, blas))
            return fn(item)

        return real(xp, record, items)

    monkeypatch.setattr(_runtime, "parallel_map", spy)
    xp = default_namespace()
    a = np.ones((64, 4))
    matmul(xp, a, a.T)
    assert len(seen) == 2
    assert all(blas == [1] * len(blas) for _, blas in seen)


def test_nested_parallel_map_runs_serially(two_threads):
    # a pool thread calling parallel_map again must not wait on its own pool (deadlock)
    xp = default_namespace()

    def inner(i):
        return parallel_map(xp, lambda j: (threading.current_thread().name, i * 10 + j), [0, 1])

    results = parallel_map(xp, inner, [0, 1, 2, 3])
    flat = [r for part in results for r in part]
    assert [value for _, value in flat] == [0, 1, 10, 11, 20, 21, 30, 31]
    for part in results:  # the inner items ran on the thread that called parallel_map
        assert part[0][0] == part[1][0]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_parallel_map_works_in_a_forked_child(two_threads):
    # the parent's pool threads do not exist in a forked child (multiprocessing's "fork" start
    # method, DataLoader-style workers); a child using the parent's pool would wait forever
    xp = default_namespace()
    assert parallel_map(xp, lambda i: i * i, range(4)) == [0, 1, 4, 9]  # the pool now exists
    assert _runtime._POOL is not None
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report the result (or nothing, if it hangs) and leave at once
        try:
            os.close(read)
            os.write(write, repr(parallel_map(xp, lambda i: i + 1, range(4))).encode())
        finally:
            os._exit(0)
    os.close(write)
    ready = []
    try:
        ready, _, _ = select.select([read], [], [], 30.0)
        reply = os.read(read, 100).decode() if ready else "timeout"
    finally:
        os.close(read)
        if not ready:
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert reply == "[1, 2, 3, 4]"


def test_matmul_scratch_reuses_one_array_per_thread_and_slot():
    xp = default_namespace()
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((2, 5, 3)), rng.standard_normal((2, 3, 4))
    first = _runtime.matmul_scratch(xp, a, b, "test")
    np.testing.assert_allclose(first, a @ b, rtol=1e-14)
    second = _runtime.matmul_scratch(xp, a[:, :2], b, "test")  # smaller: same array
    np.testing.assert_allclose(second, a[:, :2] @ b, rtol=1e-14)
    assert np.shares_memory(first, second)
    other = _runtime.matmul_scratch(xp, a, b, "other-slot")
    assert not np.shares_memory(first, other)
    # broadcast batch axes, float32 stays float32
    a32 = rng.standard_normal((1, 5, 3)).astype(np.float32)
    out32 = _runtime.matmul_scratch(xp, a32, b.astype(np.float32), "test")
    assert out32.dtype == np.float32 and out32.shape == (2, 5, 4)
    np.testing.assert_allclose(out32, a32 @ b.astype(np.float32), rtol=1e-6)

    on_thread = []
    thread = threading.Thread(
        target=lambda: on_thread.append(_runtime.matmul_scratch(xp, a, b, "test"))
    )
    thread.start()
    thread.join()
    assert not np.shares_memory(on_thread[0], first)  # each thread has its own


def test_matmul_scratch_does_not_keep_large_arrays(monkeypatch):
    monkeypatch.setattr(_runtime, "_SCRATCH_BYTES", 100)
    xp = default_namespace()
    a = np.ones((4, 8))
    first = _runtime.matmul_scratch(xp, a, a.T, "big")  # 16 float64 = 128 bytes > 100
    second = _runtime.matmul_scratch(xp, a, a.T, "big")
    assert not np.shares_memory(first, second)
    np.testing.assert_array_equal(first, a @ a.T)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_exp2_inplace_is_exp_of_log2e_times_x(xp, dtype):
    # the tiled kernels' weights: exp(s) computed as exp2(LOG2E s), in place where possible
    rng = np.random.default_rng(3)
    s = np.concatenate([rng.uniform(-80.0, 0.0, 500), [0.0, -np.inf]]).astype(dtype)
    x = xp.asarray(s * dtype(_backend.LOG2E))
    out = _backend.exp2_inplace(xp, x)
    got = np.asarray(out)
    ref = np.exp(s.astype(np.float64))
    ulp = np.spacing(ref.astype(dtype)).astype(np.float64)
    # 1 ulp from exp2, plus the rounding of LOG2E s (relative eps, times |s| <= 80 in the exponent)
    assert np.all(np.abs(got - ref) <= ulp * (2 + 80 * np.log(2)))
    assert got[-1] == 0.0 and got[-2] == 1.0
    if _backend.is_numpy_namespace(xp):
        assert out is x  # overwritten, no new array


_MALLINFO_PROBE = """
import ctypes
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
import os, numpy, refattn
if os.environ["PROBE_CALL"] == "1":
    x = numpy.ones((1, 2, 4, 4))
    refattn.scaled_dot_product_attention(x, x, x)  # the first op call primes the allocator
before = libc.mallinfo2().hblks
block = libc.malloc(8 * 2**20)
print(libc.mallinfo2().hblks - before)  # 1 if the 8 MiB block is a fresh mapping
libc.free(block)
"""


def _mapped_blocks_after_import(prime: str, call: str = "1") -> int:
    import subprocess
    import sys

    env = {**os.environ, "REFATTN_MALLOC_PRIME": prime, "PROBE_CALL": call}
    out = subprocess.run(
        [sys.executable, "-c", _MALLINFO_PROBE], env=env, capture_output=True, text=True, check=True
    )
    return int(out.stdout.strip())


def test_first_op_call_raises_the_glibc_mmap_threshold():
    """After refattn's first op call, an 8 MiB temporary comes from the heap, not a mapping.

    The opt-out run shows that the probe can tell the two apart in this environment, and the
    run without an op call that ``import refattn`` itself changes nothing in the process.
    """
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc's malloc only")
    if not hasattr(ctypes.CDLL(None), "mallinfo2"):
        pytest.skip("mallinfo2 needs glibc >= 2.33")
    assert _mapped_blocks_after_import("0") == 1
    assert _mapped_blocks_after_import("1", call="0") == 1
    assert _mapped_blocks_after_import("1") == 0
