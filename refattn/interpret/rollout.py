r"""Attention rollout (Abnar & Zuidema 2020, seed 002 §9.2), with its backward.

Per layer ``l`` the heads' weights ``A_{l,h}`` (``n × n`` self-attention, rows = queries) are
fused, the residual connection is added as an identity, and the rows are renormalised:

.. math::

    F_l = \mathrm{fuse}_h A_{l,h}, \qquad
    T_l = r\, I + (1 - r)\, F_l, \qquad
    \tilde A_l = T_l / \mathrm{rowsum}(T_l), \qquad
    R = \tilde A_L \tilde A_{L-1} \cdots \tilde A_1 .

``R_{ij}`` is how much input token ``j`` (layer 0) reaches output token ``i`` (layer ``L``).

Choices, and where they come from
    * Order: ``Ã_L ⋯ Ã_1`` as in the paper (``Ã(l_i) = A(l_i) Ã(l_{i-1})``), Abnar's code and
      jacobgil's vit-explain (``result = a @ result`` from the first layer up). Seed 002 writes
      ``Ã_1 ⋯ Ã_L``, which is the transpose of this for symmetric maps only: it is wrong.
    * ``residual=0.5`` is the paper's ``0.5 I + 0.5 A``; both reference codes renormalise the
      rows afterwards (a no-op for mean-fused stochastic rows, not for max/min fusion, discarded
      entries or fully masked rows), so refattn does too, and differentiates it.
    * ``head_fusion`` "mean" (the paper), "max" and "min" (vit-explain); ``discard_ratio``
      (vit-explain): in each fused map the ``floor(ratio · n²)`` smallest entries are set to 0
      before the identity is added (ties broken by position; vit-explain additionally spares the
      flat index 0, its CLS-to-CLS entry; refattn spares nothing).

Backward (the forward read backwards). With ``R_l = Ã_l R_{l-1}``, ``R_0 = I``, and ``dR_L`` the
cotangent: ``dÃ_l = dR_l R_{l-1}^T``, ``dR_{l-1} = Ã_l^T dR_l``. Through the renormalisation
``Ã = T/s``, ``s = rowsum(T)``: ``dT = (dÃ - rowsum(dÃ ∘ Ã)) / s`` (rows with ``s = 0`` get 0).
Then ``dF = (1 - r) dT`` (0 at discarded entries), and ``dA_h = dF / H`` for "mean", ``dF`` at
the head that attains the max/min (the first one on ties, as ``torch.max``) for "max"/"min".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .._backend import describe, device_of, namespace, real_number
from .._op import Op
from ._checks import as_layers, check_weights

__all__ = ["attention_rollout", "augmented_attention"]

Array = Any

FUSIONS = ("mean", "max", "min")


def check_options(
    op: str, residual: Any, head_fusion: Any, discard_ratio: Any
) -> tuple[float, float]:
    r = real_number(op, "residual", residual)
    if not 0.0 <= r <= 1.0:
        raise ValueError(f"refattn.{op}: residual must lie in [0, 1], got {residual!r}")
    if head_fusion not in FUSIONS:
        raise ValueError(f"refattn.{op}: head_fusion must be one of {FUSIONS}, got {head_fusion!r}")
    ratio = real_number(op, "discard_ratio", discard_ratio)
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"refattn.{op}: discard_ratio must lie in [0, 1), got {discard_ratio!r}")
    return r, ratio


def check_layers(
    op: str, weights_per_layer: Any, check_rows: Any = True
) -> tuple[Any, list[Array]]:
    """``(xp, layers)``: L arrays (..., H, n, n), each row-stochastic (or fully masked)."""
    if not isinstance(check_rows, bool):
        raise TypeError(f"refattn.{op}: check_rows must be a bool, got {check_rows!r}")
    layers = as_layers(op, weights_per_layer)
    xp = namespace(*layers)
    for i, w in enumerate(layers):
        if w.ndim < 3 or w.shape[-1] != w.shape[-2]:
            raise ValueError(
                f"refattn.{op}: layer {i}'s weights must be (..., H, n, n) self-attention, got "
                f"{describe(w)}"
            )
        check_weights(xp, op, f"weights of layer {i}", w, rows=check_rows)
    return xp, layers


def fuse_heads(xp: Any, a: Array, head_fusion: str, ratio: float) -> tuple[Array, Any]:
    """``F = fuse_h A`` (..., n, n) with the discarded entries zeroed; residuals for the VJP."""
    if head_fusion == "mean":
        f, pick = xp.mean(a, axis=-3), None
    else:
        pick = (xp.argmax if head_fusion == "max" else xp.argmin)(a, axis=-3, keepdims=True)
        f = xp.take_along_axis(a, pick, axis=-3)[..., 0, :, :]
    keep = None
    n = int(f.shape[-1])
    drop = math.floor(ratio * n * n)
    if drop:
        flat = xp.reshape(f, (*f.shape[:-2], n * n))
        order = xp.argsort(flat, axis=-1, stable=True)
        rank = xp.argsort(order, axis=-1, stable=True)  # rank of each entry, 0 = smallest
        keep = xp.reshape(rank >= drop, tuple(f.shape))
        f = xp.where(keep, f, xp.zeros_like(f))
    return f, (pick, keep)


def add_residual(xp: Any, f: Array, r: float) -> tuple[Array, Array]:
    """``(Ã, s)``: ``T = r I + (1 - r) F`` with its rows renormalised, and ``s = rowsum(T)``."""
    n = int(f.shape[-1])
    eye = xp.eye(n, dtype=f.dtype, device=device_of(f))
    t = r * eye + (1.0 - r) * f
    s = xp.sum(t, axis=-1, keepdims=True)
    safe = xp.where(s > 0, s, xp.ones_like(s))
    return xp.where(s > 0, t / safe, xp.zeros_like(t)), s


def augmented_attention(
    weights: Array, *, residual: float = 0.5, head_fusion: str = "mean", discard_ratio: float = 0.0
) -> Array:
    r"""One layer's ``Ã = rownorm(r I + (1 - r) fuse_h A)``: (..., H, n, n) -> (..., n, n).

    The layer matrix of :func:`attention_rollout` and the capacities of
    :func:`refattn.interpret.attention_flow` (module docstring for the options).
    """
    op = "augmented_attention"
    r, ratio = check_options(op, residual, head_fusion, discard_ratio)
    xp, (w,) = check_layers(op, [weights])
    f, _ = fuse_heads(xp, w, head_fusion, ratio)
    return add_residual(xp, f, r)[0]


def _rollout_fwd(
    weights_per_layer: Sequence[Array] | Array,
    /,
    *,
    residual: float = 0.5,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    check_rows: bool = True,
) -> tuple[Array, Any]:
    r"""Attention rollout ``R = Ã_L ⋯ Ã_1`` (Abnar & Zuidema 2020).

    Parameters
    ----------
    weights_per_layer : one array (L, ..., H, n, n), or a sequence of L arrays (..., H, n, n)
        Self-attention weights of each layer, first layer first; rows non-negative summing to 1
        (or 0 for a fully masked row). The gradient has the same structure.
    residual : float in [0, 1]
        Weight ``r`` of the identity (the residual connection); 0.5 in the paper.
    head_fusion : {"mean", "max", "min"}
    discard_ratio : float in [0, 1)
        Fraction of each fused map's smallest entries set to 0 (vit-explain).
    check_rows : bool
        Check that every row sums to 1 or 0 (default); False takes any non-negative weights
        (the formula renormalises the rows anyway).

    Returns
    -------
    R : (..., n, n), row-stochastic; ``R[..., i, j]`` the share of output token ``i`` that
        rolls out to input token ``j``.
    """
    op = "attention_rollout"
    r, ratio = check_options(op, residual, head_fusion, discard_ratio)
    xp, layers = check_layers(op, weights_per_layer, check_rows)
    n = int(layers[0].shape[-1])
    rollout = xp.broadcast_to(
        xp.eye(n, dtype=layers[0].dtype, device=device_of(layers[0])),
        (*layers[0].shape[:-3], n, n),
    )
    saved = []
    for w in layers:
        f, fused = fuse_heads(xp, w, head_fusion, ratio)
        a, s = add_residual(xp, f, r)
        saved.append((rollout, a, s, fused, int(w.shape[-3])))
        rollout = a @ rollout
    stacked = hasattr(weights_per_layer, "ndim")
    return rollout, (saved, r, head_fusion, stacked, type(weights_per_layer))


def _rollout_bwd(residuals: Any, d_rollout: Array, /) -> tuple[Any]:
    r"""VJP of the rollout, layer by layer from the top (derivation in the module docstring)."""
    saved, r, head_fusion, stacked, kind = residuals
    xp = namespace(d_rollout)
    grads = []
    d_r = d_rollout
    for below, a, s, (pick, keep), n_heads in reversed(saved):
        d_a = d_r @ xp.matrix_transpose(below)
        d_r = xp.matrix_transpose(a) @ d_r
        safe = xp.where(s > 0, s, xp.ones_like(s))
        d_t = xp.where(s > 0, (d_a - xp.sum(d_a * a, axis=-1, keepdims=True)) / safe, 0.0)
        d_f = (1.0 - r) * d_t
        if keep is not None:
            d_f = xp.where(keep, d_f, xp.zeros_like(d_f))
        if head_fusion == "mean":
            d_w = xp.broadcast_to(
                xp.expand_dims(d_f / n_heads, axis=-3), (*d_f.shape[:-2], n_heads, *d_f.shape[-2:])
            )
            d_w = xp.asarray(d_w, copy=True)
        else:
            heads = xp.reshape(xp.arange(n_heads, device=device_of(d_f)), (n_heads, 1, 1))
            d_w = xp.where(heads == pick, xp.expand_dims(d_f, axis=-3), 0.0)
        grads.append(d_w)
    grads.reverse()
    return (xp.stack(grads) if stacked else kind(grads),)


attention_rollout = Op(_rollout_fwd, _rollout_bwd, name="attention_rollout", register=True)
