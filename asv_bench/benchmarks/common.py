"""Shared seeded data and backend helpers for the asv suites."""

from __future__ import annotations

import contextlib
import multiprocessing
import time

import numpy as np

SEED = 20261123


def rng(offset: int = 0) -> np.random.Generator:
    return np.random.default_rng(SEED + offset)


def namespace(backend: str):
    """The array namespace for ``backend`` ("numpy" or "cupy"); NotImplementedError skips."""
    from array_api_compat import array_namespace

    if backend == "numpy":
        return array_namespace(np.empty(0))
    if backend == "cupy":
        try:
            import cupy

            if cupy.cuda.runtime.getDeviceCount() < 1:
                raise NotImplementedError("no CUDA device")
        except Exception as exc:
            raise NotImplementedError(f"cupy unavailable: {exc}") from None
        return array_namespace(cupy.empty(0))
    raise NotImplementedError(backend)


def synchronize(xp) -> None:
    """Wait for the device (CuPy) so that timings include the work."""
    if "cupy" in getattr(xp, "__name__", ""):
        import cupy

        cupy.cuda.get_current_stream().synchronize()


def torch_or_skip():
    try:
        import torch
    except ImportError:
        raise NotImplementedError("torch is not installed") from None
    return torch


def randn(shape, dtype="float64", offset: int = 0) -> np.ndarray:
    return rng(offset).standard_normal(shape).astype(dtype)


def interleaved_ratio(
    make_a, make_b, *, min_pairs: int = 11, max_pairs: int = 61, budget_s: float = 20.0
) -> float:
    """Median time of ``a()`` / median time of ``b()``, sampled alternately in two processes.

    ``make_a()`` and ``make_b()`` build the two callables, each in its own forked worker
    process; this process asks them for samples in turn (ab, ba, ab, ...), so that both see
    the same machine load. On a shared machine the load moves by tens of percent within
    seconds, and asv times the parameter combinations of a ``time_`` benchmark one after
    the other, so that drift enters a ratio of two of them.

    Why separate processes, and calls before each timed one: in one process the two
    implementations change each other's ``malloc`` state (refattn in float64 took 1500 page
    faults per call after torch had run in its process, against 9 alone), and torch's OpenMP
    workers spin for several milliseconds after each call, taking the second core from the
    next call of the other (+2 ms on a 5 ms refattn call, measured). So a call shorter than
    50 ms is preceded by untimed calls of the same function for at least 20 ms: the other
    worker's threads have settled and the timed call finds its data in cache, as the
    back-to-back samples of a ``time_`` benchmark do. Pairs are taken until ``min_pairs``
    and ``budget_s`` are both reached, or ``max_pairs``.
    """
    ctx = multiprocessing.get_context("fork")
    workers = [_Worker(ctx, make) for make in (make_a, make_b)]
    times: tuple[list[float], list[float]] = ([], [])
    start = time.perf_counter()
    try:
        for i in range(max_pairs):
            for j in (0, 1) if i % 2 == 0 else (1, 0):
                times[j].append(workers[j].sample())
            if i + 1 >= min_pairs and time.perf_counter() - start >= budget_s:
                break
    finally:
        for worker in workers:
            worker.close()
    return float(np.median(times[0]) / np.median(times[1]))


class _Worker:
    """A forked process that builds ``make()`` and times one call of it per request.

    Forked rather than spawned: ``make`` may be a closure, and nothing is pickled.
    """

    def __init__(self, ctx, make):
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(make, child), daemon=True)
        self.process.start()
        child.close()

    def sample(self) -> float:
        self.conn.send(True)
        result = self.conn.recv()
        if isinstance(result, BaseException):
            raise result
        return result

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(None)
        self.process.join(timeout=60)
        if self.process.is_alive():
            self.process.kill()


def _serve(make, conn) -> None:
    try:
        fn = make()
        warm = True
        while conn.recv():
            if warm:
                settled = time.perf_counter() + 0.02
                fn()
                while time.perf_counter() < settled:
                    fn()
            t = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - t
            warm = elapsed < 0.05
            conn.send(elapsed)
    except BaseException as exc:  # report it to the parent rather than die silently
        conn.send(exc)
