r"""Transformer encoder and decoder layers (torch's ``nn.TransformerEncoderLayer`` and
``nn.TransformerDecoderLayer`` with ``batch_first=True``), with hand-derived gradients.

Post-LN (``norm_first=False``, the original transformer and torch's default) and pre-LN::

    encoder, post-LN                       encoder, pre-LN
    h1 = x  + D1(SA(x))                    h1 = x  + D1(SA(LN1(x)))
    y1 = LN1(h1)                           y  = h1 + D2(FF(LN2(h1)))
    y  = LN2(y1 + D2(FF(y1)))

    decoder, post-LN                       decoder, pre-LN
    y1 = LN1(x  + D1(SA(x)))               h1 = x  + D1(SA(LN1(x)))
    y2 = LN2(y1 + D2(CA(y1, m)))           h2 = h1 + D2(CA(LN2(h1), m))
    y  = LN3(y2 + D3(FF(y2)))              y  = h2 + D3(FF(LN3(h2)))

``SA(x) = MHA(x, x, x)`` (self-attention), ``CA(x, m) = MHA(x, m, m)`` (cross-attention to the
memory ``m``), ``FF(x) = linear2(D(act(linear1(x))))`` and ``D*`` are optional dropout
multipliers. Each backward is the forward read bottom-up: every residual connection ``h = a +
f(a)`` sends ``dh`` both straight to ``da`` and through ``f``'s VJP, and the self-attention's
input gradient is the sum of its query, key and value gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from .._backend import default_namespace, namespace
from .._op import Op
from ..ops.sdpa.problem import check_score_options
from .attention import (
    check_mha_inputs,
    check_mha_params,
    mha_backward,
    mha_forward,
    mha_params,
)
from .basic import (
    array_leaves,
    batch_first_view,
    batch_first_vjp,
    check_activation,
    check_eps,
    check_feed_forward,
    check_multiplier,
    check_norm,
    check_size,
    feed_forward_backward,
    feed_forward_forward,
    get_subtree,
    layer_norm_backward,
    layer_norm_forward,
    linear_params,
    resolve_dtype,
    swap_batch_and_sequence,
)

__all__ = [
    "DECODER_DROPOUT_KEYS",
    "ENCODER_DROPOUT_KEYS",
    "init_transformer_decoder_layer",
    "init_transformer_encoder_layer",
    "transformer_decoder_layer",
    "transformer_encoder_layer",
]

Array = Any
Params = dict[str, Any]

#: dropout_masks keys of the encoder layer (torch's submodule names)
ENCODER_DROPOUT_KEYS = ("self_attn", "dropout1", "dropout", "dropout2")
#: dropout_masks keys of the decoder layer; "cross_attn" is torch's ``multihead_attn.dropout``
DECODER_DROPOUT_KEYS = ("self_attn", "cross_attn", "dropout1", "dropout2", "dropout3", "dropout")


# ----------------------------------------------------------------------------- validation


def check_param_keys(op: str, params: Any, required: tuple[str, ...]) -> None:
    """``params`` is a dict with exactly the ``required`` keys, else a clear error."""
    if not isinstance(params, dict):
        raise TypeError(f"refattn.{op}: params must be a dict, got {type(params).__name__}")
    missing = [k for k in required if k not in params]
    if missing:
        raise ValueError(
            f"refattn.{op}: missing parameter(s) {missing} (expected keys {list(required)}, "
            f"got {sorted(params)})"
        )
    extra = sorted(set(params) - set(required))
    if extra:
        raise ValueError(f"refattn.{op}: unexpected parameter(s) {extra}")


def _dropout_multipliers(
    op: str,
    xp: ModuleType,
    dropout_masks: Any,
    allowed: tuple[str, ...],
    shapes: dict[str, tuple[int, ...]],
    dtype: Any,
) -> dict[str, Array | None]:
    """``{key: multiplier or None}`` for every key of ``allowed``, after checking them."""
    if dropout_masks is None:
        return dict.fromkeys(allowed)
    if not isinstance(dropout_masks, dict):
        raise TypeError(
            f"refattn.{op}: dropout_masks must be a dict (keys {list(allowed)}) or None, got "
            f"{type(dropout_masks).__name__}"
        )
    unknown = sorted(set(dropout_masks) - set(allowed))
    if unknown:
        raise ValueError(
            f"refattn.{op}: unknown dropout_masks key(s) {unknown}; allowed {list(allowed)}"
        )
    return {
        key: check_multiplier(
            op, xp, f"dropout_masks['{key}']", dropout_masks.get(key), shapes[key], dtype
        )
        for key in allowed
    }


def _times(x: Array, m: Array | None) -> Array:
    return x if m is None else x * m


# ----------------------------------------------------------------------------- residual stack

#: (norm, dropout) keys of each residual sublayer, in order: SA, FF
ENCODER_SUBLAYERS = (("norm1", "dropout1"), ("norm2", "dropout2"))
#: the decoder's: SA, CA, FF
DECODER_SUBLAYERS = (("norm1", "dropout1"), ("norm2", "dropout2"), ("norm3", "dropout3"))


@dataclass
class LayerSaved:
    """What a layer's forward keeps: its inputs' context and, per sublayer, ``(LN, f)``'s saves."""

    xp: ModuleType
    params: Params
    norm_first: bool
    activation: str
    drops: dict[str, Array | None]
    sublayers: tuple[tuple[str, str], ...]
    saved: list[tuple[Any, Any]]

    @property
    def self_attention(self) -> Any:
        """The self-attention's saved state (an :func:`~refattn.layers.attention.mha_forward`
        record), the first sublayer's."""
        return self.saved[0][1]


