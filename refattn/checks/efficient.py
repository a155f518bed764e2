"""Check cases for the efficient attention ops: tiled SDPA, sliding window, linear attention.

Tiled cases use small block sizes so that every case has several query and key blocks, ragged
last blocks, and (where masks are involved) skipped and partial tiles. The framework references
are explicit float64 math: the tiled cases reuse the SDPA reference of :mod:`.core`; the sliding
window builds its boolean mask from index arithmetic and calls that same reference; linear
attention is the quadratic formula ``(phi(Q) phi(K)^T [o L]) V / (rowsum + eps)``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..ops import scaled_dot_product_attention
from ..ops.linear_attention import linear_attention
from ..ops.window import sliding_window_attention
from . import Case, register_case
from .core import jax_sdpa, sdpa_make, torch_sdpa

# ----------------------------------------------------------------------------- tiled SDPA


def _tiled(make: Any, block_size: tuple[int, int], *, masked_rows: slice | None = None) -> Any:
    """A core SDPA case run with ``implementation="tiled"`` and ``block_size``.

    ``masked_rows`` hides every key from those query rows (a whole block of fully masked rows
    when it covers a block), on top of the case's own mask.
    """

    def tiled_make(rng: np.random.Generator):
        primals, options = make(rng)
        if masked_rows is not None:
            q, k, _ = primals
            shape = (*q.shape[:-1], k.shape[-2])
            mask = np.ones(shape, dtype=bool) if options.get("mask") is None else options["mask"]
            mask = np.array(np.broadcast_to(mask, shape))
            mask[..., masked_rows, :] = False
            options["mask"] = mask
        return primals, {**options, "implementation": "tiled", "block_size": block_size}

    return tiled_make


_TILED_CASES = {
    "tiled_mha_ragged": _tiled(sdpa_make((2, 1, 7, 2), n_k=5), (3, 2)),
    "tiled_gqa_causal_upper_left": _tiled(
        sdpa_make((1, 4, 5, 2), kv_heads=2, n_k=7, causal="upper_left"), (2, 3)
    ),
    "tiled_mqa_causal_lower_right": _tiled(
        sdpa_make((1, 3, 6, 2), kv_heads=1, n_k=4, causal="lower_right", lse=True), (2, 2)
    ),
    "tiled_masked_row_block": _tiled(
        sdpa_make((2, 7, 2), mask="some", lse=True), (3, 2), masked_rows=slice(3, 6)
    ),
    "tiled_bias_dropout_2d": _tiled(sdpa_make((6, 3), bias=True, dropout=True), (4, 3)),
    "tiled_weights_and_lse": _tiled(
        sdpa_make((2, 5, 2), n_k=6, mask="some", weights=True, lse=True), (2, 4)
    ),
}

for _name, _make in _TILED_CASES.items():
    register_case(
        Case(
            scaled_dot_product_attention,
            _name,
            _make,
            torch_ref=torch_sdpa,
            jax_ref=jax_sdpa,
            tags=("efficient", "tiled"),
        )
    )


# ----------------------------------------------------------------------------- sliding window


def _window_make(
    q_shape: tuple[int, ...],
    *,
    window: int,
    global_tokens: int = 0,
    is_causal: bool = False,
    kv_heads: int | None = None,
    block_size: int | None = None,
):
    def make(rng: np.random.Generator):
        *lead, n, d = q_shape
        kv_lead = [*lead[:-1], kv_heads if kv_heads is not None else lead[-1]] if lead else []
        q = rng.standard_normal(q_shape)
        k = rng.standard_normal((*kv_lead, n, d))
        v = rng.standard_normal((*kv_lead, n, d + 1))
        options: dict[str, Any] = {"window": window, "global_tokens": global_tokens}
        if is_causal:
            options["is_causal"] = True
        if block_size is not None:
            options["block_size"] = block_size
        return (q, k, v), options

    return make


def _window_keep(lib: Any, n: int, options: dict[str, Any]) -> Any:
    """The window's boolean keep-mask from index arithmetic (works for torch and jax.numpy)."""
    i = lib.arange(n)[:, None]
    j = lib.arange(n)[None, :]
    g = options.get("global_tokens", 0)
    keep = (abs(i - j) <= options["window"]) | (i < g) | (j < g)
    if options.get("is_causal"):
        keep = keep & (j <= i)
    return keep


def _torch_window(torch, primals, options):
    keep = _window_keep(torch, primals[0].shape[-2], options)
    return torch_sdpa(torch, primals, {"mask": keep, "scale": options.get("scale")})


