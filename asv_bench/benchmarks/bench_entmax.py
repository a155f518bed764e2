"""Sparse normalisers: refattn's sparsemax / α-entmax against the public ``entmax`` package.

One (8, 512, 512) input, float64 and float32, three normalisers: sparsemax and 1.5-entmax
(both sort-based in both libraries) and α = 1.3 (bisection: refattn halves until float rounding,
about 55 times in float64 and 26 in float32; ``entmax_bisect`` runs its default 50). ``time_*``
time each implementation; ``EntmaxRatio.track_*`` report refattn time / package time sampled
alternately in two worker processes (:func:`~.common.interleaved_ratio`), the figure to read.
Benchmarks of the package raise NotImplementedError (skipped) where it is not installed.
"""

from __future__ import annotations

import numpy as np

from .common import interleaved_ratio, randn, torch_or_skip

SHAPE = (8, 512, 512)
NORMALIZERS = ["sparsemax", "entmax15", "bisect_1.3"]


def _package():
    """``(torch, entmax)``; NotImplementedError (asv: skipped) where either is missing."""
    torch = torch_or_skip()
    try:
        import entmax as pkg
    except ImportError:
        raise NotImplementedError("the entmax package is not installed") from None
    return torch, pkg


def _calls(implementation: str, normalizer: str, dtype: str):
    """``(forward, forward_backward)`` closures on the benchmark input."""
    x = randn(SHAPE, dtype)
    dy = randn(SHAPE, dtype, offset=1)
    alpha = {"sparsemax": 2.0, "entmax15": 1.5, "bisect_1.3": 1.3}[normalizer]
    if implementation == "refattn":
        import refattn

        def forward():
            return refattn.entmax(x, alpha=alpha)

        def forward_backward():
            _, pullback = refattn.vjp(refattn.entmax, x, alpha=alpha)
            return pullback(dy)

        return forward, forward_backward
    torch, pkg = _package()
    fn = {
        "sparsemax": lambda t: pkg.sparsemax(t, dim=-1),
        "entmax15": lambda t: pkg.entmax15(t, dim=-1),
        "bisect_1.3": lambda t: pkg.entmax_bisect(t, 1.3, dim=-1),
    }[normalizer]
    tx = torch.from_numpy(np.array(x)).requires_grad_(True)
    tdy = torch.from_numpy(dy)

    def forward():
        with torch.no_grad():
            return fn(tx)

    def forward_backward():
        tx.grad = None
        fn(tx).backward(tdy)

    return forward, forward_backward


class Entmax:
    params = (["refattn", "entmax"], NORMALIZERS, ["float64", "float32"])
    param_names = ["implementation", "normalizer", "dtype"]
    number = 1
    repeat = (3, 5, 20.0)
    timeout = 300

    def setup(self, implementation, normalizer, dtype):
        self.forward, self.forward_backward = _calls(implementation, normalizer, dtype)

    def time_forward(self, implementation, normalizer, dtype):
        self.forward()

    def time_forward_backward(self, implementation, normalizer, dtype):
        self.forward_backward()


class EntmaxRatio:
    """refattn time / ``entmax`` package time for :class:`Entmax`, timed alternately."""

    params = (NORMALIZERS, ["float64", "float32"])
    param_names = ["normalizer", "dtype"]
    number = 1
    repeat = 1
    rounds = 1
    timeout = 600
    unit = "refattn/entmax"

    def setup(self, normalizer, dtype):
        # skip when the package is absent; no torch work here: torch's thread pool must start in
        # the forked workers, not in this process before the fork
        _package()

    def _ratio(self, which: int, normalizer: str, dtype: str) -> float:
        return interleaved_ratio(
            lambda: _calls("refattn", normalizer, dtype)[which],
            lambda: _calls("entmax", normalizer, dtype)[which],
            budget_s=12.0,
        )

    def track_forward(self, normalizer, dtype):
        return self._ratio(0, normalizer, dtype)

    def track_forward_backward(self, normalizer, dtype):
        return self._ratio(1, normalizer, dtype)