def residual_forward(
    xp: ModuleType,
    params: Params,
    x: Array,
    sublayers: tuple[tuple[str, str], ...],
    branches: tuple[Callable[[Array], tuple[Array, Any]], ...],
    *,
    norm_first: bool,
    eps: float,
    drops: dict[str, Array | None],
    activation: str,
) -> tuple[Array, LayerSaved]:
    """Run each branch ``f`` as a residual sublayer with its norm ``LN`` and dropout ``D``:
    ``h <- LN(h + D f(h))`` (post-LN) or ``h <- h + D f(LN(h))`` (pre-LN). ``activation`` is
    kept for the feed-forward's backward."""
    saved = []
    h = x
    for (norm, drop), f in zip(sublayers, branches, strict=True):
        if norm_first:
            n, ln = layer_norm_forward(xp, params[norm], h, eps)
            out, s = f(n)
            h = h + _times(out, drops[drop])
        else:
            out, s = f(h)
            h, ln = layer_norm_forward(xp, params[norm], h + _times(out, drops[drop]), eps)
        saved.append((ln, s))
    return h, LayerSaved(xp, params, norm_first, activation, drops, sublayers, saved)


def residual_backward(
    saved: LayerSaved,
    dy: Array,
    backwards: tuple[Callable[[Any, Array], tuple[Params, Array]], ...],
) -> tuple[list[Params], Params, Array]:
    """VJP of :func:`residual_forward`, sublayers last to first: ``(each f's parameter
    gradients, the norms' gradients by key, dx)``. ``backwards[i](s, d)`` is branch ``i``'s VJP,
    ``(dparams, dinput)``.

    Pre-LN, ``h' = h + D f(LN h)``: ``dh = dh' + LN^*(f^*(D dh'))``. Post-LN,
    ``h' = LN(h + D f(h))``: with ``dz = LN^*(dh')``, ``dh = dz + f^*(D dz)``.
    """
    xp, params, drops = saved.xp, saved.params, saved.drops
    branch_grads: list[Params] = []
    norm_grads: Params = {}
    dh = dy
    for (norm, drop), (ln, s), bwd in reversed(
        list(zip(saved.sublayers, saved.saved, backwards, strict=True))
    ):
        if saved.norm_first:
            g, dn = bwd(s, _times(dh, drops[drop]))
            norm_grads[norm], dh_ln = layer_norm_backward(xp, params[norm], ln, dn)
            dh = dh + dh_ln
        else:
            norm_grads[norm], dz = layer_norm_backward(xp, params[norm], ln, dh)
            g, d_in = bwd(s, _times(dz, drops[drop]))
            dh = dz + d_in
        branch_grads.append(g)
    branch_grads.reverse()
    return branch_grads, norm_grads, dh


# ----------------------------------------------------------------------------- sublayers