def _jax_window(jnp, primals, options):
    keep = _window_keep(jnp, primals[0].shape[-2], options)
    return jax_sdpa(jnp, primals, {"mask": keep, "scale": options.get("scale")})


_WINDOW_CASES = {
    "band": _window_make((2, 7, 2), window=2, block_size=3),
    "band_global": _window_make((1, 1, 8, 2), window=1, global_tokens=2, block_size=3),
    "causal_global_gqa": _window_make(
        (1, 2, 7, 2), window=2, global_tokens=3, is_causal=True, kv_heads=1, block_size=2
    ),
    "window_zero_2d": _window_make((7, 3), window=0, global_tokens=1, block_size=4),
}

for _name, _make in _WINDOW_CASES.items():
    register_case(
        Case(
            sliding_window_attention,
            _name,
            _make,
            torch_ref=_torch_window,
            jax_ref=_jax_window,
            tags=("efficient",),
        )
    )


# ----------------------------------------------------------------------------- linear attention


def _linear_make(
    q_shape: tuple[int, ...],
    *,
    n_k: int | None = None,
    kv_heads: int | None = None,
    **options: Any,
):
    def make(rng: np.random.Generator):
        *lead, n, d = q_shape
        kv_lead = [*lead[:-1], kv_heads if kv_heads is not None else lead[-1]] if lead else []
        nk = n if n_k is None else n_k
        q = rng.standard_normal(q_shape)
        k = rng.standard_normal((*kv_lead, nk, d))
        v = rng.standard_normal((*kv_lead, nk, d + 1))
        if options.get("feature_map") == "identity":  # keep the denominator away from 0
            q, k = np.abs(q) + 0.5, np.abs(k) + 0.5
        return (q, k, v), dict(options)

    return make


def _linear_reference(lib: Any, elu: Any, primals, options):
    """``(phi(Q) phi(K)^T [o L]) V / (rowsum(...) + eps)``, heads repeated for GQA."""
    q, k, v = primals
    if q.ndim >= 3 and k.shape[-3] != q.shape[-3]:
        g = q.shape[-3] // k.shape[-3]
        k = lib.repeat_heads(k, g)
        v = lib.repeat_heads(v, g)
    identity = options.get("feature_map") == "identity"
    qf = q if identity else elu(q) + 1.0
    kf = k if identity else elu(k) + 1.0
    a = qf @ lib.transpose_last(kf)
    if options.get("is_causal"):
        a = a * lib.tril_ones(q.shape[-2])
    eps = options.get("eps", 1e-6)
    return (a @ v) / (lib.sum_last(a) + eps)


class _TorchOps:
    def __init__(self, torch: Any) -> None:
        self.torch = torch

    def repeat_heads(self, x, g):
        return x.repeat_interleave(g, dim=-3)

    def transpose_last(self, x):
        return x.transpose(-2, -1)

    def tril_ones(self, n):
        return self.torch.tril(self.torch.ones((n, n), dtype=self.torch.float64))

    def sum_last(self, x):
        return x.sum(-1, keepdim=True)


class _JaxOps:
    def __init__(self, jnp: Any) -> None:
        self.jnp = jnp

    def repeat_heads(self, x, g):
        return self.jnp.repeat(x, g, axis=-3)

    def transpose_last(self, x):
        return self.jnp.swapaxes(x, -1, -2)

    def tril_ones(self, n):
        return self.jnp.tril(self.jnp.ones((n, n)))

    def sum_last(self, x):
        return x.sum(-1, keepdims=True)


def _torch_linear(torch, primals, options):
    return _linear_reference(_TorchOps(torch), torch.nn.functional.elu, primals, options)


def _jax_linear(jnp, primals, options):
    import jax

    return _linear_reference(_JaxOps(jnp), jax.nn.elu, primals, options)


_LINEAR_CASES = {
    "global": _linear_make((2, 6, 3), n_k=4),
    "global_gqa": _linear_make((1, 4, 5, 2), kv_heads=2),
    "causal_chunked": _linear_make((2, 7, 3), is_causal=True, chunk_size=3),
    "causal_2d_identity": _linear_make(
        (6, 2), is_causal=True, chunk_size=4, feature_map="identity"
    ),
}

for _name, _make in _LINEAR_CASES.items():
    register_case(
        Case(
            linear_attention,
            _name,
            _make,
            torch_ref=_torch_linear,
            jax_ref=_jax_linear,
            tags=("efficient",),
        )
    )
