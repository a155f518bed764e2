"""DynamicAttention (issue 5) at n = 4096, d = 64, float64, against a full recompute.

The full recompute, ``softmax(QKᵀ)V`` from scratch, is timed in the same suite
(``DynamicUpdates.time_full_recompute``), so every ratio comes from one run:

* single K-entry update, amortized: ``time_key_updates / KEY_BLOCK`` (target ≥ 500x faster);
* single V-entry update, amortized: ``time_value_updates / VALUE_BLOCK`` (target ≥ 10,000x);
* a batch of 64 K entries, per update: ``time_key_batch_64 / 64`` (target ≥ 3,000x);
* ``query`` with 100 updates pending: ``time_query_100_pending`` (target ≤ 1/1000).

``DynamicSpeedups.track_*`` report those ratios directly, measured inside one process with
``time.perf_counter`` (medians). ``DynamicStreams`` runs update-heavy, mixed and query-heavy
streams under fixed thresholds and the adaptive one (target: adaptive within 1.2x of the best
fixed threshold); ``DynamicDemo`` runs ``refattn dynamic`` end to end.
"""

from __future__ import annotations

import contextlib
import io
import time

import numpy as np

from .common import namespace, rng, synchronize

N, D = 4096, 64
KEY_BLOCK = 256  # single K updates per timed call (then one flush)
VALUE_BLOCK = 1024  # single V updates per timed call (then one flush)
BATCH = 64


def _inputs(backend: str, n: int = N, d: int = D):
    xp = namespace(backend)
    g = rng(5)
    Q, K, V = (xp.asarray(g.random((n, d))) for _ in range(3))
    return xp, Q, K, V


def _full_recompute(xp, Q, K, V):
    S = Q @ K.T
    S = S - xp.max(S, axis=1, keepdims=True)
    E = xp.exp(S)
    return (E @ V) / xp.sum(E, axis=1, keepdims=True)


def _updates(count: int, width: int, seed: int):
    g = rng(seed)
    rows = g.integers(0, N, count).tolist()
    cols = g.integers(0, width, count).tolist()
    deltas = (0.01 * g.standard_normal(count)).tolist()
    return list(zip(rows, cols, deltas, strict=True))


def _median_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


class DynamicUpdates:
    """Timings of single and batched updates, queries and the full recompute."""

    params = (["numpy", "cupy"],)
    param_names = ["backend"]
    number = 1
    repeat = (3, 10, 20.0)
    timeout = 300

    def setup(self, backend):
        from refattn.dynamic import DynamicAttention

        self.xp, self.Q, self.K, self.V = _inputs(backend)
        self.att = DynamicAttention(self.Q, self.K, self.V)
        self.key_block = _updates(KEY_BLOCK, D, 1)
        self.value_block = _updates(VALUE_BLOCK, D, 2)
        # The timed calls measure a stream in its steady state: one block of each kind first,
        # so that the first flush's one-off costs (allocating and faulting in the work
        # buffers, the tuner's first estimates) are not what every sample measures
        # (number = 1: each sample is the first call after a setup).
        self.time_key_updates(backend)
        self.time_value_updates(backend)
        g = rng(3)
        self.batch = (g.integers(0, N, BATCH), g.integers(0, D, BATCH), 0.01 * g.random(BATCH))
        rows, cols = g.integers(0, N, 64).tolist(), g.integers(0, D, 64).tolist()
        self.points = list(zip(rows, cols, strict=True))
        self.pending = DynamicAttention(self.Q, self.K, self.V, threshold=10**9)
        for r, c, x in _updates(50, D, 4):
            self.pending.update_key(r, c, x)
        for r, c, x in _updates(50, D, 5):
            self.pending.update_value(r, c, x)
        self.pending.query(0, 0)
        self.k = 0
        synchronize(self.xp)

    def time_full_recompute(self, backend):
        _full_recompute(self.xp, self.Q, self.K, self.V)
        synchronize(self.xp)

    def time_construct(self, backend):
        from refattn.dynamic import DynamicAttention

        DynamicAttention(self.Q, self.K, self.V)
        synchronize(self.xp)

    def time_key_updates(self, backend):
        """KEY_BLOCK single K-entry updates, then a flush (adaptive threshold)."""
        update = self.att.update_key
        for r, c, x in self.key_block:
            update(r, c, x)
        self.att.flush()
        synchronize(self.xp)

    def time_value_updates(self, backend):
        """VALUE_BLOCK single V-entry updates, then a flush (adaptive threshold)."""
        update = self.att.update_value
        for r, c, x in self.value_block:
            update(r, c, x)
        self.att.flush()
        synchronize(self.xp)

    def time_key_update_flushed(self, backend):
        """One K-entry update flushed at once (threshold 1): the unamortized worst case."""
        r, c, x = self.key_block[self.k % KEY_BLOCK]
        self.k += 1
        self.att.update_key(r, c, x)
        self.att.flush()
        synchronize(self.xp)

    def time_key_batch_64(self, backend):
        self.att.update_keys(*self.batch)
        self.att.flush()
        synchronize(self.xp)

    def time_query_100_pending(self, backend):
        i, j = self.points[self.k % 64]
        self.k += 1
        self.pending.query(i, j)