def _self_attention_fwd(
    xp: ModuleType, params: Params, x: Array, heads: tuple[int, int, int], **attn: Any
) -> tuple[Array, Any]:
    n_heads, n_kv_heads, head_dim = heads
    y, _w, saved = mha_forward(
        xp, params, x, x, x, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim, **attn
    )
    return y, saved


def _self_attention_bwd(
    saved: Any, dy: Array, head_cotangents: list[Array] | None = None
) -> tuple[Params, Array]:
    """Self-attention used its input three times: the input gradient is the sum of the three."""
    grads, dq, dk, dv = mha_backward(saved, dy, head_cotangents=head_cotangents)
    dq += dk  # dq is mha_backward's own fresh array
    dq += dv
    return grads, dq


def check_self_attn_params(
    op: str,
    xp: ModuleType,
    params: Params,
    d_model: int,
    n_heads: int,
    n_kv_heads: int | None,
    dtype: Any,
) -> Any:
    """Check ``params["self_attn"]`` as a ``d_model``-wide self-attention; return its heads."""
    return check_mha_params(
        op,
        xp,
        get_subtree(op, params, "self_attn", ""),
        "self_attn",
        d_model=d_model,
        d_k=d_model,
        d_v=d_model,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        dtype=dtype,
    )


def check_sublayers(
    op: str,
    xp: ModuleType,
    params: Params,
    sublayers: tuple[tuple[str, str], ...],
    d_model: int,
    n_heads: int,
    n_kv_heads: int | None,
    dtype: Any,
) -> tuple[tuple[int, int, int], int]:
    """The self-attention, the norms of ``sublayers`` and the feed-forward of a layer's
    ``params``: ``(heads, d_ff)``."""
    heads = check_self_attn_params(op, xp, params, d_model, n_heads, n_kv_heads, dtype)
    for key, _ in sublayers:
        check_norm(op, xp, params[key], key, d=d_model, dtype=dtype)
    return heads, check_feed_forward(op, xp, params, "", d_model=d_model, dtype=dtype)


def check_layer_options(op: str, activation: Any, layer_norm_eps: Any, norm_first: Any) -> float:
    """``activation``, ``layer_norm_eps`` (returned as a float) and ``norm_first``."""
    check_activation(op, activation)
    eps = check_eps(op, layer_norm_eps)
    if not isinstance(norm_first, bool):
        raise TypeError(f"refattn.{op}: norm_first must be a bool, got {norm_first!r}")
    return eps


# ----------------------------------------------------------------------------- encoder


