"""Variable-length batches: the cost follows the sequences' lengths, not the padded shape.

Four causal sequences of 4096, 2048, 1024 and 512 tokens, two heads, d = 64, float64,
forward+backward, computed three ways: the padded batch without lengths (what a kernel without
varlen support computes), the padded batch with ``query_lengths``/``key_lengths`` (the tiled
kernel skips the tiles no sequence sees), and packed with ``varlen_attention`` (one SDPA per
sequence). Scores needed: ``sum_b n_b^2 / 2`` against ``4 * 4096^2 / 2``, a ratio of 0.33.
``track_*_over_padded`` times them alternately in this process (median of 3 each).
"""

from __future__ import annotations

import time

import numpy as np

from .common import randn

LENGTHS = (4096, 2048, 1024, 512)
N, H, D = max(LENGTHS), 2, 64


def _padded_inputs():
    return [randn((len(LENGTHS), H, N, D), offset=i) for i in range(4)]


def _packed_inputs(padded):
    cu = np.cumsum((0, *LENGTHS))
    packed = [
        np.concatenate([x[b, :, :n].transpose(1, 0, 2) for b, n in enumerate(LENGTHS)])
        for x in padded
    ]
    return packed, cu


def _run(how, padded, packed, cu):
    import refattn

    opts = {"is_causal": True, "causal_alignment": "lower_right", "implementation": "tiled"}
    if how == "packed":
        q, k, v, d_out = packed
        op, extra = refattn.varlen_attention, {"cu_seqlens_q": cu, "cu_seqlens_k": cu}
    else:
        q, k, v, d_out = padded
        op, extra = refattn.scaled_dot_product_attention, {}
        if how == "lengths":
            extra = {"query_lengths": LENGTHS, "key_lengths": LENGTHS}
    _, pullback = refattn.vjp(op, q, k, v, **opts, **extra)
    pullback(d_out)


class Varlen:
    """Forward+backward of the batch above: padded, padded with lengths, packed."""

    params = (["padded", "lengths", "packed"],)
    param_names = ["how"]
    timeout = 600
    number = 1
    repeat = (1, 3, 60.0)

    def setup(self, how):
        self.padded = _padded_inputs()
        self.packed, self.cu = _packed_inputs(self.padded)

    def time_forward_backward(self, how):
        _run(how, self.padded, self.packed, self.cu)


class VarlenRatio:
    """Time with lengths (and packed) over the padded time, measured alternately (target ~0.33
    plus overheads; 1.0 would mean the lengths only mask)."""

    timeout = 900
    unit = "ratio"

    def setup(self):
        self.padded = _padded_inputs()
        self.packed, self.cu = _packed_inputs(self.padded)
        self.times = None

    def _times(self):
        if self.times is None:
            times = {"padded": [], "lengths": [], "packed": []}
            for _ in range(3):
                for how in times:
                    start = time.perf_counter()
                    _run(how, self.padded, self.packed, self.cu)
                    times[how].append(time.perf_counter() - start)
            self.times = {how: float(np.median(t)) for how, t in times.items()}
        return self.times

    def track_lengths_over_padded(self):
        t = self._times()
        return t["lengths"] / t["padded"]

    def track_packed_over_padded(self):
        t = self._times()
        return t["packed"] / t["padded"]
