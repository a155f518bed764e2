"""FlexAttention-style modifiers: a document mask's cost follows the documents, not the batch.

One sequence of n = 8192 tokens made of four documents of 2048, causal inside each
(``mask_mod``), 2 heads, d = 64, float64, tiled, forward+backward; against plain causal
attention over the whole sequence. The document mask leaves a quarter of the causal tiles, so
the target ratio is about 0.25 plus the cost of evaluating the mask on the tiles it keeps
(the plan evaluates it once on every causal tile: ``is_causal`` gives the plan its
structured part, ``mask_mod`` refines it). ``score_mod`` adds ALiBi as an Op.
``track_*_over_causal`` times them alternately in this process (median of 3 each).
"""

from __future__ import annotations

import time

import numpy as np

from .common import randn

N, H, D, DOC = 8192, 2, 64, 2048
SLOPES = np.array([0.5, 0.25])


def _inputs():
    return [randn((1, H, N, D), offset=i) for i in range(4)]


def _documents(b, h, i, j):
    return (i // DOC == j // DOC) & (j <= i)


def _alibi():
    import refattn

    def fwd(s, /, *, b, h, i, j):
        return s - SLOPES[h] * (i - j), None

    def bwd(residuals, d_s, /):
        return (d_s,)

    return refattn.Op(fwd, bwd, name="alibi_mod")


def _run(how, q, k, v, d_out, alibi):
    import refattn

    opts = {"implementation": "tiled", "is_causal": True}  # the plan starts from causal tiles
    if how != "causal":
        opts["mask_mod"] = _documents
        if how == "documents_alibi":
            opts["score_mod"] = alibi
    _, pullback = refattn.vjp(refattn.scaled_dot_product_attention, q, k, v, **opts)
    pullback(d_out)


class DocumentMask:
    """Forward+backward: causal, the document mask, the document mask with an ALiBi score_mod."""

    params = (["causal", "documents", "documents_alibi"],)
    param_names = ["how"]
    timeout = 600
    number = 1
    repeat = (1, 3, 60.0)

    def setup(self, how):
        self.inputs = _inputs()
        self.alibi = _alibi()

    def time_forward_backward(self, how):
        _run(how, *self.inputs, self.alibi)


class DocumentMaskRatio:
    """The document mask's time (and with ALiBi) over plain causal, measured alternately."""

    timeout = 900
    unit = "ratio"

    def setup(self):
        self.inputs = _inputs()
        self.alibi = _alibi()
        self.times = None

    def _times(self):
        if self.times is None:
            times = {"causal": [], "documents": [], "documents_alibi": []}
            for _ in range(3):
                for how in times:
                    start = time.perf_counter()
                    _run(how, *self.inputs, self.alibi)
                    times[how].append(time.perf_counter() - start)
            self.times = {how: float(np.median(t)) for how, t in times.items()}
        return self.times

    def track_documents_over_causal(self):
        t = self._times()
        return t["documents"] / t["causal"]

    def track_documents_alibi_over_causal(self):
        t = self._times()
        return t["documents_alibi"] / t["causal"]