def _encoder_fwd(
    params: Params,
    x: Array,
    /,
    *,
    n_heads: int,
    n_kv_heads: int | None = None,
    mask: Array | None = None,
    bias: Array | None = None,
    is_causal: bool = False,
    norm_first: bool = False,
    activation: str = "relu",
    layer_norm_eps: float = 1e-5,
    dropout_masks: dict[str, Array] | None = None,
    batch_first: bool = True,
) -> tuple[Array, Any]:
    r"""One transformer encoder layer (``nn.TransformerEncoderLayer``).

    Post-LN: ``y1 = LN1(x + SA(x))``, ``y = LN2(y1 + FF(y1))``; pre-LN (``norm_first=True``):
    ``h1 = x + SA(LN1(x))``, ``y = h1 + FF(LN2(h1))``, with dropout multipliers where torch has
    its dropout modules.

    Parameters
    ----------
    params : {"self_attn", "norm1", "norm2", "linear1", "linear2"}
        ``self_attn`` an MHA tree (:func:`refattn.multi_head_attention`), ``norm*``
        ``{"weight": (d_model,), "bias": (d_model,)}``, ``linear1`` ``(d_model, d_ff)`` and
        ``linear2`` ``(d_ff, d_model)`` affine maps.
    x : (..., n, d_model)
    n_heads : int
    n_kv_heads : int, optional
        GQA/MQA self-attention (default ``n_heads``).
    mask : bool, broadcastable to (..., n_heads, n, n), optional
        True = attend (torch's ``src_mask``/``src_key_padding_mask`` converted with
        ``refattn.from_torch_mha_masks``).
    bias : float, broadcastable to (..., n_heads, n, n), optional
        Added to the attention scores (torch's *float* ``src_mask``; the ``bias`` that
        ``from_torch_mha_masks`` returns for it).
    is_causal : bool
        Causal self-attention.
    norm_first : bool
    activation : {"relu", "gelu", "gelu_tanh"}
        ``"gelu"`` is the exact erf form (torch's ``activation="gelu"``).
    layer_norm_eps : float
    dropout_masks : dict, optional
        Explicit dropout *multipliers* (what torch's dropout multiplies by: 0 where dropped,
        ``1/(1-p)`` where kept), keyed by torch's module names:
        ``"self_attn"`` on the attention weights ``(..., n_heads, n, n)``, ``"dropout1"`` on the
        attention block's output ``(..., n, d_model)``, ``"dropout"`` on the feed-forward
        hidden activations ``(..., n, d_ff)``, ``"dropout2"`` on the feed-forward output
        ``(..., n, d_model)``. Absent keys mean no dropout there.
    batch_first : bool
        True (default): ``x`` is ``(..., batch, n, d_model)``. False: torch's default
        sequence-first ``(n, batch, d_model)``, and so are ``y`` and the dropout masks shaped
        like ``x``; attention masks keep their ``(batch, heads, n, n)`` layout.

    Returns
    -------
    y : (..., n, d_model)
    """
    op = "transformer_encoder_layer"
    xp = namespace(x, mask, bias, *array_leaves(params), *array_leaves(dropout_masks or {}))
    (x,) = batch_first_view(op, xp, batch_first, x=x)
    dropout_masks = _batch_first_masks(xp, dropout_masks, batch_first)
    check_param_keys(op, params, ("self_attn", "norm1", "norm2", "linear1", "linear2"))
    d_model, n = int(x.shape[-1]), int(x.shape[-2])
    dtype = x.dtype
    heads, d_ff = check_sublayers(
        op, xp, params, ENCODER_SUBLAYERS, d_model, n_heads, n_kv_heads, dtype
    )
    eps = check_layer_options(op, activation, layer_norm_eps, norm_first)
    lead = tuple(x.shape[:-2])
    scores = (*lead, heads[0], n, n)
    check_score_options(
        op,
        xp,
        scores,
        dtype,
        mask=mask,
        bias=bias,
        is_causal=is_causal,
        causal_alignment="upper_left",
        dropout_mask=None,
        dropout_p=0.0,
    )
    drops = _dropout_multipliers(
        op,
        xp,
        dropout_masks,
        ENCODER_DROPOUT_KEYS,
        {
            "self_attn": scores,
            "dropout1": tuple(x.shape),
            "dropout": (*lead, n, d_ff),
            "dropout2": tuple(x.shape),
        },
        dtype,
    )
    y, saved = encoder_forward(
        xp,
        params,
        x,
        heads=heads,
        mask=mask,
        bias=bias,
        is_causal=is_causal,
        norm_first=norm_first,
        activation=activation,
        eps=eps,
        drops=drops,
    )
    return (y if batch_first else swap_batch_and_sequence(xp, y)), saved


def _batch_first_masks(
    xp: ModuleType, dropout_masks: dict[str, Array] | None, batch_first: bool
) -> dict[str, Array] | None:
    """Sequence-first dropout masks of the block outputs and hidden activations, swapped to
    batch-first like ``x`` (the attention-weight masks have no sequence-first form)."""
    if batch_first or not dropout_masks:
        return dropout_masks
    return {
        key: m
        if key in ("self_attn", "cross_attn") or getattr(m, "ndim", 0) < 3
        else swap_batch_and_sequence(xp, m)
        for key, m in dropout_masks.items()
    }


def encoder_forward(
    xp: ModuleType,
    params: Params,
    x: Array,
    *,
    heads: tuple[int, int, int],
    mask: Array | None,
    bias: Array | None,
    is_causal: bool,
    norm_first: bool,
    activation: str,
    eps: float,
    drops: dict[str, Array | None],
) -> tuple[Array, LayerSaved]:
    """``(y, saved)`` of one encoder layer, no validation (``drops`` maps every dropout key)."""
    attn = {"mask": mask, "bias": bias, "is_causal": is_causal, "dropout_mask": drops["self_attn"]}
    branches = (
        lambda h: _self_attention_fwd(xp, params["self_attn"], h, heads, **attn),
        lambda h: feed_forward_forward(xp, params, h, activation, drops["dropout"]),
    )
    return residual_forward(
        xp,
        params,
        x,
        ENCODER_SUBLAYERS,
        branches,
        norm_first=norm_first,
        eps=eps,
        drops=drops,
        activation=activation,
    )


