"""Attention sinks and a learnable bias: what they cost over plain SDPA, forward+backward.

Causal self-attention, batch 1, 8 heads, n = 2048, d = 64, float64, both kernels. "sinks"
differentiates gpt-oss's per-head sink logits (an ``O(n d)`` rescaling after the kernel and an
``O(n)`` gradient, so its cost should be within noise of plain); "bias" differentiates a
learnable ``(H, 1, n)`` key bias (each tile's ``dS`` summed over its rows into the bias
gradient: one more pass over the computed scores), "bias_option" passes the same bias as an
option (no gradient), "plain" has neither; "softcap" differentiates a learnable softcap ``c``
(the sixth primal: one more pass over each tile's ``dB``, with an ``atanh``) and
"softcap_option" passes ``softcap=`` as the constant. ``track_sinks_over_plain``,
``track_bias_over_bias_option`` and ``track_softcap_over_softcap_option`` time them
alternately in this process (median of 3 each).
"""

from __future__ import annotations

import time

import numpy as np

from .common import randn

H, N, D = 8, 2048, 64
SOFTCAP = 20.0


def _inputs():
    q, k, v, d_out = (randn((1, H, N, D), offset=i) for i in range(4))
    bias = randn((H, 1, N), offset=4)
    sinks = randn((H,), offset=5)
    return q, k, v, d_out, bias, sinks


def _run(how, implementation, q, k, v, d_out, bias, sinks):
    import refattn

    sdpa = refattn.scaled_dot_product_attention
    opts = {"is_causal": True, "implementation": implementation}
    if how == "plain":
        _, pullback = refattn.vjp(sdpa, q, k, v, **opts)
    elif how == "sinks":
        _, pullback = refattn.vjp(sdpa, q, k, v, None, sinks, **opts)
    elif how == "bias_option":
        _, pullback = refattn.vjp(sdpa, q, k, v, bias=bias, **opts)
    elif how == "softcap_option":
        _, pullback = refattn.vjp(sdpa, q, k, v, softcap=SOFTCAP, **opts)
    elif how == "softcap":
        _, pullback = refattn.vjp(sdpa, q, k, v, None, None, SOFTCAP, **opts)
    else:
        _, pullback = refattn.vjp(sdpa, q, k, v, bias, **opts)
    pullback(d_out)


class Sinks:
    """Forward+backward: plain, learnable sinks, a bias as an option, a learnable bias."""

    params = (["plain", "sinks", "bias_option", "bias"], ["materialized", "tiled"])
    param_names = ["how", "implementation"]
    timeout = 600
    number = 1
    repeat = (1, 5, 60.0)

    def setup(self, how, implementation):
        self.inputs = _inputs()

    def time_forward_backward(self, how, implementation):
        _run(how, implementation, *self.inputs)


class SinksRatio:
    """Learnable sinks' time over plain, a learnable bias's over the same bias as an option and
    a learnable softcap's over the constant one, measured alternately (tiled kernel)."""

    timeout = 900
    unit = "ratio"

    def setup(self):
        self.inputs = _inputs()
        self.times = None

    def _times(self):
        if self.times is None:
            hows = ("plain", "sinks", "bias_option", "bias", "softcap_option", "softcap")
            times: dict[str, list[float]] = {how: [] for how in hows}
            for _ in range(3):
                for how in times:
                    start = time.perf_counter()
                    _run(how, "tiled", *self.inputs)
                    times[how].append(time.perf_counter() - start)
            self.times = {how: float(np.median(t)) for how, t in times.items()}
        return self.times

    def track_sinks_over_plain(self):
        t = self._times()
        return t["sinks"] / t["plain"]

    def track_bias_over_bias_option(self):
        t = self._times()
        return t["bias"] / t["bias_option"]

    def track_softcap_over_softcap_option(self):
        t = self._times()
        return t["softcap"] / t["softcap_option"]
