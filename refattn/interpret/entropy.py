r"""Attention entropy: how spread out each query's attention is (seed 002 §12.2).

.. math::

    H_i = -\sum_j p_{ij} \log p_{ij}, \qquad 0 \log 0 = 0,

in nats, for each row ``p_i`` of the attention weights. ``H_i = 0`` for a one-hot row and
``log n_k`` for a uniform one. The seed computes ``-Σ p log(p + 1e-9)``, which is biased by up to
``1e-9 · n_k`` per row and has the wrong gradient near 0; here zeros contribute exactly 0.

A fully masked row (all zeros, as refattn's attention ops return it) has ``H = 0`` and gradient 0:
it is no distribution, and 0 keeps padded queries out of a sum of entropies. The summaries
(:func:`entropy_by_layer`) leave such rows out of their means.

Backward. ``∂H_i/∂p_ij = -(log p_ij + 1)`` where ``p_ij > 0``. At ``p_ij = 0`` the derivative is
``+∞`` (``-log 0``); the backward returns 0 there. That is the value that composes exactly with
the normalisers that produce the zeros: softmax (``p = 0`` only where masked, and its VJP
multiplies by ``p``) and sparsemax/entmax (their VJP vanishes off the support). torch's
``torch.special.entr`` returns ``+inf`` there, which turns into NaN after softmax's VJP.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .._backend import describe, namespace
from .._op import Op
from ._checks import as_layers, check_weights

__all__ = ["attention_entropy", "entropy_by_layer"]

Array = Any


def _check(
    xp: Any, op: str, weights: Array, axis: Any, where: Array | None, check_rows: bool
) -> int:
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise TypeError(f"refattn.{op}: axis must be an int, got {axis!r}")
    if hasattr(weights, "ndim") and not -weights.ndim <= axis < max(weights.ndim, 1):
        raise ValueError(
            f"refattn.{op}: axis {axis} is out of range for weights of {describe(weights)}"
        )
    if where is not None:
        if not hasattr(where, "dtype") or where.dtype != xp.bool:
            raise TypeError(f"refattn.{op}: where must be a bool array, got {describe(where)}")
        try:
            shape = xp.broadcast_shapes(tuple(where.shape), tuple(weights.shape))
        except ValueError:
            shape = None
        if shape != tuple(weights.shape):
            raise ValueError(
                f"refattn.{op}: where of shape {tuple(where.shape)} does not broadcast to "
                f"weights of {describe(weights)}"
            )
    if not isinstance(check_rows, bool):
        raise TypeError(f"refattn.{op}: check_rows must be a bool, got {check_rows!r}")
    check_weights(xp, op, "weights", weights, axis=axis, where=where, rows=check_rows)
    return axis % weights.ndim


def _positive(xp: Any, weights: Array, where: Array | None) -> Array:
    on = weights > 0
    return on if where is None else xp.logical_and(on, where)


def _entropy_fwd(
    weights: Array, /, *, axis: int = -1, where: Array | None = None, check_rows: bool = True
) -> tuple[Array, Any]:
    r"""Entropy of attention weights along ``axis``: ``H = -Σ_j p_j log p_j``, ``0 log 0 = 0``.

    Parameters
    ----------
    weights : (..., n_k), real floating
        Attention weights: non-negative, each slice along ``axis`` summing to 1, or to 0 for a
        fully masked row (checked, to ``sqrt(eps)``; NaN is an error).
    axis : int
        The key axis (default the last).
    where : bool, broadcastable to ``weights``, optional
        The entries that take part (True); the others are left out of the sum and of the
        row-sum check (e.g. entries of a key-padding mask whose weights the caller has not
        zeroed).
    check_rows : bool
        Check that the rows sum to 1 or 0 (default). False takes any non-negative weights
        (unnormalised ones, or weights perturbed by finite differences); ``H`` is then the same
        formula, ``-Σ p log p``.

    Returns
    -------
    H : ``weights``' shape without ``axis``, same dtype, in nats. Fully masked rows give 0.
    """
    xp = namespace(weights, where)
    axis = _check(xp, "attention_entropy", weights, axis, where, check_rows)
    on = _positive(xp, weights, where)
    log_p = xp.log(xp.where(on, weights, xp.ones_like(weights)))  # 0 where p = 0: 0 log 0 = 0
    h = -xp.sum(xp.where(on, weights * log_p, xp.zeros_like(weights)), axis=axis)
    return h, (log_p, on, axis)


def _entropy_bwd(residuals: Any, dh: Array, /) -> tuple[Array]:
    r"""VJP: ``dp_j = -dH · (log p_j + 1)`` where ``p_j > 0``, and 0 where ``p_j = 0`` (module
    docstring)."""
    log_p, on, axis = residuals
    xp = namespace(log_p)
    dh = xp.expand_dims(dh, axis=axis)
    return (xp.where(on, -dh * (log_p + 1.0), xp.zeros_like(log_p)),)


attention_entropy = Op(_entropy_fwd, _entropy_bwd, name="attention_entropy", register=True)


def entropy_by_layer(
    weights_per_layer: Sequence[Array] | Array, *, where: Array | None = None
) -> tuple[Array, Array]:
    r"""Mean attention entropy per layer and head, and per layer (the seed's entropy plot).

    Parameters
    ----------
    weights_per_layer : sequence of L arrays (..., H, n_q, n_k), or one array (L, ..., H, n_q, n_k)
    where : bool, broadcastable to one layer's weights, optional
        As in :func:`attention_entropy`.

    Returns
    -------
    per_head : (L, H)
        ``H_i`` averaged over the batch axes and the query rows, leaving out fully masked rows
        (those that sum to 0). A head whose rows are all masked gives NaN (no rows to average).
    per_layer : (L,)
        ``per_head`` averaged over the heads (NaN heads left out).
    """
    layers = as_layers("entropy_by_layer", weights_per_layer)
    xp = namespace(*layers)
    rows = []
    for w in layers:
        if w.ndim < 3:
            raise ValueError(
                "refattn.entropy_by_layer: each layer's weights must be (..., H, n_q, n_k), got "
                f"{describe(w)}"
            )
        h = attention_entropy(w, where=where)  # (..., H, n_q)
        kept = w if where is None else xp.where(where, w, xp.zeros_like(w))
        live = xp.astype(xp.sum(kept, axis=-1) > 0, w.dtype)
        axes = (*range(h.ndim - 2), h.ndim - 1)  # all but the head axis
        rows.append(xp.sum(h * live, axis=axes) / xp.sum(live, axis=axes))
    per_head = xp.stack(rows)
    finite = xp.isfinite(per_head)
    count = xp.sum(xp.astype(finite, per_head.dtype), axis=1)
    per_layer = xp.sum(xp.where(finite, per_head, xp.zeros_like(per_head)), axis=1) / count
    return per_head, per_layer