def encoder_backward(
    saved: LayerSaved, dy: Array, *, head_cotangents: list[Array] | None = None
) -> tuple[Params, Array]:
    """``(dparams, dx)`` of :func:`encoder_forward` (see :func:`_encoder_bwd`);
    ``head_cotangents`` as in :func:`~refattn.layers.attention.mha_backward`."""
    xp, params = saved.xp, saved.params

    def self_attention(s: Any, d: Array) -> tuple[Params, Array]:
        return _self_attention_bwd(s, d, head_cotangents)

    def feed_forward(s: Any, d: Array) -> tuple[Params, Array]:
        return feed_forward_backward(xp, params, s, d, saved.activation)

    (g_sa, g_ff), g_norms, dx = residual_backward(saved, dy, (self_attention, feed_forward))
    grads = {"self_attn": g_sa, **g_norms, **g_ff}
    return {k: grads[k] for k in params}, dx


def _encoder_bwd(saved: Any, dy: Array, /, *, batch_first: bool = True) -> tuple[Params, Array]:
    r"""VJP of the encoder layer: the forward read bottom-up.

    Post-LN, with ``h1 = x + D1 SA(x)``, ``y1 = LN1(h1)``, ``h2 = y1 + D2 FF(y1)``,
    ``y = LN2(h2)``:

    .. math::

        dh_2 &= \mathrm{LN}_2^*(dy), &
        dy_1 &= dh_2 + \mathrm{FF}^*(D_2\, dh_2), \\
        dh_1 &= \mathrm{LN}_1^*(dy_1), &
        dx &= dh_1 + (dq + dk + dv)\bigl|_{\mathrm{SA}^*(D_1\, dh_1)} .

    Pre-LN, with ``h1 = x + D1 SA(LN1 x)`` and ``y = h1 + D2 FF(LN2 h1)``:

    .. math::

        dh_1 = dy + \mathrm{LN}_2^*\bigl(\mathrm{FF}^*(D_2\, dy)\bigr),\qquad
        dx = dh_1 + \mathrm{LN}_1^*\bigl((dq + dk + dv)\bigl|_{\mathrm{SA}^*(D_1\, dh_1)}\bigr).

    ``f^*`` is the VJP of ``f`` (its parameter gradients are collected on the way), see
    :func:`refattn.layer_norm`, :func:`refattn.feed_forward` and
    :func:`refattn.multi_head_attention` for each piece. Sequence-first calls
    (``batch_first=False``) swap ``dy`` and ``dx`` around it.
    """
    return batch_first_vjp(encoder_backward, saved, dy, batch_first)


transformer_encoder_layer = Op(
    _encoder_fwd, _encoder_bwd, name="transformer_encoder_layer", register=True
)


# ----------------------------------------------------------------------------- decoder


