r"""Gradient-weighted attention and head importance for a stack of refattn encoder layers.

For a scalar loss ``L`` of an encoder stack, treat each layer's attention weights ``A_{l,h}``
(before dropout, the tensor torch users call ``retain_grad()`` on) as a leaf. Since
``O_h = (A_h ∘ M_h) V_h`` (``M`` the dropout multipliers, 1 without dropout),

.. math::

    \frac{\partial L}{\partial A_h} = (dO_h\, V_h^\top) \circ M_h, \qquad
    \mathrm{Flow}_h = A_h \circ \Bigl|\frac{\partial L}{\partial A_h}\Bigr|
    \quad\text{(seed 002 §9.3)},

where ``dO_h`` is the cotangent of head ``h``'s output, which refattn's own backward computes
(:func:`refattn.layers.attention.mha_backward` hands it out through ``head_cotangents``). The
head importance of Michel et al. (2019) gates each head's output, ``O_h → ξ_h O_h`` at
``ξ_h = 1``:

.. math::

    \frac{\partial L}{\partial \xi_h} = \sum_{i,c} (dO_h)_{ic} (O_h)_{ic}, \qquad
    I_h = \mathbb{E}_x \Bigl|\frac{\partial L}{\partial \xi_h}\Bigr| ,

the mean over the batch of the absolute value per example (the paper's expectation over the
data). The gradients of a loss of several outputs (a cotangent ``dy`` of any shape) are those of
``L = ⟨dy, y⟩``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .._backend import check_floating, describe, namespace
from ..layers.attention import project_kv, split_heads
from ..layers.basic import affine_forward
from ..layers.transformer import encoder_backward, transformer_encoder_layer
from ..ops.sdpa import scaled_dot_product_attention

__all__ = ["AttentionGradients", "encoder_attention_gradients"]

Array = Any


@dataclass
class AttentionGradients:
    """The result of :func:`encoder_attention_gradients` (``L`` layers, heads ``H``).

    Attributes
    ----------
    output : (..., n, d_model) the stack's output ``y``.
    weights : (L, ..., H, n, n) each layer's attention weights ``A`` (before dropout).
    weight_cotangents : (L, ..., H, n, n) ``∂L/∂A`` with ``A`` a leaf.
    gradient_weighted : (L, ..., H, n, n) ``A ∘ |∂L/∂A|``.
    head_gradients : (L, ..., H) ``∂L/∂ξ_h`` per example.
    head_importance : (L, H) ``mean over the batch of |∂L/∂ξ_h|`` (Michel et al. 2019).
    input_gradient : (..., n, d_model) ``∂L/∂x``.
    param_gradients : list of L parameter trees, like the layers' parameters.
    """

    output: Array
    weights: Array
    weight_cotangents: Array
    gradient_weighted: Array
    head_gradients: Array
    head_importance: Array
    input_gradient: Array
    param_gradients: list[Any]


def _heads(xp: Any, sa: Any) -> tuple[Array, Array, Array, Array, Array]:
    """From a layer's saved self-attention: per-head ``(q, k, v, O, A)`` in the user layout,
    recomputed from the saved inputs with the same options (the forward's own arrays are in
    the kernel's internal layout)."""
    params = sa.params
    n_kv = int(params["key"]["weight"].shape[-1]) // sa.head_dim
    q = split_heads(xp, affine_forward(xp, params["query"], sa.query), sa.n_heads, sa.head_dim)
    k, v = project_kv(xp, params, sa.key, sa.value, n_kv, sa.head_dim)
    options = {**sa.sdpa_options, "return_weights": True, "implementation": "materialized"}
    o, a = scaled_dot_product_attention(q, k, v, sinks=params.get("sinks"), **options)
    return q, k, v, o, a


def encoder_attention_gradients(
    layers: Sequence[Any],
    x: Array,
    dy: Array,
    *,
    n_heads: int,
    n_kv_heads: int | None = None,
    mask: Array | None = None,
    bias: Array | None = None,
    is_causal: bool = False,
    norm_first: bool = False,
    activation: str = "relu",
    layer_norm_eps: float = 1e-5,
    dropout_masks: Sequence[dict[str, Array] | None] | None = None,
) -> AttentionGradients:
    r"""Forward and backward through ``L`` :func:`refattn.transformer_encoder_layer` calls,
    keeping each layer's attention weights, their cotangents and the head gates' gradients.

    Parameters
    ----------
    layers : sequence of L parameter trees of :func:`refattn.transformer_encoder_layer`
    x : (..., n, d_model)
    dy : (..., n, d_model)
        Cotangent of the stack's output: ``L = ⟨dy, y⟩`` (for a scalar loss of ``y``, its
        gradient).
    n_heads, n_kv_heads, mask, bias, is_causal, norm_first, activation, layer_norm_eps
        As in :func:`refattn.transformer_encoder_layer`, the same for every layer.
    dropout_masks : sequence of L dicts (or None), optional
        Each layer's ``dropout_masks``.

    Returns
    -------
    AttentionGradients
    """
    op = "encoder_attention_gradients"
    if not isinstance(layers, (list, tuple)) or not layers:
        raise TypeError(
            f"refattn.{op}: layers must be a non-empty sequence of encoder-layer parameter "
            f"trees, got {describe(layers)}"
        )
    xp = namespace(x, dy)
    check_floating(xp, f"{op}: dy", dy)
    if tuple(dy.shape) != tuple(x.shape):
        raise ValueError(
            f"refattn.{op}: dy must have x's shape {tuple(x.shape)} (the output's), got "
            f"{describe(dy)}"
        )
    if dropout_masks is not None and len(dropout_masks) != len(layers):
        raise ValueError(
            f"refattn.{op}: dropout_masks must have one entry per layer ({len(layers)}), got "
            f"{len(dropout_masks)}"
        )
    options = {
        "n_heads": n_heads,
        "n_kv_heads": n_kv_heads,
        "mask": mask,
        "bias": bias,
        "is_causal": is_causal,
        "norm_first": norm_first,
        "activation": activation,
        "layer_norm_eps": layer_norm_eps,
    }
    saved = []
    h = x
    for i, params in enumerate(layers):
        drops = None if dropout_masks is None else dropout_masks[i]
        h, s = transformer_encoder_layer.forward(params, h, dropout_masks=drops, **options)
        saved.append(s)
    y = h
    weights, cotangents, gates, grads = [], [], [], []
    d = dy
    for s in reversed(saved):
        taps: list[Array] = []
        g, d = encoder_backward(s, d, head_cotangents=taps)
        (d_o,) = taps
        sa = s.self_attention
        _, _, v, o, a = _heads(xp, sa)
        group = a.shape[-3] // v.shape[-3]
        v_q = xp.repeat(v, group, axis=-3) if group > 1 else v  # query head h reads kv head h // g
        d_a = d_o @ xp.matrix_transpose(v_q)
        drop = sa.sdpa_options.get("dropout_mask")
        if drop is not None:
            d_a = d_a * drop
        weights.append(a)
        cotangents.append(d_a)
        gates.append(xp.sum(d_o * o, axis=(-2, -1)))
        grads.append(g)
    for seq in (weights, cotangents, gates, grads):
        seq.reverse()
    weights_all, cot_all, gates_all = xp.stack(weights), xp.stack(cotangents), xp.stack(gates)
    batch_axes = tuple(range(1, gates_all.ndim - 1))
    importance = xp.mean(xp.abs(gates_all), axis=batch_axes) if batch_axes else xp.abs(gates_all)
    return AttentionGradients(
        output=y,
        weights=weights_all,
        weight_cotangents=cot_all,
        gradient_weighted=weights_all * xp.abs(cot_all),
        head_gradients=gates_all,
        head_importance=importance,
        input_gradient=d,
        param_gradients=grads,
    )
