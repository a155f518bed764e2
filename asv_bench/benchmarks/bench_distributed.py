"""refattn.distributed on a LocalCluster against the single-process tiled kernel, same run.

Causal SDPA forward + backward, one head, d = 64, float64. The cluster is
:func:`refattn.distributed.local_cluster` (2 single-threaded worker processes, the worker
environment refattn sets); the single-process kernel uses refattn's own 2 threads. Inputs live
on the workers before timing (persisted), as they would for a real run. The target (issue 21):
``track_overhead`` <= 1.3 at n = 32768.
"""

from __future__ import annotations

import statistics
import time

from .common import randn

D = 64


def _single(q, k, v, d_out):
    import refattn

    _, pullback = refattn.vjp(
        refattn.scaled_dot_product_attention, q, k, v, is_causal=True, implementation="tiled"
    )
    pullback(d_out)


class DistributedCausal:
    params = ([8192, 32768], [4096])
    param_names = ["n", "block"]
    timeout = 1200
    number = 1
    repeat = (1, 3, 60.0)

    def setup(self, n, block):
        try:
            import dask.array as da
            from distributed import Client

            from refattn.distributed import local_cluster
        except ImportError:
            raise NotImplementedError("dask/distributed are not installed") from None
        self.arrays = [randn((1, 1, n, D), offset=i) for i in range(4)]
        self.cluster = local_cluster(2, memory_limit="2GiB")
        self.client = Client(self.cluster)
        chunked = [da.from_array(x, chunks=(1, 1, block, D)) for x in self.arrays]
        self.chunked = self.client.persist(chunked)

    def teardown(self, n, block):
        self.client.close()
        self.cluster.close()

    def _distributed(self):
        import dask

        from refattn import distributed as rd

        q, k, v, d_out = self.chunked
        (o, lse), pullback = rd.vjp(q, k, v, is_causal=True)
        dask.compute(o, lse, *pullback(d_out), scheduler=self.client)

    def time_forward_backward(self, n, block):
        self._distributed()

    def track_overhead(self, n, block):
        """Median dask time / median single-process time, 3 samples each, alternated."""
        times: tuple[list[float], list[float]] = ([], [])
        for i in range(3):
            for j in (0, 1) if i % 2 == 0 else (1, 0):
                start = time.perf_counter()
                self._distributed() if j == 0 else _single(*self.arrays)
                times[j].append(time.perf_counter() - start)
        return statistics.median(times[0]) / statistics.median(times[1])

    track_overhead.unit = "ratio"