def _decoder_fwd(
    params: Params,
    x: Array,
    memory: Array,
    /,
    *,
    n_heads: int,
    n_kv_heads: int | None = None,
    self_mask: Array | None = None,
    memory_mask: Array | None = None,
    self_bias: Array | None = None,
    memory_bias: Array | None = None,
    is_causal: bool = False,
    norm_first: bool = False,
    activation: str = "relu",
    layer_norm_eps: float = 1e-5,
    dropout_masks: dict[str, Array] | None = None,
    batch_first: bool = True,
) -> tuple[Array, Any]:
    r"""One transformer decoder layer (``nn.TransformerDecoderLayer``).

    Post-LN: ``y1 = LN1(x + SA(x))``, ``y2 = LN2(y1 + CA(y1, memory))``,
    ``y = LN3(y2 + FF(y2))``; pre-LN: ``h1 = x + SA(LN1 x)``, ``h2 = h1 + CA(LN2 h1, memory)``,
    ``y = h2 + FF(LN3 h2)``.

    Parameters
    ----------
    params : {"self_attn", "cross_attn", "norm1", "norm2", "norm3", "linear1", "linear2"}
        ``cross_attn`` is torch's ``multihead_attn``; its key/value weights have
        ``d_memory`` rows.
    x : (..., n_t, d_model)
        Target sequence.
    memory : (..., n_m, d_memory)
        Encoder output (``d_memory = d_model`` in torch).
    n_heads, n_kv_heads : int
        For both attentions.
    self_mask : bool, broadcastable to (..., n_heads, n_t, n_t), optional
        True = attend (torch's ``tgt_mask``, inverted).
    memory_mask : bool, broadcastable to (..., n_heads, n_t, n_m), optional
        True = attend (torch's ``memory_mask``; a memory key padding mask is
        ``mask[:, None, None, :]``).
    self_bias, memory_bias : float, broadcastable like the masks, optional
        Added to the self- and cross-attention scores (torch's *float* ``tgt_mask`` and
        ``memory_mask``).
    is_causal : bool
        Causal self-attention (torch's ``tgt_is_causal`` together with a causal ``tgt_mask``).
    norm_first, activation, layer_norm_eps
        As for :func:`refattn.transformer_encoder_layer`.
    dropout_masks : dict, optional
        Multipliers (0 or ``1/(1-p)``) keyed ``"self_attn"`` and ``"cross_attn"`` (attention
        weights), ``"dropout1"``, ``"dropout2"``, ``"dropout3"`` (block outputs, shaped like
        ``x``) and ``"dropout"`` (feed-forward hidden, ``(..., n_t, d_ff)``).
    batch_first : bool
        As for :func:`refattn.transformer_encoder_layer`; False makes ``x``, ``memory``, ``y``
        and the block-output dropout masks sequence-first.

    Returns
    -------
    y : (..., n_t, d_model). The vjp returns ``(dparams, dx, dmemory)``; ``dmemory`` sums the
    cross-attention's key and value gradients.
    """
    op = "transformer_decoder_layer"
    xp = namespace(
        x,
        memory,
        self_mask,
        memory_mask,
        self_bias,
        memory_bias,
        *array_leaves(params),
        *array_leaves(dropout_masks or {}),
    )
    x, memory = batch_first_view(op, xp, batch_first, x=x, memory=memory)
    dropout_masks = _batch_first_masks(xp, dropout_masks, batch_first)
    check_mha_inputs(op, xp, x, memory, memory, ("x", "memory", "memory"))
    check_param_keys(
        op, params, ("self_attn", "cross_attn", "norm1", "norm2", "norm3", "linear1", "linear2")
    )
    d_model, n_t, n_m = int(x.shape[-1]), int(x.shape[-2]), int(memory.shape[-2])
    dtype = x.dtype
    heads, d_ff = check_sublayers(
        op, xp, params, DECODER_SUBLAYERS, d_model, n_heads, n_kv_heads, dtype
    )
    cross_heads = check_mha_params(
        op,
        xp,
        params["cross_attn"],
        "cross_attn",
        d_model=d_model,
        d_k=int(memory.shape[-1]),
        d_v=int(memory.shape[-1]),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        dtype=dtype,
    )
    eps = check_layer_options(op, activation, layer_norm_eps, norm_first)
    lead = tuple(x.shape[:-2])
    self_scores = (*lead, n_heads, n_t, n_t)
    cross_scores = (*lead, n_heads, n_t, n_m)
    for name, m, b, shape, causal in (
        ("self_mask", self_mask, self_bias, self_scores, is_causal),
        ("memory_mask", memory_mask, memory_bias, cross_scores, False),
    ):
        check_score_options(
            op,
            xp,
            shape,
            dtype,
            mask=m,
            bias=b,
            is_causal=causal,
            causal_alignment="upper_left",
            dropout_mask=None,
            dropout_p=0.0,
            mask_name=name,
        )
    drops = _dropout_multipliers(
        op,
        xp,
        dropout_masks,
        DECODER_DROPOUT_KEYS,
        {
            "self_attn": self_scores,
            "cross_attn": cross_scores,
            "dropout1": tuple(x.shape),
            "dropout2": tuple(x.shape),
            "dropout3": tuple(x.shape),
            "dropout": (*lead, n_t, d_ff),
        },
        dtype,
    )
    y, saved = decoder_forward(
        xp,
        params,
        x,
        memory,
        heads=heads,
        cross_heads=cross_heads,
        self_mask=self_mask,
        memory_mask=memory_mask,
        self_bias=self_bias,
        memory_bias=memory_bias,
        is_causal=is_causal,
        norm_first=norm_first,
        activation=activation,
        eps=eps,
        drops=drops,
    )
    return (y if batch_first else swap_batch_and_sequence(xp, y)), saved