class DynamicSpeedups:
    """The issue's ratios, measured in one process: full recompute time / operation time."""

    params = (["numpy", "cupy"],)
    param_names = ["backend"]
    number = 1
    repeat = 1
    timeout = 600
    unit = "x"

    def setup(self, backend):
        self.bench = DynamicUpdates()
        self.bench.setup(backend)
        b = self.bench
        self.full = _median_time(lambda: b.time_full_recompute(backend), 5)

    def track_key_update_speedup(self, backend):
        t = _median_time(lambda: self.bench.time_key_updates(backend), 5) / KEY_BLOCK
        return self.full / t

    def track_value_update_speedup(self, backend):
        t = _median_time(lambda: self.bench.time_value_updates(backend), 5) / VALUE_BLOCK
        return self.full / t

    def track_key_batch_64_speedup_per_update(self, backend):
        t = _median_time(lambda: self.bench.time_key_batch_64(backend), 9) / BATCH
        return self.full / t

    def track_key_update_flushed_speedup(self, backend):
        t = _median_time(lambda: self.bench.time_key_update_flushed(backend), 9)
        return self.full / t

    def track_query_100_pending_fraction_of_full(self, backend):
        """Query time / full recompute time (target ≤ 0.001)."""
        t = _median_time(lambda: self.bench.time_query_100_pending(backend), 201)
        return t / self.full

    track_query_100_pending_fraction_of_full.unit = "fraction"


# ---------------------------------------------------------------------------------------------
# adaptive against fixed thresholds
# ---------------------------------------------------------------------------------------------

#: (query probability per operation, operations); updates are half K, half V entries
STREAMS = {"update-heavy": (0.05, 3000), "mixed": (0.5, 1500), "query-heavy": (0.95, 6000)}
FIXED = ["1", "4", "16", "64", "256", "1024"]


def _stream(name: str):
    q, count = STREAMS[name]
    g = rng(7)
    kinds = np.where(g.random(count) < q, 2, g.integers(0, 2, count)).tolist()
    rows = g.integers(0, N, count).tolist()
    cols = g.integers(0, D, count).tolist()
    deltas = (0.01 * g.standard_normal(count)).tolist()
    return list(zip(kinds, rows, cols, deltas, strict=True))


def _run_stream(att, ops, xp) -> None:
    update_key, update_value, query = att.update_key, att.update_value, att.query
    for kind, r, c, x in ops:
        if kind == 0:
            update_key(r, c, x)
        elif kind == 1:
            update_value(r, c, x)
        else:
            query(r, c)
    att.flush()  # the deferred work is part of the stream's cost
    synchronize(xp)


class DynamicStreams:
    """A whole stream (then a final flush) under each threshold; lower is better."""

    params = (list(STREAMS), ["adaptive", *FIXED])
    param_names = ["stream", "threshold"]
    number = 1
    repeat = (3, 5, 60.0)
    timeout = 600

    def setup(self, stream, threshold):
        from refattn.dynamic import DynamicAttention

        self.xp, Q, K, V = _inputs("numpy")
        t = None if threshold == "adaptive" else int(threshold)
        self.att = DynamicAttention(Q, K, V, threshold=t)
        self.ops = _stream(stream)

    def time_stream(self, stream, threshold):
        _run_stream(self.att, self.ops, self.xp)


class DynamicAdaptiveRatio:
    """``time(adaptive) / min over fixed thresholds of time(fixed)`` per stream (target ≤ 1.2).

    Each threshold's stream runs 3 times, each on a freshly built state, interleaved, and the
    minimum is kept, so that load on the machine affects every threshold alike.
    """

    params = (list(STREAMS),)
    param_names = ["stream"]
    number = 1
    repeat = 1
    timeout = 900
    unit = "ratio"

    def setup(self, stream):
        self.xp, self.Q, self.K, self.V = _inputs("numpy")
        self.ops = _stream(stream)

    def _time(self, threshold) -> float:
        from refattn.dynamic import DynamicAttention

        att = DynamicAttention(self.Q, self.K, self.V, threshold=threshold)
        start = time.perf_counter()
        _run_stream(att, self.ops, self.xp)
        return time.perf_counter() - start

    def track_adaptive_over_best_fixed(self, stream):
        best = {t: float("inf") for t in ["adaptive", *FIXED]}
        for _ in range(3):
            for t in best:
                best[t] = min(best[t], self._time(None if t == "adaptive" else int(t)))
        return best["adaptive"] / min(best[t] for t in FIXED)


class DynamicDemo:
    """``refattn dynamic`` end to end (n = 1000, d = 50, 100 rounds), output discarded."""

    params = (["numpy", "cupy"],)
    param_names = ["backend"]
    number = 1
    repeat = (2, 5, 60.0)
    timeout = 300

    def setup(self, backend):
        namespace(backend)  # NotImplementedError skips cupy without a GPU

    def time_demo(self, backend):
        import argparse

        from refattn._dynamic_cli import add_arguments, run

        parser = argparse.ArgumentParser()
        add_arguments(parser)
        args = parser.parse_args(["--backend", backend])
        sink = io.StringIO()
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            status = run(args)
        if status != 0:
            raise RuntimeError(f"refattn dynamic failed:\n{sink.getvalue()}")
