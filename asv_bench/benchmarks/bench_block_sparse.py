"""Block-sparse attention against dense tiled SDPA: the time follows the listed blocks.

Forward+backward, one head, d = 64, float64, block 64 (n / 64 block rows). Layouts:

* ``bigbird``: window 1, 1 global and 2 random blocks per row, about 7 blocks per row at every
  n (a fixed per-row budget);
* ``strided_local``: Child et al.'s strided ``A1`` with l = 8 (causal, 9 blocks per row, fixed);
* ``strided``: the strided pattern with both components (l = 8, causal); ``A2`` adds a block
  every l, so its budget grows with n (about n / 128 / 8 more per row);
* ``sixteenth`` (n = 16384 only): blocks of 128 (the size block-sparse GPU kernels use), BigBird
  with window 2, 1 global and 2 random blocks: 8.9 of 128 blocks per row, about 1/16;
* ``dense``: ``scaled_dot_product_attention(implementation="tiled")``, all blocks.

Targets (issue 18): ``sixteenth`` in <= 1/8 of the dense time at n = 16384
(``BlockSparseRatio.track_sixteenth_over_dense``, the two timed alternately in one process),
and doubling n at a fixed budget grows the time <= 2.3x (``BlockSparseRatio.track_doubling``,
n = 8192 -> 16384, likewise alternated). ``track_blocks_per_row`` is the mean listed blocks per
block row and ``track_density`` the listed fraction, so that time / nnz can be read off the page.
"""

from __future__ import annotations

import time

import numpy as np

from .common import randn

BLOCK = 64


def _layout(name: str, n: int) -> np.ndarray | None:
    from refattn.ops.sparse_patterns import bigbird_pattern, strided_pattern

    nb = n // _block(name)
    if name == "bigbird":
        return bigbird_pattern(nb, window=1, n_global=1, n_random=2, seed=0)
    if name == "strided_local":
        return strided_pattern(nb, 8, component="A1")
    if name == "strided":
        return strided_pattern(nb, 8)
    if name == "sixteenth":
        return bigbird_pattern(nb, window=2, n_global=1, n_random=2, seed=0)
    return None


def _block(name: str) -> int:
    return 128 if name == "sixteenth" else BLOCK


def _inputs(n: int) -> list:
    return [randn((1, 1, n, 64), offset=i) for i in range(4)]


def _run(q, k, v, d_out, layout: np.ndarray | None, block: int = BLOCK) -> None:
    import refattn

    if layout is None:
        _, pullback = refattn.vjp(
            refattn.scaled_dot_product_attention, q, k, v, implementation="tiled"
        )
    else:
        _, pullback = refattn.vjp(
            refattn.block_sparse_attention, q, k, v, layout=layout, block_size=block
        )
    pullback(d_out)


class BlockSparsePatterns:
    params = ([4096, 8192, 16384], ["bigbird", "strided_local", "strided", "sixteenth", "dense"])
    param_names = ["n", "layout"]
    timeout = 900
    number = 1
    repeat = (1, 3, 60.0)

    def setup(self, n, layout):
        if layout == "sixteenth" and n != 16384:
            raise NotImplementedError("the 1/16 layout is measured at n = 16384 only")
        self.q, self.k, self.v, self.d_out = _inputs(n)
        self.layout = _layout(layout, n)
        self.block = _block(layout)

    def time_forward_backward(self, n, layout):
        _run(self.q, self.k, self.v, self.d_out, self.layout, self.block)

    def track_blocks_per_row(self, n, layout):
        return float(n // BLOCK if self.layout is None else self.layout.sum(axis=1).mean())

    def track_density(self, n, layout):
        return 1.0 if self.layout is None else float(self.layout.mean())

    track_blocks_per_row.unit = "blocks"
    track_density.unit = "fraction"


def _alternated(calls: dict, rounds: int = 3) -> dict:
    """Median time of each call, taken in turn ``rounds`` times (same machine load)."""
    times: dict = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


class BlockSparseRatio:
    """Paired ratios, each pair timed alternately in this process, median of 3."""

    timeout = 1200

    def track_sixteenth_over_dense(self):
        inputs = _inputs(16384)
        layout = _layout("sixteenth", 16384)
        t = _alternated(
            {"sparse": lambda: _run(*inputs, layout, 128), "dense": lambda: _run(*inputs, None)}
        )
        return t["sparse"] / t["dense"]

    track_sixteenth_over_dense.unit = "ratio"

    def track_doubling(self, layout):
        small, large = _inputs(8192), _inputs(16384)
        ls, ll = _layout(layout, 8192), _layout(layout, 16384)
        t = _alternated({"8192": lambda: _run(*small, ls), "16384": lambda: _run(*large, ll)})
        return t["16384"] / t["8192"]

    track_doubling.params = ["bigbird", "strided_local", "strided"]
    track_doubling.param_names = ["layout"]
    track_doubling.unit = "ratio"
