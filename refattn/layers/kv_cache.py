r"""KV-cache incremental decoding for multi-head attention and transformer layers.

Causal self-attention lets position ``i`` see keys ``0..i`` only, so the keys and values of
earlier positions never change as the sequence grows. A :class:`KVCache` keeps them (after the
key/value projections, split into heads) in preallocated buffers; each decoding step projects
only the new tokens, appends their keys and values, and attends the new queries to everything
cached, with the causal mask aligned to the *end* of the cache (``causal_alignment=
"lower_right"``: new query ``i`` sits at absolute position ``length + i``). Every other part of
a transformer layer (layer norms, the feed-forward block, residuals) acts on each position
alone. Feeding a sequence in pieces of any size (one token at a time, or a prompt and then
single tokens) therefore gives the same outputs as the full causal pass, up to the order of
floating-point sums (agreement to ~1e-15 in float64).

These functions are forward-only (inference); training uses the full-sequence ops and their
vjps.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from .._backend import default_namespace, describe, namespace
from ..ops.sdpa.problem import check_score_options
from .attention import check_mha_params, mha_forward, project_kv
from .basic import (
    array_leaves,
    check_input,
    check_size,
    feed_forward_forward,
    layer_norm_forward,
    resolve_dtype,
)
from .transformer import (
    DECODER_SUBLAYERS,
    ENCODER_SUBLAYERS,
    check_layer_options,
    check_param_keys,
    check_sublayers,
)

__all__ = [
    "KVCache",
    "multi_head_attention_cached",
    "transformer_decoder_layer_cached",
    "transformer_encoder_layer_cached",
]

Array = Any
Params = dict[str, Any]


class KVCache:
    """Preallocated keys and values of one attention layer, for incremental decoding.

    Parameters
    ----------
    capacity : int
        Maximum number of positions.
    n_kv_heads, head_dim : int
        Key/value heads (fewer than the query heads for GQA/MQA: only these are stored) and
        their size.
    batch : tuple of int
        Leading batch axes of the sequences fed in (``()`` for unbatched ``(n, d_model)``).
    dtype : "float32", "float64" or a dtype of ``xp``
    xp : array namespace, optional
        NumPy by default.
    device : optional
        Where the buffers live.

    Attributes
    ----------
    length : int
        Positions filled so far.
    keys, values : (*batch, n_kv_heads, length, head_dim)
        Views of the filled part of the buffers.

    Appending past ``capacity`` raises ValueError and leaves the cache unchanged.
    """

    def __init__(
        self,
        capacity: int,
        n_kv_heads: int,
        head_dim: int,
        *,
        batch: tuple[int, ...] = (),
        dtype: Any = "float64",
        xp: ModuleType | None = None,
        device: Any = None,
    ) -> None:
        check_size("KVCache", "capacity", capacity)
        check_size("KVCache", "n_kv_heads", n_kv_heads)
        check_size("KVCache", "head_dim", head_dim)
        batch = tuple(batch)
        for b in batch:
            check_size("KVCache", "batch entries", b)
        self.xp = default_namespace() if xp is None else xp
        self.dtype = resolve_dtype(self.xp, dtype)
        self.capacity, self.n_kv_heads, self.head_dim, self.batch = (
            capacity,
            n_kv_heads,
            head_dim,
            batch,
        )
        shape = (*batch, n_kv_heads, capacity, head_dim)
        self._k = self.xp.zeros(shape, dtype=self.dtype, device=device)
        self._v = self.xp.zeros(shape, dtype=self.dtype, device=device)
        self.length = 0

    def __repr__(self) -> str:
        return (
            f"KVCache(length={self.length}, capacity={self.capacity}, n_kv_heads="
            f"{self.n_kv_heads}, head_dim={self.head_dim}, batch={self.batch}, dtype={self.dtype})"
        )

    @property
    def keys(self) -> Array:
        return self._k[..., : self.length, :]

    @property
    def values(self) -> Array:
        return self._v[..., : self.length, :]

    @property
    def remaining(self) -> int:
        return self.capacity - self.length

    def reset(self) -> None:
        """Forget every position (the buffers are reused)."""
        self.length = 0

    def check_room(self, n_new: int, *, op: str = "KVCache.append") -> None:
        """ValueError, before any change, unless ``n_new`` more positions fit."""
        if n_new > self.remaining:
            raise ValueError(
                f"refattn.{op}: the KV cache would overflow: it holds {self.length} of "
                f"{self.capacity} positions and {n_new} more were given; allocate a larger "
                "capacity or reset() it"
            )

    def append(self, k: Array, v: Array) -> tuple[Array, Array]:
        """Store ``k, v`` of shape ``(*batch, n_kv_heads, t, head_dim)``; return the filled views.

        Raises ValueError (overflow, shapes) or TypeError (dtype) before changing anything.
        """
        want = (*self.batch, self.n_kv_heads, None, self.head_dim)
        for name, x in (("k", k), ("v", v)):
            shape = tuple(getattr(x, "shape", ()))
            if len(shape) != len(want) or any(
                w is not None and s != w for s, w in zip(shape, want, strict=True)
            ):
                expected = "(" + ", ".join("t" if w is None else str(w) for w in want) + ")"
                raise ValueError(
                    f"refattn.KVCache.append: {name} must have shape {expected}, got {describe(x)}"
                )
            if x.dtype != self.dtype:
                raise TypeError(
                    f"refattn.KVCache.append: {name} must have the cache's dtype {self.dtype}, "
                    f"got {x.dtype}"
                )
        if k.shape[-2] != v.shape[-2]:
            raise ValueError(
                f"refattn.KVCache.append: k and v must add the same number of positions, got "
                f"{tuple(k.shape)} and {tuple(v.shape)}"
            )
        t = int(k.shape[-2])
        self.check_room(t)
        start = self.length
        self._k[..., start : start + t, :] = k
        self._v[..., start : start + t, :] = v
        self.length = start + t
        return self.keys, self.values


# ----------------------------------------------------------------------------- validation


def _check_cache(
    op: str,
    xp: ModuleType,
    cache: Any,
    name: str,
    *,
    batch: tuple[int, ...],
    n_kv_heads: int,
    head_dim: int,
    dtype: Any,
    n_new: int,
) -> None:
    if not isinstance(cache, KVCache):
        raise TypeError(
            f"refattn.{op}: {name} must be a refattn.KVCache, got {type(cache).__name__}"
        )
    if (cache.batch, cache.n_kv_heads, cache.head_dim) != (batch, n_kv_heads, head_dim):
        raise ValueError(
            f"refattn.{op}: {name} holds batch={cache.batch}, n_kv_heads={cache.n_kv_heads}, "
            f"head_dim={cache.head_dim}; the layer needs batch={batch}, n_kv_heads={n_kv_heads}, "
            f"head_dim={head_dim}"
        )
    if cache.dtype != dtype:
        raise TypeError(f"refattn.{op}: {name} has dtype {cache.dtype}, the inputs {dtype}")
    if cache.xp is not xp and namespace(cache.keys) is not xp:
        raise TypeError(f"refattn.{op}: {name} lives in another array library than the inputs")
    cache.check_room(n_new, op=op)


def _check_mask(op: str, xp: ModuleType, mask: Any, shape: tuple[int, ...], name: str) -> None:
    from ..ops.softmax import check_mask

    if mask is not None:
        check_mask(xp, f"{op}: {name}", mask, shape)


# ----------------------------------------------------------------------------- cached steps


def _self_attention_step(
    xp: ModuleType,
    params: Params,
    x: Array,
    cache: KVCache,
    heads: tuple[int, int, int],
    mask: Array | None,
    **score_options: Any,
) -> Array:
    """Project the new tokens' keys/values into ``cache`` and attend to all cached positions
    (``score_options``: window, softcap, sink tokens, on the lower-right diagonal)."""
    n_heads, n_kv_heads, head_dim = heads
    k_new, v_new = project_kv(xp, params, x, x, n_kv_heads, head_dim)
    keys, values = cache.append(k_new, v_new)
    y, _, _ = mha_forward(
        xp,
        params,
        x,
        None,
        None,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        mask=mask,
        is_causal=True,
        causal_alignment="lower_right",
        projected_kv=(keys, values),
        **score_options,
    )
    return y


def multi_head_attention_cached(
    params: Params,
    x: Array,
    cache: KVCache,
    /,
    *,
    n_heads: int,
    n_kv_heads: int | None = None,
    mask: Array | None = None,
    window: int | tuple[int | None, int | None] | None = None,
    sink_tokens: int = 0,
    softcap: float | None = None,
) -> Array:
    r"""Causal self-attention over new tokens ``x``, reusing and extending ``cache``.

    Equals rows ``L .. L+t-1`` of ``multi_head_attention(params, s, s, s, is_causal=True)``
    (with the same ``window``, ``sink_tokens``, ``softcap`` and sinks) for the whole sequence
    ``s`` so far, where ``L = cache.length`` before the call.

    Parameters
    ----------
    params : the MHA tree of :func:`refattn.multi_head_attention` (key/value read d_model).
    x : (*batch, t, d_model)
        The next ``t >= 1`` tokens.
    cache : KVCache
        ``batch``, ``n_kv_heads`` and ``head_dim = d_model // n_heads`` must match; it gains
        ``t`` positions. Overflow raises ValueError before anything changes.
    n_heads, n_kv_heads : int
    mask : bool, broadcastable to (*batch, n_heads, t, L + t), optional
        Extra keep-mask (e.g. padding), combined with the causal one.
    window, sink_tokens, softcap
        As in :func:`refattn.scaled_dot_product_attention`, aligned on the cache's end: a
        sliding window ``(w, 0)`` with StreamingLLM's ``sink_tokens`` is its decoding rule. The
        cache still holds every position (a window does not evict).
        A ``"sinks"`` entry in ``params`` (learnable sink logits) is used as in
        :func:`refattn.multi_head_attention`.

    Returns
    -------
    y : (*batch, t, d_model)
    """
    op = "multi_head_attention_cached"
    xp = namespace(x, mask, *array_leaves(params))
    check_input(op, xp, "x", x, min_ndim=2)
    d_model, t = int(x.shape[-1]), int(x.shape[-2])
    heads = check_mha_params(
        op,
        xp,
        params,
        "",
        d_model=d_model,
        d_k=d_model,
        d_v=d_model,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        dtype=x.dtype,
        sinks=True,
    )
    score_options = {"window": window, "sink_tokens": sink_tokens, "softcap": softcap}
    lead = tuple(x.shape[:-2])
    _check_cache(
        op,
        xp,
        cache,
        "cache",
        batch=lead,
        n_kv_heads=heads[1],
        head_dim=heads[2],
        dtype=x.dtype,
        n_new=t,
    )
    scores_shape = (*lead, heads[0], t, cache.length + t)
    _check_mask(op, xp, mask, scores_shape, "mask")
    check_score_options(
        op,
        xp,
        scores_shape,
        x.dtype,
        is_causal=True,
        causal_alignment="lower_right",
        **score_options,
    )
    return _self_attention_step(xp, params, x, cache, heads, mask, **score_options)


def transformer_encoder_layer_cached(
    params: Params,
    x: Array,
    cache: KVCache,
    /,
    *,
    n_heads: int,
    n_kv_heads: int | None = None,
    norm_first: bool = False,
    activation: str = "relu",
    layer_norm_eps: float = 1e-5,
) -> Array:
    """A causal encoder layer (decoder-only transformer block) over new tokens, with a KV cache.

    Equals the last ``t`` rows of ``transformer_encoder_layer(params, s, is_causal=True, ...)``
    on the whole sequence so far. Chain layers by passing each one's output to the next, each
    with its own cache.

    Parameters
    ----------
    params : as :func:`refattn.transformer_encoder_layer`
    x : (*batch, t, d_model)
    cache : KVCache of this layer's self-attention
    n_heads, n_kv_heads, norm_first, activation, layer_norm_eps
        As :func:`refattn.transformer_encoder_layer`.

    Returns
    -------
    y : (*batch, t, d_model)
    """
    op = "transformer_encoder_layer_cached"
    xp = namespace(x, *array_leaves(params))
    check_input(op, xp, "x", x, min_ndim=2)
    check_param_keys(op, params, ("self_attn", "norm1", "norm2", "linear1", "linear2"))
    d_model, t = int(x.shape[-1]), int(x.shape[-2])
    heads, _ = check_sublayers(
        op, xp, params, ENCODER_SUBLAYERS, d_model, n_heads, n_kv_heads, x.dtype
    )
    eps = check_layer_options(op, activation, layer_norm_eps, norm_first)
    _check_cache(
        op,
        xp,
        cache,
        "cache",
        batch=tuple(x.shape[:-2]),
        n_kv_heads=heads[1],
        head_dim=heads[2],
        dtype=x.dtype,
        n_new=t,
    )
    sa = params["self_attn"]
    if norm_first:
        n1, _ = layer_norm_forward(xp, params["norm1"], x, eps)
        h1 = x + _self_attention_step(xp, sa, n1, cache, heads, None)
        n2, _ = layer_norm_forward(xp, params["norm2"], h1, eps)
        f, _ = feed_forward_forward(xp, params, n2, activation, None)
        return h1 + f
    a = _self_attention_step(xp, sa, x, cache, heads, None)
    y1, _ = layer_norm_forward(xp, params["norm1"], x + a, eps)
    f, _ = feed_forward_forward(xp, params, y1, activation, None)
    y, _ = layer_norm_forward(xp, params["norm2"], y1 + f, eps)
    return y


def transformer_decoder_layer_cached(
    params: Params,
    x: Array,
    memory: Array | None,
    cache: KVCache,
    /,
    *,
    n_heads: int,
    n_kv_heads: int | None = None,
    memory_mask: Array | None = None,
    memory_cache: KVCache | None = None,
    norm_first: bool = False,
    activation: str = "relu",
    layer_norm_eps: float = 1e-5,
) -> Array:
    """A decoder layer over new target tokens, with a KV cache for its causal self-attention.

    Equals the last ``t`` rows of ``transformer_decoder_layer(params, s, memory,
    is_causal=True, ...)`` on the whole target sequence so far.

    Parameters
    ----------
    params : as :func:`refattn.transformer_decoder_layer`
    x : (*batch, t, d_model)
    memory : (*batch, n_m, d_memory), or None when ``memory_cache`` is already filled
    cache : KVCache of the self-attention
    memory_cache : KVCache, optional
        The cross-attention's projected memory. When given empty it is filled from ``memory``
        on this call, and later calls reuse it (then ``memory`` may be None). Without it the
        memory is projected on every call.
    memory_mask : bool, broadcastable to (*batch, n_heads, t, n_m), optional
        True = attend.
    n_heads, n_kv_heads, norm_first, activation, layer_norm_eps
        As :func:`refattn.transformer_decoder_layer`.

    Returns
    -------
    y : (*batch, t, d_model)
    """
    op = "transformer_decoder_layer_cached"
    xp = namespace(x, memory, memory_mask, *array_leaves(params))
    check_input(op, xp, "x", x, min_ndim=2)
    check_param_keys(
        op, params, ("self_attn", "cross_attn", "norm1", "norm2", "norm3", "linear1", "linear2")
    )
    d_model, t = int(x.shape[-1]), int(x.shape[-2])
    lead = tuple(x.shape[:-2])
    dtype = x.dtype
    heads, _ = check_sublayers(
        op, xp, params, DECODER_SUBLAYERS, d_model, n_heads, n_kv_heads, dtype
    )
    eps = check_layer_options(op, activation, layer_norm_eps, norm_first)
    filled = memory_cache is not None and memory_cache.length > 0
    if memory is None and not filled:
        raise ValueError(f"refattn.{op}: memory is required unless memory_cache is filled")
    if memory is not None:
        check_input(op, xp, "memory", memory, min_ndim=2)
        if tuple(memory.shape[:-2]) != lead or memory.dtype != dtype:
            raise ValueError(
                f"refattn.{op}: memory must share x's batch axes and dtype, got x "
                f"{describe(x)} and memory {describe(memory)}"
            )
    d_memory = (
        int(memory.shape[-1])
        if memory is not None
        else int(params["cross_attn"]["key"]["weight"].shape[0])
    )
    cross_heads = check_mha_params(
        op,
        xp,
        params["cross_attn"],
        "cross_attn",
        d_model=d_model,
        d_k=d_memory,
        d_v=d_memory,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        dtype=dtype,
    )
    _check_cache(
        op,
        xp,
        cache,
        "cache",
        batch=lead,
        n_kv_heads=heads[1],
        head_dim=heads[2],
        dtype=dtype,
        n_new=t,
    )
    if memory_cache is not None:
        n_fill = 0 if filled or memory is None else int(memory.shape[-2])
        _check_cache(
            op,
            xp,
            memory_cache,
            "memory_cache",
            batch=lead,
            n_kv_heads=cross_heads[1],
            head_dim=cross_heads[2],
            dtype=dtype,
            n_new=n_fill,
        )
    n_m = memory_cache.length if filled else int(memory.shape[-2])
    _check_mask(op, xp, memory_mask, (*lead, n_heads, t, n_m), "memory_mask")

    ca = params["cross_attn"]
    if memory_cache is not None and not filled:
        memory_cache.append(*project_kv(xp, ca, memory, memory, cross_heads[1], cross_heads[2]))
    if memory_cache is not None:
        memory_kv = (memory_cache.keys, memory_cache.values)
    else:
        memory_kv = project_kv(xp, ca, memory, memory, cross_heads[1], cross_heads[2])

    def cross(h: Array) -> Array:
        n_h, n_kv, hd = cross_heads
        y, _, _ = mha_forward(
            xp,
            ca,
            h,
            None,
            None,
            n_heads=n_h,
            n_kv_heads=n_kv,
            head_dim=hd,
            mask=memory_mask,
            projected_kv=memory_kv,
        )
        return y

    sa = params["self_attn"]
    if norm_first:
        n1, _ = layer_norm_forward(xp, params["norm1"], x, eps)
        h1 = x + _self_attention_step(xp, sa, n1, cache, heads, None)
        n2, _ = layer_norm_forward(xp, params["norm2"], h1, eps)
        h2 = h1 + cross(n2)
        n3, _ = layer_norm_forward(xp, params["norm3"], h2, eps)
        f, _ = feed_forward_forward(xp, params, n3, activation, None)
        return h2 + f
    a = _self_attention_step(xp, sa, x, cache, heads, None)
    y1, _ = layer_norm_forward(xp, params["norm1"], x + a, eps)
    y2, _ = layer_norm_forward(xp, params["norm2"], y1 + cross(y1), eps)
    f, _ = feed_forward_forward(xp, params, y2, activation, None)
    y, _ = layer_norm_forward(xp, params["norm3"], y2 + f, eps)
    return y
