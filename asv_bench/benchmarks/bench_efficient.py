"""Efficient attention: tiled vs materialized SDPA, sliding window, causal linear attention.

Targets (issue 4), each read off one run of this suite:

* ``TiledVsMaterialized`` at (1, 8192, 64) float64, forward+backward: tiled time <= 1.1x
  materialized; ``peakmem`` of tiled <= 64 MiB above ``peakmem_inputs`` (the same process state
  with the inputs built and nothing run), materialized over 1 GiB. ``track_traced_mib`` is the
  tracemalloc peak of the call itself (``TracedMemory``: allocations beyond the inputs).
* ``TiledCausal``: causal <= 0.6x non-causal.
* ``TiledLong``: float32, n = 65536, d = 64, one head, forward+backward completes; peak memory
  under 1 GiB (minutes: one round).
* ``SlidingWindow`` (w = 128) and ``LinearAttentionCausal``: time from n = 2048 to 16384 grows
  by <= 10x (linear growth is 8x).
"""

from __future__ import annotations

import tracemalloc

from .common import randn, torch_or_skip


def _sdpa_forward_backward(implementation: str, q, k, v, d_out, **options):
    """A closure running one forward and one backward."""
    if implementation == "torch":
        torch = torch_or_skip()
        tq, tk, tv = (torch.from_numpy(a).requires_grad_(True) for a in (q, k, v))
        t_do = torch.from_numpy(d_out)
        sdpa = torch.nn.functional.scaled_dot_product_attention

        def run():
            for t in (tq, tk, tv):
                t.grad = None
            sdpa(tq, tk, tv, is_causal=options.get("is_causal", False)).backward(t_do)

        return run
    import refattn

    def run():
        _, pullback = refattn.vjp(
            refattn.scaled_dot_product_attention,
            q,
            k,
            v,
            implementation=implementation,
            **options,
        )
        return pullback(d_out)

    return run


def _traced_mib(run) -> float:
    tracemalloc.start()
    try:
        run()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak / 2**20


class TiledVsMaterialized:
    """SDPA (1, 8192, 64) float64, forward + backward; torch's CPU SDPA as a peer."""

    params = (["tiled", "materialized", "torch"],)
    param_names = ["implementation"]
    number = 1
    repeat = (3, 5, 60.0)
    timeout = 600

    def setup(self, implementation):
        q, k, v, d_out = (randn((1, 8192, 64), "float64", offset=i) for i in range(4))
        self.run = _sdpa_forward_backward(implementation, q, k, v, d_out)

    def time_forward_backward(self, implementation):
        self.run()

    def peakmem_forward_backward(self, implementation):
        self.run()

    def peakmem_inputs(self, implementation):
        """Baseline for ``peakmem_forward_backward``: setup only."""


class TracedMemory:
    """tracemalloc peak (MiB) of one (1, 8192, 64) float64 forward + backward.

    NumPy reports its allocations to tracemalloc, and the inputs exist before tracing starts,
    so this is the memory the call itself needs beyond its inputs (outputs included).
    """

    params = (["tiled", "materialized"],)
    param_names = ["implementation"]
    number = 1
    repeat = 1
    timeout = 600

    def setup(self, implementation):
        q, k, v, d_out = (randn((1, 8192, 64), "float64", offset=i) for i in range(4))
        self.run = _sdpa_forward_backward(implementation, q, k, v, d_out)

    def track_traced_mib(self, implementation):
        return _traced_mib(self.run)

    track_traced_mib.unit = "MiB"


class TiledCausal:
    """Tiled SDPA (1, 8192, 64) float64 forward + backward, causal or not."""

    params = ([False, True],)
    param_names = ["is_causal"]
    number = 1
    repeat = (3, 5, 60.0)
    timeout = 600

    def setup(self, is_causal):
        q, k, v, d_out = (randn((1, 8192, 64), "float64", offset=i) for i in range(4))
        self.run = _sdpa_forward_backward("tiled", q, k, v, d_out, is_causal=is_causal)

    def time_forward_backward(self, is_causal):
        self.run()


class TiledLong:
    """Tiled SDPA float32, n = 65536, d = 64, one head: forward + backward (minutes)."""

    number = 1
    repeat = 1
    rounds = 1
    warmup_time = 0.0
    min_run_count = 1
    timeout = 1800

    def setup(self):
        q, k, v, d_out = (randn((1, 65536, 64), "float32", offset=i) for i in range(4))
        self.run = _sdpa_forward_backward("tiled", q, k, v, d_out)

    def time_forward_backward(self):
        self.run()

    def peakmem_forward_backward(self):
        self.run()


class SlidingWindow:
    """Sliding window w = 128, (1, n, 64) float64, forward + backward."""

    params = ([2048, 16384],)
    param_names = ["n"]
    number = 1
    repeat = (3, 10, 30.0)
    timeout = 300

    def setup(self, n):
        import refattn
        from refattn.ops.window import sliding_window_attention

        q, k, v, d_out = (randn((1, n, 64), "float64", offset=i) for i in range(4))

        def run():
            _, pullback = refattn.vjp(sliding_window_attention, q, k, v, window=128)
            return pullback(d_out)

        self.run = run
        run()

    def time_forward_backward(self, n):
        self.run()

    def peakmem_forward_backward(self, n):
        self.run()


class LinearAttentionCausal:
    """Causal linear attention (elu+1), (1, n, 64) float64, forward + backward."""

    params = ([2048, 16384],)
    param_names = ["n"]
    number = 1
    repeat = (3, 10, 30.0)
    timeout = 300

    def setup(self, n):
        import refattn
        from refattn.ops.linear_attention import linear_attention

        q, k, v, d_out = (randn((1, n, 64), "float64", offset=i) for i in range(4))

        def run():
            _, pullback = refattn.vjp(linear_attention, q, k, v, is_causal=True)
            return pullback(d_out)

        self.run = run
        run()

    def time_forward_backward(self, n):
        self.run()

    def peakmem_forward_backward(self, n):
        self.run()