def _cross_attention_fwd(
    xp: ModuleType,
    params: Params,
    x: Array,
    memory: Array,
    heads: tuple[int, int, int],
    projected_kv: tuple[Array, Array] | None = None,
    **attn: Any,
) -> tuple[Array, Any]:
    n_heads, n_kv_heads, head_dim = heads
    y, _w, saved = mha_forward(
        xp,
        params,
        x,
        memory,
        memory,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        projected_kv=projected_kv,
        **attn,
    )
    return y, saved


def decoder_forward(
    xp: ModuleType,
    params: Params,
    x: Array,
    memory: Array,
    *,
    heads: tuple[int, int, int],
    cross_heads: tuple[int, int, int],
    self_mask: Array | None,
    memory_mask: Array | None,
    self_bias: Array | None,
    memory_bias: Array | None,
    is_causal: bool,
    norm_first: bool,
    activation: str,
    eps: float,
    drops: dict[str, Array | None],
) -> tuple[Array, LayerSaved]:
    """``(y, saved)`` of one decoder layer, no validation."""
    sa_opts = {
        "mask": self_mask,
        "bias": self_bias,
        "is_causal": is_causal,
        "dropout_mask": drops["self_attn"],
    }
    ca_opts = {"mask": memory_mask, "bias": memory_bias, "dropout_mask": drops["cross_attn"]}
    branches = (
        lambda h: _self_attention_fwd(xp, params["self_attn"], h, heads, **sa_opts),
        lambda h: _cross_attention_fwd(xp, params["cross_attn"], h, memory, cross_heads, **ca_opts),
        lambda h: feed_forward_forward(xp, params, h, activation, drops["dropout"]),
    )
    return residual_forward(
        xp,
        params,
        x,
        DECODER_SUBLAYERS,
        branches,
        norm_first=norm_first,
        eps=eps,
        drops=drops,
        activation=activation,
    )


def decoder_backward(saved: LayerSaved, dy: Array) -> tuple[Params, Array, Array]:
    """``(dparams, dx, dmemory)`` of :func:`decoder_forward` (see :func:`_decoder_bwd`)."""
    xp, params = saved.xp, saved.params
    d_memory: list[Array] = []

    def cross_attention(s: Any, d: Array) -> tuple[Params, Array]:
        grads, dq, dk, dv = mha_backward(s, d)
        d_memory.append(dk + dv)  # the memory is both the key and the value
        return grads, dq

    def feed_forward(s: Any, d: Array) -> tuple[Params, Array]:
        return feed_forward_backward(xp, params, s, d, saved.activation)

    (g_sa, g_ca, g_ff), g_norms, dx = residual_backward(
        saved, dy, (_self_attention_bwd, cross_attention, feed_forward)
    )
    grads = {"self_attn": g_sa, "cross_attn": g_ca, **g_norms, **g_ff}
    return {k: grads[k] for k in params}, dx, d_memory[0]


def _decoder_bwd(
    saved: Any, dy: Array, /, *, batch_first: bool = True
) -> tuple[Params, Array, Array]:
    r"""VJP of the decoder layer: the forward read bottom-up.

    Post-LN (``h1 = x + D1 SA(x)``, ``y1 = LN1 h1``, ``h2 = y1 + D2 CA(y1, m)``,
    ``y2 = LN2 h2``, ``h3 = y2 + D3 FF(y2)``, ``y = LN3 h3``):

    .. math::

        dh_3 &= \mathrm{LN}_3^*(dy), & dy_2 &= dh_3 + \mathrm{FF}^*(D_3\,dh_3),\\
        dh_2 &= \mathrm{LN}_2^*(dy_2), & dy_1 &= dh_2 + dq\bigl|_{\mathrm{CA}^*(D_2\,dh_2)},
        \quad dm = (dk + dv)\bigl|_{\mathrm{CA}^*(D_2\,dh_2)},\\
        dh_1 &= \mathrm{LN}_1^*(dy_1), &
        dx &= dh_1 + (dq + dk + dv)\bigl|_{\mathrm{SA}^*(D_1\,dh_1)} .

    Pre-LN is the same with each residual branch ``h_{i} = h_{i-1} + D_i f_i(LN_i h_{i-1})``
    contributing ``dh_{i-1} = dh_i + LN_i^*(f_i^*(D_i dh_i))``. The memory is both key and
    value of the cross-attention, so its gradient is the sum of those two.
    """
    return batch_first_vjp(decoder_backward, saved, dy, batch_first)


