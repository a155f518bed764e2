r"""One SDPA call, validated: every option checked in one place, in the canonical layout.

:func:`prepare` turns the user's arguments into a :class:`Problem`: queries
``(B, Hkv, g, n_q, d_k)`` where ``g = Hq // Hkv`` query heads share one kv head, keys and values
``(B, Hkv, n_k, d)``, and every mask, bias and dropout multiplier reshaped to broadcast against
``(B, Hkv, g, n_q, n_k)`` without being expanded. Query head ``h`` is ``(h // g, h % g)``,
which is exactly "query head h uses kv head h // g": matmuls run on ``(B, Hkv, g * rows, ·)``,
so a GQA group shares its K and V without copying them, and the group's gradients accumulate
inside one GEMM.

Both kernels (:mod:`~refattn.ops.sdpa.materialized`, :mod:`~refattn.ops.sdpa.tiled`) take a
:class:`Problem` and nothing else; so do the sliding-window and linear-attention ops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..._backend import (
    describe,
    device_of,
    floating_dtype,
    itemsize,
    namespace,
    real_number,
    to_host,
)
from ..._op import Op
from ..masks import check_alignment
from ..softmax import check_broadcast, check_mask
from .plan import Lengths, Pattern, causal_pattern

__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "IMPLEMENTATIONS",
    "Problem",
    "check_block_size",
    "check_lengths",
    "check_score_options",
    "choose_implementation",
    "dropout_scale",
    "prepare",
]

Array = Any


@dataclass
class Problem:
    """A validated attention call in the canonical layout.

    Attributes
    ----------
    q : (B, Hkv, g, n_q, d_k)
    k : (B, Hkv, n_k, d_k)
    v : (B, Hkv, n_k, d_v)
    keep : bool, broadcastable to (B, Hkv, g, n_q, n_k), or None: the user's ``mask``
    pattern : :class:`~refattn.ops.sdpa.plan.Pattern` or None
        The structured part of the mask (causal), evaluated from indices tile by tile
        (:func:`~refattn.ops.sdpa.scores.masked_scores`), never stored as an array;
        :func:`~refattn.ops.sdpa.scores.full_keep` builds the whole mask for references.
    lengths : :class:`~refattn.ops.sdpa.plan.Lengths` or None
        Per-sequence lengths of a padded batch and each sequence's causal/window diagonal;
        then the kernels use each sequence's own rule, and ``pattern`` is only their union
        (its band width picks the default tile size).
    bias : broadcastable to (B, Hkv, g, n_q, n_k), or None
    sinks : (1, Hkv|1, g|1, 1) learnable sink logits, or None; ``sinks_shape`` the user's
    score_mod, mask_mod : FlexAttention-style modifiers (a :class:`refattn.Op` and a function of
        the indices), or None; applied in :func:`~refattn.ops.sdpa.scores.masked_scores`
    drop : dropout multiplier ``mask / (1 - p)`` broadcastable like ``bias``, or None
    scale : Python float
    softcap : Python float > 0, or None (no cap); ``softcap_input`` the caller's value (0, "off",
        included), which a positional (learnable) cap's gradient follows
    normalizer : "softmax", "sparsemax" or "entmax" (the latter two: materialized only)
    alpha : Python float in [1, 2] for "entmax", else None
    implementation : "materialized" or "tiled" ("auto" is resolved here)
    block_size : (block_q, block_k) or None, for the tiled kernels
    out_shape, lse_shape, weights_shape : shapes of the user-facing results
    q_shape, k_shape, v_shape : the user's input shapes (for gradients)
    """

    xp: Any
    q: Array
    k: Array
    v: Array
    keep: Array | None
    bias: Array | None
    drop: Array | None
    pattern: Pattern | None
    scale: float
    softcap: float | None
    normalizer: str
    alpha: float | None
    implementation: str
    block_size: tuple[int, int] | None
    q_shape: tuple[int, ...]
    k_shape: tuple[int, ...]
    v_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    lse_shape: tuple[int, ...]
    weights_shape: tuple[int, ...]
    lengths: Lengths | None = None
    sinks: Array | None = None
    sinks_shape: tuple[int, ...] | None = None
    bias_shape: tuple[int, ...] | None = None
    score_mod: Any = None
    mask_mod: Any = None
    softcap_input: Any = None

    @property
    def n_q(self) -> int:
        return int(self.q.shape[3])

    @property
    def n_k(self) -> int:
        return int(self.k.shape[2])

    def result(
        self, o: Array, weights: Array | None, lse: Array, *, return_lse: bool
    ) -> Array | tuple[Array, ...]:
        """The user-facing result from canonical ``O``, ``P`` (None if not requested), ``lse``:
        ``out``, or ``(out, weights?, lse?)``."""
        xp = self.xp
        extras = []
        if weights is not None:
            extras.append(xp.reshape(weights, self.weights_shape))
        if return_lse:
            extras.append(xp.reshape(lse, self.lse_shape))
        out = xp.reshape(o, self.out_shape)
        return (out, *extras) if extras else out

    def cotangents(
        self, cotangent: Any, *, return_weights: bool, return_lse: bool
    ) -> tuple[Array | None, Array | None, Array | None]:
        """Split a cotangent into canonical ``(dO, dP, dlse)``, None for absent parts."""
        xp = self.xp
        cts = list(cotangent) if isinstance(cotangent, tuple) else [cotangent]
        d_out = cts.pop(0)
        d_w = cts.pop(0) if return_weights else None
        d_lse = cts.pop(0) if return_lse else None
        rows = tuple(self.q.shape[:4])
        return (
            None if d_out is None else xp.reshape(d_out, (*rows, self.v.shape[-1])),
            None if d_w is None else xp.reshape(d_w, (*rows, self.n_k)),
            None if d_lse is None else xp.reshape(d_lse, rows),
        )

    def gradients(self, d_q: Array, d_k: Array, d_v: Array) -> tuple[Array, Array, Array]:
        """Canonical gradients back in the user's shapes."""
        xp = self.xp
        return (
            xp.reshape(d_q, self.q_shape),
            xp.reshape(d_k, self.k_shape),
            xp.reshape(d_v, self.v_shape),
        )

    def bias_gradient(self, grad: Array) -> Array:
        """A canonical bias gradient ``(B|1, Hkv|1, g|1, n_q|1, n_k|1)`` in the user's bias
        shape: summed over the axes that the user's bias broadcast."""
        xp = self.xp
        two_d = len(self.q_shape) == 2
        batch = () if two_d else tuple(self.q_shape[:-3])
        user = tuple(self.bias_shape)
        full = (1,) * ((2 if two_d else len(batch) + 3) - len(user)) + user
        heads = () if two_d else (1 if grad.shape[1] * grad.shape[2] == 1 else self.q_shape[-3],)
        lead = (1,) * len(batch) if grad.shape[0] == 1 else batch
        grad = xp.reshape(grad, (*lead, *heads, *grad.shape[3:]))
        axes = tuple(i for i, n in enumerate(full) if n == 1 and grad.shape[i] != 1)
        if axes:
            grad = xp.sum(grad, axis=axes, keepdims=True)
        return xp.reshape(grad, user)

    def softcap_gradient(self, grad: Array | None) -> Array | None:
        """A learnable cap's ``dc`` (0-d, from :class:`~.scores.ScoreGradients`) in the dtype
        of the caller's cap; 0 for a cap of 0 (off: the scores do not depend on it), None when
        none was given."""
        if self.softcap_input is None:
            return None
        xp = self.xp
        if grad is None:
            grad = xp.zeros((), dtype=self.q.dtype, device=device_of(self.q))
        dtype = getattr(self.softcap_input, "dtype", None)
        return grad if dtype is None or grad.dtype == dtype else xp.astype(grad, dtype)

    def add_sinks(self, lse: Array) -> tuple[Array, Array]:
        r"""The sink logits' share of each row: ``(lse', r)`` from the keys' ``lse``.

        A sink ``σ`` is one more logit in every row's softmax, with no value (gpt-oss):
        ``lse' = log(e^lse + e^σ)``, and every weight and output is multiplied by
        ``r = e^{lse - lse'}`` (0 for a row that sees no key: its output stays 0 and
        ``lse' = σ``). Both kernels compute without the sink and apply this at the end, so the
        LSE-recompute backward sees ``P = exp(S - lse')`` unchanged.
        """
        xp = self.xp
        new = xp.logaddexp(lse, self.sinks)  # (1, Hkv|1, g|1, 1) against (B, Hkv, g, n_q)
        empty = lse == -math.inf
        r = xp.where(empty, xp.zeros_like(lse), xp.exp(xp.where(empty, new, lse) - new))
        return new, r

    def sinks_gradient(
        self,
        o: Array,
        lse: Array,
        weights: Array | None,
        d_o: Array | None,
        d_w: Array | None,
        d_lse: Array | None,
    ) -> Array:
        r"""``dσ`` from canonical ``O``, ``lse`` (with the sinks), weights and cotangents.

        With :math:`p_{\sigma i} = e^{\sigma - \mathrm{lse}_i}` the sink's weight in row ``i``,
        ``O_i`` and every key weight scale as :math:`\partial/\partial\sigma = -p_{\sigma i}`,
        and :math:`\partial\,\mathrm{lse}_i / \partial\sigma = p_{\sigma i}`, so

        .. math::

            d\sigma = \sum_{b, i} p_{\sigma i}\,\bigl(d\ell_i - \Delta_i\bigr),\qquad
            \Delta_i = \textstyle\sum_c dO_{ic} O_{ic} + \sum_j P_{ij}\, dW_{ij},

        summed over the batch and the rows of each head: the sink's entry of the softmax VJP
        ``p (dp - Δ)`` with ``dp = dℓ`` (it has no value, hence no ``dO`` term).
        """
        xp = self.xp
        c = xp.zeros_like(lse)
        if d_o is not None:
            c = c + xp.sum(d_o * o, axis=-1)
        if d_w is not None:
            c = c + xp.sum(d_w * weights, axis=-1)
        if d_lse is not None:
            c = c - d_lse
        per_head = xp.sum(-xp.exp(self.sinks - lse) * c, axis=(0, 3))  # (Hkv, g)
        if math.prod(self.sinks_shape) == 1:
            return xp.reshape(xp.sum(per_head), self.sinks_shape)
        return xp.reshape(per_head, self.sinks_shape)


