"""Validation shared by the interpretability quantities: attention weights are row-stochastic."""

from __future__ import annotations

import math
from typing import Any

from .._backend import check_floating, describe

Array = Any


def row_tolerance(xp: Any, dtype: Any) -> float:
    """How far a row sum may be from 1: ``sqrt(eps)`` of the dtype (1.5e-8 in float64, 3.5e-4 in
    float32), far above the rounding of a softmax over any realistic row length and far below
    any real departure from a distribution."""
    return math.sqrt(float(xp.finfo(dtype).eps))


def check_weights(
    xp: Any,
    op: str,
    name: str,
    w: Array,
    *,
    axis: int = -1,
    where: Array | None = None,
    rows: bool = True,
) -> None:
    """``w`` is real floating and finite; over the entries ``where`` keeps it is non-negative
    and, if ``rows``, each slice along ``axis`` sums to 1 (a distribution) or to 0 (a fully
    masked row)."""
    check_floating(xp, f"{op}: {name}", w)
    if w.ndim < 1:
        raise ValueError(
            f"refattn.{op}: {name} must have at least one dimension, got {describe(w)}"
        )
    if not bool(xp.all(xp.isfinite(w))):
        raise ValueError(f"refattn.{op}: {name} has NaN or infinite entries; expected weights")
    kept = w if where is None else xp.where(where, w, xp.zeros_like(w))
    if bool(xp.any(kept < 0)):
        raise ValueError(
            f"refattn.{op}: {name} has negative entries (min {float(xp.min(kept))}); expected "
            "attention weights, each row a probability distribution"
        )
    if not rows:
        return
    total = xp.sum(kept, axis=axis)
    tol = row_tolerance(xp, w.dtype)
    ok = xp.logical_or(xp.abs(total - 1.0) <= tol, total == 0.0)
    if not bool(xp.all(ok)):
        dev = xp.reshape(xp.where(ok, xp.zeros_like(total), xp.abs(total - 1.0)), (-1,))
        worst = float(xp.reshape(total, (-1,))[int(xp.argmax(dev))])
        raise ValueError(
            f"refattn.{op}: {name} is not row-stochastic along axis {axis}: a row sums to "
            f"{worst:.12g}; expected every row to sum to 1 (within {tol:.1e}) or to 0 (a fully "
            "masked row); pass check_rows=False to take unnormalised weights"
        )


def as_layers(op: str, weights_per_layer: Any) -> list[Array]:
    """A list of per-layer arrays of one shape, from a sequence or from one stacked array."""
    if hasattr(weights_per_layer, "ndim") and weights_per_layer.ndim >= 1:
        return [weights_per_layer[i, ...] for i in range(weights_per_layer.shape[0])]
    if not isinstance(weights_per_layer, (list, tuple)) or not weights_per_layer:
        raise TypeError(
            f"refattn.{op}: weights_per_layer must be a non-empty sequence of arrays or one "
            f"stacked array (L, ...), got {describe(weights_per_layer)}"
        )
    if not all(hasattr(w, "shape") for w in weights_per_layer):
        raise TypeError(f"refattn.{op}: weights_per_layer must hold arrays")
    shapes = {tuple(w.shape) for w in weights_per_layer}
    if len(shapes) != 1:
        raise ValueError(
            f"refattn.{op}: every layer's weights must have one shape, got shapes {sorted(shapes)}"
        )
    return list(weights_per_layer)
