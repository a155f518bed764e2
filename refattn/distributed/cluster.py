"""Workers for refattn's graphs: the environment they need, and a local cluster that has it.

A task of :mod:`refattn.distributed.attention` is one (query block, key block) pair of the tiled
kernel, which allocates and frees tile-sized temporaries (a few MiB) many times over. glibc
keeps such blocks for reuse only while its mmap threshold is dynamic, and Dask's nanny fixes
it for every worker: it sets ``MALLOC_TRIM_THRESHOLD_`` (to return memory to the system
eagerly), and setting any of glibc's thresholds turns the dynamic one off, so each temporary
above 128 KiB is mapped, page-faulted and unmapped again (:func:`refattn._runtime.prime_allocator`
explains the same effect in one process). :data:`WORKER_ENVIRONMENT` fixes the mmap threshold at
16 MiB instead, with the trim threshold twice that, the values glibc's own dynamic rule would
reach; docs/distributed.md has the measurement and how to set it on other clusters.
"""

from __future__ import annotations

from typing import Any

__all__ = ["WORKER_ENVIRONMENT", "local_cluster", "peak_memory"]

#: environment variables for Dask workers that run refattn tasks (see the module docstring)
WORKER_ENVIRONMENT = {
    "MALLOC_MMAP_THRESHOLD_": str(16 * 2**20),
    "MALLOC_TRIM_THRESHOLD_": str(32 * 2**20),
}


def local_cluster(
    n_workers: int = 2,
    *,
    memory_limit: str | int = "2GiB",
    **kwargs: Any,
) -> Any:
    """A ``distributed.LocalCluster`` of ``n_workers`` single-threaded worker *processes*.

    One thread per worker because each task runs refattn's kernels serially; parallelism is
    the cluster's. ``memory_limit`` is per worker (Dask pauses, then restarts, a worker above
    it). The scheduler's HTTP server (and with bokeh, the dashboard) takes a free port. Other
    keyword arguments go to ``LocalCluster``; the workers get :data:`WORKER_ENVIRONMENT`.
    """
    from distributed import LocalCluster

    env = {**WORKER_ENVIRONMENT, **kwargs.pop("env", {})}
    return LocalCluster(
        n_workers=n_workers,
        threads_per_worker=1,
        processes=True,
        memory_limit=memory_limit,
        env=env,
        **{"dashboard_address": ":0", **kwargs},
    )


def _peak_rss() -> int:
    """This process's peak resident memory in bytes (Linux reports KiB, macOS bytes)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def peak_memory(client: Any) -> dict[str, int]:
    """Peak resident memory of each worker process, in bytes, since it started."""
    return dict(client.run(_peak_rss))
