"""``refattn dynamic``: the seeds' dynamic-attention demo, lazy updates against full recomputes.

Uniform random Q, K and V of shape (n, d); each round makes 10 random K-entry and 10 random
V-entry updates; then the output is queried at (0, 0) and (500, 25) (clipped to the size) and
the maintained state is compared with a fresh float64 recompute. The exit status is 1 when that
error exceeds 1e-10.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

__all__ = ["add_arguments", "run"]

#: the demo fails (exit status 1) when the maintained output is further than this from a fresh
#: float64 recompute (relative, per query row)
ERROR_LIMIT = 1e-10
UPDATES_PER_ROUND = 10


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``refattn dynamic``."""
    parser.add_argument("--n", type=int, default=1000, help="queries = keys = n (default 1000)")
    parser.add_argument("--d", type=int, default=50, help="key and value width (default 50)")
    parser.add_argument("--rounds", type=int, default=100, help="update rounds (default 100)")
    parser.add_argument(
        "--threshold",
        type=int,
        default=None,
        help="flush after this many pending updates (default: adaptive)",
    )
    parser.add_argument("--backend", default="numpy", choices=["numpy", "cupy"])
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def _namespace(backend: str) -> Any:
    from array_api_compat import array_namespace

    if backend == "cupy":
        import cupy

        return array_namespace(cupy.empty(0))
    import numpy

    return array_namespace(numpy.empty(0))


def _synchronize(xp: Any) -> None:
    if "cupy" in getattr(xp, "__name__", ""):
        import cupy

        cupy.cuda.get_current_stream().synchronize()


def _full_recompute(xp: Any, Q: Any, K: Any, V: Any) -> Any:
    S = Q @ K.T
    S = S - xp.max(S, axis=1, keepdims=True)
    E = xp.exp(S)
    return (E @ V) / xp.sum(E, axis=1, keepdims=True)


class _Progress:
    """Progress on stderr: a rewritten line on a terminal, else a line every 10%."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.tty = sys.stderr.isatty()
        self.every = max(1, total // 10)
        self.start = time.perf_counter()

    def update(self, done: int) -> None:
        if done % self.every and done != self.total:
            return
        elapsed = time.perf_counter() - self.start
        line = f"round {done}/{self.total} ({elapsed:.1f} s)"
        if self.tty:
            end = "\n" if done == self.total else ""
            print(f"\r{line}", end=end, file=sys.stderr, flush=True)
        elif self.total >= 100:
            print(line, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    """Run the demo; return the exit status (0 ok, 1 error over 1e-10, 2 bad arguments)."""
    import numpy as np

    from .dynamic import DynamicAttention

    if args.n < 1 or args.d < 1 or args.rounds < 0:
        print("refattn dynamic: --n and --d must be >= 1 and --rounds >= 0", file=sys.stderr)
        return 2
    if args.threshold is not None and args.threshold < 1:
        print("refattn dynamic: --threshold must be >= 1", file=sys.stderr)
        return 2
    try:
        xp = _namespace(args.backend)
    except ImportError as exc:
        print(f"refattn dynamic: backend {args.backend!r} is not available: {exc}", file=sys.stderr)
        return 2

    n, d = args.n, args.d
    rng = np.random.default_rng(args.seed)
    Q, K, V = (xp.asarray(rng.random((n, d))) for _ in range(3))
    label = "adaptive" if args.threshold is None else str(args.threshold)
    print(f"refattn dynamic: n={n} d={d} rounds={args.rounds} threshold={label} {args.backend}")

    # the cost of one full recompute: what a round would cost without lazy updates
    full_times = []
    for _ in range(3):
        start = time.perf_counter()
        _full_recompute(xp, Q, K, V)
        _synchronize(xp)
        full_times.append(time.perf_counter() - start)
    full = sorted(full_times)[1]

    start = time.perf_counter()
    att = DynamicAttention(Q, K, V, threshold=args.threshold)
    _synchronize(xp)
    build = time.perf_counter() - start

    progress = _Progress(args.rounds)
    u = UPDATES_PER_ROUND
    start = time.perf_counter()
    for r in range(args.rounds):
        att.update_keys(rng.integers(0, n, u), rng.integers(0, d, u), rng.normal(0.0, 0.1, u))
        att.update_values(rng.integers(0, n, u), rng.integers(0, d, u), rng.normal(0.0, 0.1, u))
        progress.update(r + 1)
    pending = att.pending
    start_q = time.perf_counter()
    points = [(0, 0), (min(500, n - 1), min(25, d - 1))]
    values = [att.query(i, j) for i, j in points]
    query_time = (time.perf_counter() - start_q) / len(points)
    att.flush()  # the deferred work belongs to the rounds
    _synchronize(xp)
    lazy = (time.perf_counter() - start - query_time * len(points)) / max(args.rounds, 1)

    error = att.approximation_error()
    stats = att.stats
    for (i, j), value in zip(points, values, strict=True):
        print(f"query({i}, {j}) = {value:.17g}")
    print(f"query time, {pending} updates pending: {query_time * 1e6:.1f} us")
    print(f"build: {build * 1e3:.2f} ms")
    speedup = full / lazy if lazy > 0 else float("inf")
    print(
        f"time per round ({2 * u} updates): lazy {lazy * 1e3:.3f} ms, "
        f"full recompute {full * 1e3:.3f} ms ({speedup:.0f}x)"
    )
    print(
        f"flushes: {stats['flushes']}, rebuilds: {stats['rebuilds']}, "
        f"columns recomputed: {stats['columns_recomputed']}, threshold now: {att.threshold}"
    )
    ok = error <= ERROR_LIMIT
    print(f"approximation error: {error:.3e} ({'ok' if ok else 'FAIL'}: limit {ERROR_LIMIT:g})")
    return 0 if ok else 1
