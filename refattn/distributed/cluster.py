"""A local cluster for refattn's graphs, and the workers' peak memory.

Nothing here is needed on other clusters: any Dask cluster runs the graphs. The one setting a
worker needs, glibc's mmap threshold (Dask's nanny fixes it low), the tasks make themselves
(:func:`refattn._runtime.fix_malloc_thresholds`), since Nanny's ``env`` is applied after the worker
process has started, too late for glibc, which reads ``MALLOC_*`` when the process starts.
"""

from __future__ import annotations

from typing import Any

__all__ = ["local_cluster", "peak_memory"]


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
    keyword arguments go to ``LocalCluster``.
    """
    from distributed import LocalCluster

    return LocalCluster(
        n_workers=n_workers,
        threads_per_worker=1,
        processes=True,
        memory_limit=memory_limit,
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
