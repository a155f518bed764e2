"""Block-sparse attention with a BigBird layout against dense tiled SDPA: time follows nnz.

Forward+backward, one head, d = 64, float64, block 64; BigBird with window 1, 1 global and
2 random blocks per row (about 7 of n/64 blocks per row). ``track_density`` is the layout's
fraction of blocks; time divided by it should stay about the dense time.
"""

from __future__ import annotations

from .common import randn

BLOCK = 64


def _layout(n):
    from refattn.ops.sparse_patterns import bigbird_pattern

    return bigbird_pattern(n // BLOCK, window=1, n_global=1, n_random=2, seed=0)


class BlockSparseBigBird:
    params = ([4096, 8192, 16384], ["bigbird", "dense"])
    param_names = ["n", "layout"]
    timeout = 900
    number = 1
    repeat = (1, 3, 60.0)

    def setup(self, n, layout):
        self.q, self.k, self.v, self.d_out = (randn((1, 1, n, 64), offset=i) for i in range(4))
        self.layout = _layout(n)

    def time_forward_backward(self, n, layout):
        import refattn

        if layout == "dense":
            _, pullback = refattn.vjp(
                refattn.scaled_dot_product_attention, self.q, self.k, self.v, implementation="tiled"
            )
        else:
            _, pullback = refattn.vjp(
                refattn.block_sparse_attention,
                self.q,
                self.k,
                self.v,
                layout=self.layout,
                block_size=BLOCK,
            )
        pullback(self.d_out)

    def track_density(self, n, layout):
        return 1.0 if layout == "dense" else float(self.layout.mean())
