"""SDPA's local ``window`` in the tiled kernel: the cost follows the band, not n².

Target (issue 17): at n = 16384, d = 64, one head, float64, forward+backward with
``window=(256, 0)`` and ``is_causal=True`` runs >= 8x faster than full causal attention
(``track_speedup``: the two are timed alternately in this process, median of 3 each).
"""

from __future__ import annotations

import time

import numpy as np

from .common import randn


def _run(q, k, v, d_out, **options):
    import refattn

    _, pullback = refattn.vjp(
        refattn.scaled_dot_product_attention, q, k, v, implementation="tiled", **options
    )
    pullback(d_out)


class TiledWindow:
    """Forward+backward, one head, d = 64, float64: causal, and causal with a 256 window."""

    params = ([4096, 16384], ["causal", "window256"])
    param_names = ["n", "mask"]
    timeout = 600
    number = 1
    repeat = (1, 3, 60.0)

    def setup(self, n, mask):
        self.q, self.k, self.v, self.d_out = (randn((1, 1, n, 64), offset=i) for i in range(4))
        self.options = {"is_causal": True}
        if mask == "window256":
            self.options["window"] = (256, 0)

    def time_forward_backward(self, n, mask):
        _run(self.q, self.k, self.v, self.d_out, **self.options)


class TiledWindowSpeedup:
    """``track_speedup``: full causal time / causal-window-256 time at n = 16384 (target >= 8)."""

    timeout = 900
    unit = "x"

    def setup(self):
        self.inputs = [randn((1, 1, 16384, 64), offset=i) for i in range(4)]

    def track_speedup(self):
        times = {"causal": [], "window": []}
        for _ in range(3):
            for name, extra in (("causal", {}), ("window", {"window": (256, 0)})):
                start = time.perf_counter()
                _run(*self.inputs, is_causal=True, **extra)
                times[name].append(time.perf_counter() - start)
        return float(np.median(times["causal"]) / np.median(times["window"]))