transformer_decoder_layer = Op(
    _decoder_fwd, _decoder_bwd, name="transformer_decoder_layer", register=True
)


# ----------------------------------------------------------------------------- init


def _norm(xp: ModuleType, d: int, bias: bool, dtype: Any) -> Params:
    p = {"weight": xp.ones((d,), dtype=dtype)}
    if bias:
        p["bias"] = xp.zeros((d,), dtype=dtype)
    return p


def init_transformer_encoder_layer(
    d_model: int,
    n_heads: int,
    *,
    dim_feedforward: int = 2048,
    n_kv_heads: int | None = None,
    bias: bool = True,
    seed: int = 0,
    xp: ModuleType | None = None,
    dtype: Any = "float64",
) -> Params:
    """Encoder-layer parameters with ``nn.TransformerEncoderLayer``'s init.

    ``self_attn`` as :func:`refattn.init_multi_head_attention`, ``linear1``/``linear2`` as
    ``nn.Linear`` (:math:`U(\\pm 1/\\sqrt{d_{in}})`), norms ones/zeros. ``bias=False`` drops
    every bias, as torch's ``bias=False`` does. Host RNG ``numpy.random.default_rng(seed)``.
    """
    import numpy as np  # host RNG for initial values only

    fn = "init_transformer_encoder_layer"
    check_size(fn, "d_model", d_model)
    check_size(fn, "dim_feedforward", dim_feedforward)
    xp = default_namespace() if xp is None else xp
    dt = resolve_dtype(xp, dtype)
    rng = np.random.default_rng(seed)
    return {
        "self_attn": mha_params(xp, rng, d_model, n_heads, n_kv_heads, d_model, d_model, bias, dt),
        "norm1": _norm(xp, d_model, bias, dt),
        "norm2": _norm(xp, d_model, bias, dt),
        "linear1": linear_params(xp, rng, d_model, dim_feedforward, bias, dt),
        "linear2": linear_params(xp, rng, dim_feedforward, d_model, bias, dt),
    }


def init_transformer_decoder_layer(
    d_model: int,
    n_heads: int,
    *,
    dim_feedforward: int = 2048,
    n_kv_heads: int | None = None,
    d_memory: int | None = None,
    bias: bool = True,
    seed: int = 0,
    xp: ModuleType | None = None,
    dtype: Any = "float64",
) -> Params:
    """Decoder-layer parameters with ``nn.TransformerDecoderLayer``'s init.

    As :func:`init_transformer_encoder_layer`, plus ``cross_attn`` (torch's
    ``multihead_attn``) whose key/value projections read ``d_memory`` features (default
    ``d_model``, torch's only choice) and ``norm3``.
    """
    import numpy as np  # host RNG for initial values only

    fn = "init_transformer_decoder_layer"
    check_size(fn, "d_model", d_model)
    check_size(fn, "dim_feedforward", dim_feedforward)
    d_memory = d_model if d_memory is None else check_size(fn, "d_memory", d_memory)
    xp = default_namespace() if xp is None else xp
    dt = resolve_dtype(xp, dtype)
    rng = np.random.default_rng(seed)
    return {
        "self_attn": mha_params(xp, rng, d_model, n_heads, n_kv_heads, d_model, d_model, bias, dt),
        "cross_attn": mha_params(
            xp, rng, d_model, n_heads, n_kv_heads, d_memory, d_memory, bias, dt
        ),
        "norm1": _norm(xp, d_model, bias, dt),
        "norm2": _norm(xp, d_model, bias, dt),
        "norm3": _norm(xp, d_model, bias, dt),
        "linear1": linear_params(xp, rng, d_model, dim_feedforward, bias, dt),
        "linear2": linear_params(xp, rng, dim_feedforward, d_model, bias, dt),
    }
