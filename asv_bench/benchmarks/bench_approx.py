"""Approximate attention (issue 19): Reformer LSH, Linformer, XCA, each beside its peer.

Targets, read off one run of this suite:

* ``LSH``: forward + backward cost ``O(n c d)`` per round, so from one ``n`` to ``2n`` the time
  grows by <= 2.3x (linear growth is 2x), with a fixed number of buckets (64: the hash costs
  ``O(n n_buckets d)``). ``backend="reformer_pytorch"`` is the package's ``LSHAttention`` (torch
  autograd, float64, same sizes), whose ``n_buckets`` is ``n / c``;
  ``backend="refattn_n_over_c"`` is refattn with that same bucket count.
* ``Linformer``, ``XCA``: refattn's forward + backward beside the peer users know (torch
  autograd of the ``linformer`` package's einsum formula; timm's ``XCA`` attention core when
  timm imports, which needs torchvision: skipped otherwise), float64.
"""

from __future__ import annotations

import math

from .common import randn, torch_or_skip

_D = 64
_CHUNK = 64
_HASHES = 4
_HEADS = 4


def _torch_closure(fn, arrays, d_out):
    """A closure running ``fn(*tensors).backward(d_out)`` with fresh gradients."""
    torch = torch_or_skip()
    ts = [torch.from_numpy(a).requires_grad_(True) for a in arrays]
    t_do = torch.from_numpy(d_out)

    def run():
        for t in ts:
            t.grad = None
        fn(*ts).backward(t_do)

    return run


def _refattn_closure(op, arrays, d_out, **options):
    import refattn

    def run():
        _, pullback = refattn.vjp(op, *arrays, **options)
        return pullback(d_out)

    return run


class LSH:
    """Shared-QK LSH attention, (4 heads, n, 64) float64, 4 rounds, chunk 64."""

    params = ([2048, 4096, 8192], ["refattn", "refattn_n_over_c", "reformer_pytorch"])
    param_names = ["n", "backend"]
    number = 1
    repeat = (3, 10, 30.0)
    timeout = 300

    def setup(self, n, backend):
        qk, v, d_out = (randn((_HEADS, n, _D), offset=i) for i in range(3))
        n_buckets = n // _CHUNK if backend != "refattn" else 64
        if backend == "reformer_pytorch":
            torch = torch_or_skip()
            try:
                from reformer_pytorch.reformer_pytorch import LSHAttention
            except ImportError:
                raise NotImplementedError("reformer_pytorch is not installed") from None
            lsh = LSHAttention(bucket_size=_CHUNK, n_hashes=_HASHES).eval()

            def fn(tqk, tv):
                torch.manual_seed(0)
                return lsh(tqk, tv)[0]

            self.run = _torch_closure(fn, [qk, v], d_out)
        else:
            import refattn

            rotations = randn((_D, _HASHES, n_buckets // 2), offset=3)
            self.run = _refattn_closure(
                refattn.lsh_attention, [qk, v], d_out, rotations=rotations, chunk_size=_CHUNK
            )
        self.run()

    def time_forward_backward(self, n, backend):
        self.run()

    def peakmem_forward_backward(self, n, backend):
        self.run()


class Linformer:
    """(1, 8, n, 64) float64, shared projections to p = 256, forward + backward (q, k, v, E, F)."""

    params = ([4096], ["refattn", "torch"])
    param_names = ["n", "backend"]
    number = 1
    repeat = (3, 10, 30.0)
    timeout = 300

    def setup(self, n, backend):
        p = 256
        q, k, v, d_out = (randn((1, 8, n, _D), offset=i) for i in range(4))
        e, f = (randn((n, p), offset=4 + i) / math.sqrt(n) for i in range(2))
        if backend == "torch":
            torch = torch_or_skip()

            def fn(tq, tk, tv, te, tf):  # the linformer package's formula
                kp = torch.einsum("bhnd,nk->bhkd", tk, te)
                vp = torch.einsum("bhnd,nk->bhkd", tv, tf)
                dots = torch.einsum("bhnd,bhkd->bhnk", tq, kp) * _D**-0.5
                return torch.einsum("bhnk,bhkd->bhnd", dots.softmax(dim=-1), vp)

            self.run = _torch_closure(fn, [q, k, v, e, f], d_out)
        else:
            import refattn

            self.run = _refattn_closure(refattn.linformer_attention, [q, k, v, e, f], d_out)
        self.run()

    def time_forward_backward(self, n, backend):
        self.run()


class XCA:
    """(4, 8, n, 64) float64 (XCiT-S: 8 heads of 48-64 channels), forward + backward."""

    params = ([4096], ["refattn", "torch"])
    param_names = ["n", "backend"]
    number = 1
    repeat = (3, 10, 30.0)
    timeout = 300

    def setup(self, n, backend):
        q, k, v, d_out = (randn((4, 8, n, _D), offset=i) for i in range(4))
        tau = randn((8,), offset=4) ** 2 + 0.5
        if backend == "torch":
            torch = torch_or_skip()
            normalize = torch.nn.functional.normalize

            def fn(tq, tk, tv, tt):  # timm's XCA.forward core, (B, H, d, n) layout
                qh = normalize(tq.transpose(-2, -1), dim=-1)
                kh = normalize(tk.transpose(-2, -1), dim=-1)
                attn = ((qh @ kh.transpose(-2, -1)) * tt[:, None, None]).softmax(dim=-1)
                return (attn @ tv.transpose(-2, -1)).transpose(-2, -1)

            self.run = _torch_closure(fn, [q, k, v, tau], d_out)
        else:
            import refattn

            self.run = _refattn_closure(refattn.cross_covariance_attention, [q, k, v, tau], d_out)
        self.run()

    def time_forward_backward(self, n, backend):
        self.run()