# ----------------------------------------------------------------------------- validation


def prepare(
    q: Array,
    k: Array,
    v: Array,
    *,
    mask: Array | None = None,
    bias: Array | None = None,
    sinks: Array | None = None,
    is_causal: bool = False,
    causal_alignment: str = "upper_left",
    window: Any = None,
    sink_tokens: int = 0,
    score_mod: Any = None,
    mask_mod: Any = None,
    query_lengths: Any = None,
    key_lengths: Any = None,
    scale: float | None = None,
    softcap: float | None = None,
    dropout_mask: Array | None = None,
    dropout_p: float = 0.0,
    normalizer: str = "softmax",
    alpha: float | None = None,
    return_weights: bool = False,
    return_lse: bool = False,
    implementation: str = "materialized",
    block_size: Any = None,
    memory_budget: int | None = None,
    op: str = "scaled_dot_product_attention",
) -> Problem:
    """Validate an attention call and put it in the canonical layout (no compute on scores).

    Every SDPA option is checked here, and only here: the op, the layers, the KV cache and the
    other kernels (sliding window, linear attention) all call this. A new score option is a
    validated field of :class:`Problem` plus one line in
    :func:`~refattn.ops.sdpa.scores.masked_scores` (and its derivative in the backwards).
    """
    xp = namespace(q, k, v, mask, bias, sinks, dropout_mask)
    dtype = floating_dtype(xp, {"q": q, "k": k, "v": v})
    if q.ndim < 2 or q.ndim != k.ndim or q.ndim != v.ndim:
        raise ValueError(
            f"refattn.{op}: q, k and v must have the same number of dimensions (at least 2: "
            f"(..., H, n, d) or (n, d)), got q {describe(q)}, k {describe(k)}, v {describe(v)}"
        )
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"refattn.{op}: k's last dimension (d_k) must equal q's, got q {tuple(q.shape)} and "
            f"k {tuple(k.shape)}"
        )
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(
            f"refattn.{op}: k and v must have the same number of keys (axis -2), got "
            f"k {tuple(k.shape)} and v {tuple(v.shape)}"
        )
    two_d = q.ndim == 2
    batch = tuple(q.shape[:-3])
    if tuple(k.shape[:-3]) != batch or tuple(v.shape[:-3]) != batch:
        raise ValueError(
            f"refattn.{op}: q, k and v must share their batch dimensions (all axes before the "
            f"head axis -3), got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    h_q = 1 if two_d else int(q.shape[-3])
    h_kv = 1 if two_d else int(k.shape[-3])
    if not two_d and v.shape[-3] != h_kv:
        raise ValueError(
            f"refattn.{op}: k and v must have the same number of heads (axis -3), got "
            f"k {tuple(k.shape)} and v {tuple(v.shape)}"
        )
    if h_kv == 0 or h_q % h_kv:
        raise ValueError(
            f"refattn.{op}: the number of query heads ({h_q}) must be a multiple of the number "
            f"of key/value heads ({h_kv}) for grouped-query attention"
        )
    g = h_q // h_kv
    n_q, d_k = int(q.shape[-2]), int(q.shape[-1])
    n_k, d_v = int(k.shape[-2]), int(v.shape[-1])
    scores_shape = (*batch, h_q, n_q, n_k) if not two_d else (n_q, n_k)
    scale = _check_scale(op, scale, d_k)
    softcap_input = softcap  # the caller's value (0, "off", included): for its gradient
    softcap, window = check_score_options(
        op,
        xp,
        scores_shape,
        dtype,
        mask=mask,
        bias=bias,
        is_causal=is_causal,
        causal_alignment=causal_alignment,
        window=window,
        sink_tokens=sink_tokens,
        softcap=softcap,
        dropout_mask=dropout_mask,
        dropout_p=dropout_p,
    )
    lengths = check_lengths(
        op,
        scores_shape,
        query_lengths,
        key_lengths,
        is_causal,
        causal_alignment,
        window,
        sink_tokens,
    )
    drop = _dropout_multiplier(xp, dropout_mask, dropout_p, dtype)
    blocks = check_block_size(block_size, op)
    alpha = _check_normalizer(op, normalizer, alpha, return_lse, implementation)
    _check_sinks(op, xp, sinks, h_q, dtype, normalizer)
    _check_modifiers(op, score_mod, mask_mod)
    chosen = choose_implementation(
        implementation,
        n_scores=math.prod(q.shape[:-1]) * n_k,
        elem_bytes=itemsize(xp, dtype),
        return_weights=return_weights or normalizer != "softmax",
        memory_budget=memory_budget,
    )

    b_flat = math.prod(batch)
    canon = _Canonicalizer(batch, h_q, h_kv, two_d, xp)
    return Problem(
        xp=xp,
        q=xp.reshape(q, (b_flat, h_kv, g, n_q, d_k)),
        k=xp.reshape(k, (b_flat, h_kv, n_k, d_k)),
        v=xp.reshape(v, (b_flat, h_kv, n_k, d_v)),
        keep=canon(mask) if mask is not None else None,
        bias=canon(bias) if bias is not None else None,
        drop=canon(drop) if drop is not None else None,
        pattern=causal_pattern(is_causal, causal_alignment, n_q, n_k, window, lengths, sink_tokens),
        lengths=lengths,
        sinks=None if sinks is None else xp.reshape(sinks, (1, *_head_axes(sinks, h_kv, g), 1)),
        sinks_shape=None if sinks is None else tuple(sinks.shape),
        bias_shape=None if bias is None else tuple(bias.shape),
        score_mod=score_mod,
        mask_mod=mask_mod,
        scale=scale,
        softcap=softcap,
        softcap_input=softcap_input,
        normalizer=normalizer,
        alpha=alpha,
        implementation=chosen,
        block_size=blocks,
        q_shape=tuple(q.shape),
        k_shape=tuple(k.shape),
        v_shape=tuple(v.shape),
        out_shape=(*tuple(q.shape[:-1]), d_v),
        lse_shape=tuple(q.shape[:-1]),
        weights_shape=scores_shape,
    )


def check_score_options(
    op: str,
    xp: Any,
    scores_shape: tuple[int, ...],
    dtype: Any,
    *,
    mask: Array | None = None,
    bias: Array | None = None,
    is_causal: Any = False,
    causal_alignment: Any = "upper_left",
    window: Any = None,
    sink_tokens: Any = 0,
    softcap: Any = None,
    dropout_mask: Array | None = None,
    dropout_p: Any = 0.0,
    mask_name: str = "mask",
) -> tuple[float | None, tuple[int | None, int | None] | None]:
    """Check the options that act on the scores against ``scores_shape``.

    Returns the normalized ``(softcap, window)``: None or a float > 0, None or a pair.

    The one validator of SDPA's score options: :func:`prepare` calls it, and so do the layers
    (MHA, encoder and decoder layers, the KV cache) before any projection is computed, with
    their own ``op`` name in the messages. ``scores_shape`` is ``(..., Hq, n_q, n_k)``; masks,
    bias and dropout masks must broadcast to it, and the bias must have the inputs' ``dtype``.
    """
    if not isinstance(is_causal, bool):
        raise TypeError(f"refattn.{op}: is_causal must be a bool, got {is_causal!r}")
    check_alignment(causal_alignment)
    cap = _check_softcap(op, softcap)
    window = _check_window(op, window)
    _check_sink_tokens(op, sink_tokens)
    if mask is not None:
        check_mask(xp, f"{op}: {mask_name}", mask, scores_shape)
    if bias is not None:
        check_broadcast(f"{op}: bias", bias, scores_shape)
        if bias.dtype != dtype:
            raise TypeError(
                f"refattn.{op}: bias must have the inputs' dtype {dtype}, got {bias.dtype}"
            )
    dropout_scale(op, dropout_p)
    if dropout_mask is not None:
        check_broadcast(f"{op}: dropout_mask", dropout_mask, scores_shape)
        if dropout_mask.dtype != xp.bool and not xp.isdtype(dropout_mask.dtype, "real floating"):
            raise TypeError(
                f"refattn.{op}: dropout_mask must be boolean or floating (1 = keep), "
                f"got {dropout_mask.dtype}"
            )
    elif float(dropout_p) > 0.0:
        raise ValueError(
            f"refattn.{op}: dropout_p={dropout_p} needs an explicit dropout_mask (True/1 = keep); "
            "refattn ops draw no random numbers"
        )
    return cap, window


def refuse_options(
    op: str, options: dict[str, Any], names: tuple[str, ...], advice: str, weights: str
) -> None:
    """ValueError for the first of ``names`` that ``options`` sets (not None), with ``advice``,
    and for ``return_weights`` (``weights`` says why): the SDPA options a wrapper of SDPA over
    another layout (packed, paged) cannot pass through."""
    for name in names:
        if options.get(name) is not None:
            raise ValueError(f"refattn.{op}: {name} is not an option here; {advice}")
    if options.get("return_weights"):
        raise ValueError(f"refattn.{op}: return_weights is not supported ({weights})")


def check_lengths(
    op: str,
    scores_shape: tuple[int, ...],
    query_lengths: Any,
    key_lengths: Any,
    is_causal: bool,
    causal_alignment: str,
    window: tuple[int | None, int | None] | None,
    sink_tokens: int = 0,
) -> Lengths | None:
    """The :class:`~refattn.ops.sdpa.plan.Lengths` of a padded batch, or None without lengths.

    ``query_lengths`` and ``key_lengths`` (either may be None: every row, every key) hold one
    int per batch element: shaped like the batch axes of ``scores_shape`` (or flat), a
    sequence, NumPy or any backend's integer array (read on the host: they decide the tile
    plan), each in ``[0, n_q]`` resp. ``[0, n_k]``. ``window`` is already normalized.
    """
    if query_lengths is None and key_lengths is None:
        return None
    batch = tuple(scores_shape[:-3])
    n_q, n_k = int(scores_shape[-2]), int(scores_shape[-1])
    q_len = _lengths(op, "query_lengths", query_lengths, batch, n_q)
    k_len = _lengths(op, "key_lengths", key_lengths, batch, n_k)
    if causal_alignment == "lower_right":
        offsets = tuple(k - q for q, k in zip(q_len, k_len, strict=True))
    else:
        offsets = (0,) * len(q_len)
    left, right = window if window is not None else (None, None)
    return Lengths(q_len, k_len, offsets, is_causal, left, right, sink_tokens)


def _lengths(op: str, name: str, value: Any, batch: tuple[int, ...], n: int) -> tuple[int, ...]:
    count = math.prod(batch)
    if value is None:
        return (n,) * count
    import numpy as np

    host = to_host(value)  # sequences and ints too
    shape = tuple(host.shape)
    if host.dtype == np.bool_ or not np.issubdtype(host.dtype, np.integer):
        raise TypeError(
            f"refattn.{op}: {name} must hold integers (one length per batch element), got "
            f"dtype {host.dtype}"
        )
    if shape != batch and shape != (count,):
        raise ValueError(
            f"refattn.{op}: {name} must have the batch shape {batch} (or {count} lengths, "
            f"batch axes flattened), got shape {shape}"
        )
    flat = [int(x) for x in host.reshape(-1)]
    bad = [x for x in flat if not 0 <= x <= n]
    if bad:
        raise ValueError(f"refattn.{op}: {name} must be in [0, {n}], got {bad[0]}")
    return tuple(flat)


def _check_window(op: str, window: Any) -> tuple[int | None, int | None] | None:
    """None; an int ``w >= 0`` for ``(w, w)``; or a pair ``(left, right)`` of ints >= 0 or None."""
    if window is None:
        return None
    pair = window if isinstance(window, (tuple, list)) else (window, window)

    def ok(w: Any) -> bool:
        return w is None or (isinstance(w, int) and not isinstance(w, bool) and w >= 0)

    if len(pair) != 2 or not all(ok(w) for w in pair):
        raise ValueError(
            f"refattn.{op}: window must be an int >= 0 or a pair (left, right) of ints >= 0 or "
            f"None (unbounded), got {window!r}"
        )
    left, right = pair
    return (None if left is None else int(left), None if right is None else int(right))


def _check_sink_tokens(op: str, sink_tokens: Any) -> None:
    """StreamingLLM's sink tokens: an int >= 0, the first keys kept through the ``window``."""
    if isinstance(sink_tokens, bool) or not isinstance(sink_tokens, int) or sink_tokens < 0:
        raise ValueError(
            f"refattn.{op}: sink_tokens must be an int >= 0 (the first keys every query sees "
            f"through its window), got {sink_tokens!r}"
        )


def _check_sinks(
    op: str, xp: Any, sinks: Array | None, h_q: int, dtype: Any, normalizer: str
) -> None:
    """Learnable sink logits: ``(Hq,)``, one per query head, or ``()``, one for all heads."""
    if sinks is None:
        return
    if tuple(sinks.shape) not in ((), (h_q,)):
        raise ValueError(
            f"refattn.{op}: sinks must have shape ({h_q},) (one logit per query head) or () "
            f"(one for all heads), got {describe(sinks)}"
        )
    if sinks.dtype != dtype:
        raise TypeError(
            f"refattn.{op}: sinks must have the inputs' dtype {dtype}, got {sinks.dtype}"
        )
    if normalizer != "softmax":
        raise ValueError(
            f"refattn.{op}: sinks are softmax logits; normalizer={normalizer!r} has none"
        )


def _check_modifiers(op: str, score_mod: Any, mask_mod: Any) -> None:
    """``score_mod`` a :class:`refattn.Op` (its backward is the modifier's derivative, which
    the kernels need), ``mask_mod`` a callable."""
    if score_mod is not None and not isinstance(score_mod, Op):
        raise TypeError(
            f"refattn.{op}: score_mod must be a refattn.Op (score, /, *, b, h, i, j) -> score "
            "with its backward, refattn.Op(forward, backward); got "
            f"{type(score_mod).__name__}: a function without a backward cannot be "
            "differentiated (wrap a pure mask in mask_mod instead)"
        )
    if mask_mod is not None and not callable(mask_mod):
        raise TypeError(
            f"refattn.{op}: mask_mod must be a function (b, h, i, j) -> bool array, got "
            f"{type(mask_mod).__name__}"
        )


def _head_axes(sinks: Array, h_kv: int, g: int) -> tuple[int, int]:
    """Canonical head axes ``(Hkv|1, g|1)`` of the sink logits."""
    return (1, 1) if sinks.ndim == 0 or h_kv * g == 1 else (h_kv, g)


def _check_scale(op: str, scale: Any, d_k: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(d_k) if d_k else 1.0
    return real_number(op, "scale", scale)


def _check_normalizer(
    op: str, normalizer: Any, alpha: Any, return_lse: bool, implementation: Any
) -> float | None:
    """The normalizer and its α; the sparse ones have no LSE and run materialized only.

    Their row threshold needs the whole row of scores, which the tiled kernel never holds.
    """
    if normalizer not in ("softmax", "sparsemax", "entmax"):
        raise ValueError(
            f"refattn.{op}: normalizer must be 'softmax', 'sparsemax' or 'entmax', "
            f"got {normalizer!r}"
        )
    if normalizer != "entmax":
        if alpha is not None:
            raise ValueError(
                f"refattn.{op}: alpha is for normalizer='entmax' only, got "
                f"normalizer={normalizer!r}"
            )
        if normalizer == "softmax":
            return None
    if return_lse:
        raise ValueError(
            f"refattn.{op}: return_lse needs normalizer='softmax' ({normalizer} has no LSE)"
        )
    if implementation == "tiled":
        raise ValueError(
            f"refattn.{op}: normalizer={normalizer!r} runs on the materialized kernel only "
            "(its threshold needs whole rows of scores), got implementation='tiled'"
        )
    if normalizer == "sparsemax":
        return None
    value = 1.5 if alpha is None else alpha
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"refattn.{op}: alpha must be a real number in [1, 2] (a learnable α: compose with "
            f"refattn.entmax), got {alpha!r}"
        )
    if not 1.0 <= float(value) <= 2.0:
        raise ValueError(f"refattn.{op}: alpha must be in [1, 2], got {alpha!r}")
    return float(value)


def _check_softcap(op: str, softcap: Any) -> float | None:
    """None or 0 (FlashAttention's "off") give None; otherwise a finite float > 0."""
    if softcap is None:
        return None
    value = real_number(op, "softcap", softcap)
    if value == 0.0:
        return None
    if not value > 0.0:
        raise ValueError(
            f"refattn.{op}: softcap must be a finite number > 0 (0 or None: no cap), "
            f"got {softcap!r}"
        )
    return value


def dropout_scale(op: str, dropout_p: Any) -> float:
    """``1 / (1 - dropout_p)`` after checking ``0 <= dropout_p < 1``."""
    try:
        p = float(dropout_p)
    except (TypeError, ValueError):
        raise TypeError(f"refattn.{op}: dropout_p must be a float, got {dropout_p!r}") from None
    if not 0.0 <= p < 1.0:
        raise ValueError(f"refattn.{op}: dropout_p must be in [0, 1), got {dropout_p!r}")
    return 1.0 / (1.0 - p)


def _dropout_multiplier(
    xp: Any, dropout_mask: Array | None, dropout_p: float, dtype: Any
) -> Array | None:
    """``dropout_mask / (1 - p)`` in ``dtype`` (checked by :func:`check_score_options`)."""
    if dropout_mask is None:
        return None
    return xp.astype(dropout_mask, dtype) * (1.0 / (1.0 - float(dropout_p)))


class _Canonicalizer:
    """Reshape an array broadcastable to ``(*batch, Hq, n_q, n_k)`` canonically.

    The result has shape ``(B|1, Hkv|1, g|1, n_q|1, n_k|1)``.
    """

    def __init__(self, batch: tuple[int, ...], h_q: int, h_kv: int, two_d: bool, xp: Any) -> None:
        self.batch, self.h_q, self.h_kv, self.two_d, self.xp = batch, h_q, h_kv, two_d, xp

    def __call__(self, x: Array) -> Array:
        xp = self.xp
        full_ndim = 2 if self.two_d else len(self.batch) + 3
        x = xp.reshape(x, (1,) * (full_ndim - x.ndim) + tuple(x.shape))
        if self.two_d:
            return xp.reshape(x, (1, 1, 1, *x.shape))
        nb = len(self.batch)
        lead = tuple(x.shape[:nb])
        if any(s != 1 for s in lead):
            x = xp.broadcast_to(x, (*self.batch, *x.shape[nb:]))
            b = math.prod(self.batch)
        else:
            b = 1
        heads, rows, cols = x.shape[nb:]
        if heads == 1:
            h = (1, 1)
        else:
            h = (self.h_kv, self.h_q // self.h_kv)
        return xp.reshape(x, (b, *h, rows, cols))


def check_block_size(block_size: Any, op: str) -> tuple[int, int] | None:
    """Validate ``block_size``: None, a positive int, or a pair ``(block_q, block_k)``."""
    if block_size is None:
        return None
    pair = block_size if isinstance(block_size, (tuple, list)) else (block_size, block_size)
    ok = len(pair) == 2 and all(
        isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in pair
    )
    if not ok:
        raise ValueError(
            f"refattn.{op}: block_size must be a positive int or a pair (block_q, block_k) of "
            f"positive ints, got {block_size!r}"
        )
    return int(pair[0]), int(pair[1])


IMPLEMENTATIONS = ("auto", "materialized", "tiled")
#: bytes of scores ``implementation="auto"`` materializes before switching to "tiled". Small on
#: purpose: past a few MiB of scores the tiled kernels (cache-sized tiles, no n x n store) are also
#: the faster ones on the CPU (docs/efficient.md), so "auto" keeps the materialized path for
#: small problems, where its single pass is cheapest.
DEFAULT_MEMORY_BUDGET = 4 * 2**20


def choose_implementation(
    implementation: str,
    *,
    n_scores: int,
    elem_bytes: int,
    return_weights: bool = False,
    memory_budget: int | None = None,
) -> str:
    """Validate the implementation options and resolve "auto" to "materialized" or "tiled".

    "auto" is "tiled" when the call's ``n_scores`` scores (batch, heads and query rows times
    keys) of ``elem_bytes`` each exceed ``memory_budget`` bytes (default
    :data:`DEFAULT_MEMORY_BUDGET`), and "materialized" otherwise or when weights are requested.
    """
    op = "refattn.scaled_dot_product_attention"
    if not isinstance(implementation, str) or implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"{op}: implementation must be one of {', '.join(map(repr, IMPLEMENTATIONS))}, "
            f"got {implementation!r}"
        )
    if memory_budget is None:
        budget = DEFAULT_MEMORY_BUDGET
    elif isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, float)):
        raise TypeError(f"{op}: memory_budget must be a number of bytes, got {memory_budget!r}")
    elif not memory_budget >= 0:
        raise ValueError(f"{op}: memory_budget must be >= 0 bytes, got {memory_budget!r}")
    else:
        budget = memory_budget
    if implementation != "auto":
        return implementation
    if return_weights:
        return "materialized"
    return "tiled" if n_scores * elem_bytes > budget else "materialized"
