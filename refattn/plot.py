"""Figures of attention: heatmaps, a layers × heads grid, entropy by layer, rollout/flow maps.

matplotlib is optional (``pip install refattn[plot]``) and imported when a function here is
called, never by ``import refattn``. Every function draws on a new Figure with the object-oriented
API (no pyplot state, no backend selection, never ``show()``) and returns it: save it with
``fig.savefig(path)``. Arrays of any backend are brought to the host with their values unchanged
(the image data of a heatmap equals the weights).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np  # figures are drawn on the host

from ._backend import host_float64

__all__ = ["entropy_plot", "head_grid", "heatmap", "mechanisms", "rollout_map"]

Array = Any


def _figure(**kw: Any) -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("refattn.plot needs matplotlib: pip install refattn[plot]") from None
    return Figure(**kw)


def _host2d(name: str, x: Array) -> np.ndarray:
    a = host_float64(x)
    if a.ndim != 2:
        raise ValueError(f"refattn.plot: {name} must be a 2-d (n_q, n_k) map, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"refattn.plot: {name} has NaN or infinite entries")
    return a


def _labels(ax: Any, tokens: Sequence[str] | None, n_q: int, n_k: int) -> None:
    """Key labels on x and, for a square map, the same labels on y (self-attention)."""
    if tokens is None:
        return
    if len(tokens) != n_k:
        raise ValueError(
            f"refattn.plot: tokens has {len(tokens)} labels for {n_k} keys; expected {n_k}"
        )
    ax.set_xticks(range(n_k), list(tokens), rotation=90)
    if n_q == n_k:
        ax.set_yticks(range(n_q), list(tokens))


def heatmap(
    weights: Array, *, tokens: Sequence[str] | None = None, title: str | None = None
) -> Any:
    """One head's ``(n_q, n_k)`` weights as an image (rows = queries), with a colorbar and, if
    given, the ``n_k`` tokens as key labels (and query labels when the map is square)."""
    a = _host2d("weights", weights)
    fig = _figure(figsize=(4 + 0.2 * a.shape[1], 3.5 + 0.2 * a.shape[0]), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(a, cmap="viridis", vmin=0.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, label="weight")
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    _labels(ax, tokens, *a.shape)
    if title is not None:
        ax.set_title(title)
    return fig


def head_grid(
    weights_per_layer: Sequence[Array] | Array, *, tokens: Sequence[str] | None = None
) -> Any:
    """A layers × heads grid of heatmaps: ``weights_per_layer`` is (L, H, n, n) (or a sequence
    of L ``(H, n, n)`` arrays), one shared colour scale and colorbar."""
    layers = [host_float64(w) for w in weights_per_layer]
    if not layers or any(w.ndim != 3 for w in layers):
        raise ValueError(
            "refattn.plot.head_grid: expected (L, H, n, n) weights (one batch element)"
        )
    n_layers, n_heads = len(layers), layers[0].shape[0]
    fig = _figure(figsize=(1.6 * n_heads + 1, 1.6 * n_layers), layout="constrained")
    axes = fig.subplots(n_layers, n_heads, squeeze=False)
    vmax = max(float(w.max()) for w in layers)
    image = None
    for l, w in enumerate(layers):
        for h in range(n_heads):
            ax = axes[l][h]
            image = ax.imshow(_host2d("weights", w[h]), cmap="viridis", vmin=0.0, vmax=vmax)
            ax.set_xticks([])
            ax.set_yticks([])
            if l == 0:
                ax.set_title(f"head {h}", fontsize=8)
            if h == 0:
                ax.set_ylabel(f"layer {l}", fontsize=8)
    fig.colorbar(image, ax=axes, shrink=0.6, label="weight")
    return fig


def entropy_plot(per_head: Array, per_layer: Array | None = None) -> Any:
    """Entropy by layer: one line per head (thin) and the mean over heads (thick), from
    :func:`refattn.interpret.entropy_by_layer`'s ``(L, H)`` and ``(L,)``."""
    ph = host_float64(per_head)
    if ph.ndim != 2:
        raise ValueError(
            f"refattn.plot.entropy_plot: per_head must be (L, H), got shape {ph.shape}"
        )
    mean = ph.mean(axis=1) if per_layer is None else host_float64(per_layer)
    fig = _figure(figsize=(6.5, 3.5), layout="constrained")
    ax = fig.add_subplot()
    layers = np.arange(ph.shape[0])
    for h in range(ph.shape[1]):
        ax.plot(layers, ph[:, h], lw=0.8, alpha=0.6, label=f"head {h}")
    ax.plot(layers, mean, lw=2.5, color="black", label="mean")
    ax.set_xlabel("layer")
    ax.set_ylabel("entropy (nats)")
    ax.set_xticks(layers)
    ax.legend(fontsize=6, ncol=2, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def rollout_map(
    rollout: Array, *, tokens: Sequence[str] | None = None, title: str = "attention rollout"
) -> Any:
    """A rollout or flow map ``(n, n)`` (rows: output tokens, columns: input tokens)."""
    fig = heatmap(rollout, tokens=tokens, title=title)
    ax = fig.axes[0]
    ax.set_xlabel("input token")
    ax.set_ylabel("output token")
    return fig


def mechanisms(weights_by_name: dict[str, Array]) -> Any:
    """Mechanisms side by side (seed 002's ``visualize_attention_patterns``): one heatmap per
    ``name -> (n_q, n_k)`` entry, titled by its name, on one colour scale from 0 to 1."""
    if not weights_by_name:
        raise ValueError("refattn.plot.mechanisms: expected at least one mechanism")
    maps = {name: _host2d(name, w) for name, w in weights_by_name.items()}
    from matplotlib.ticker import MaxNLocator

    cols = min(3, len(maps))
    rows = -(-len(maps) // cols)
    fig = _figure(figsize=(3.3 * cols + 1, 3.1 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    image = None
    for ax, (name, a) in zip(axes.flat, maps.items(), strict=False):
        image = ax.imshow(a, cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("key")
        ax.set_ylabel("query")
    for ax in list(axes.flat)[len(maps) :]:
        ax.set_axis_off()
    fig.colorbar(image, ax=axes, shrink=0.6, label="weight")
    return fig
