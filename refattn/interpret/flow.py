r"""Attention flow (Abnar & Zuidema 2020): max-flow through the layered attention graph.

The graph has a node ``(l, i)`` for each layer ``l = 0..L`` and token ``i``; node ``(l, i)``
(query ``i`` of layer ``l``) has an edge to ``(l-1, j)`` (its key ``j``, the previous layer's
output) of capacity ``Ã_l[i, j]``, the residual-augmented, head-fused layer matrix that rollout
uses (:func:`refattn.interpret.augmented_attention`). The flow from output token ``i`` to input
token ``j`` is the value of a maximum flow from ``(L, i)`` to ``(0, j)``:

.. math::

    \mathrm{Flow}_{ij} = \max\{\, |f| : f \text{ an } (L,i) \to (0,j) \text{ flow},\;
    0 \le f_e \le c_e \,\},

and with ``normalize=True`` (Abnar's code) each output row is divided by its sum. Rollout
multiplies the edge weights along paths; flow treats them as capacities: rollout is the
"amount of mixing", flow the bottleneck.

Which max-flow solver, and why
    ``scipy.sparse.csgraph.maximum_flow`` takes integer capacities only: scaling them to
    integers would round each capacity by up to ``1/scale``, a flow error of up to the number
    of edges in the minimum cut over ``scale`` (with int32 capacities and ``n`` tokens,
    ``scale ≤ 2³¹/n``: errors ~1e-7 at n = 64), far from a float64 reference. networkx's
    ``maximum_flow_value`` takes floats (the maintained library Abnar's code uses too, with
    Edmonds-Karp); its float arithmetic gives the flow to rounding (the tests check it against a
    hand-solved graph and against the scaled-integer scipy solver within that solver's bound).
    networkx is an optional dependency (``pip install refattn[interpret]``).

Cost: ``n²`` max-flow problems on ``(L+1) n`` nodes and ``L n²`` edges, per batch element: for
reading a model on a sentence (tens of tokens), not for long sequences. There is no gradient
(the max-flow value is piecewise linear in the capacities).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np  # flow runs on the host: networkx works on Python floats

from .._backend import device_of, host_float64
from .rollout import add_residual, check_layers, check_options, fuse_heads

__all__ = ["attention_flow"]

Array = Any


def _networkx() -> Any:
    try:
        import networkx
    except ImportError:
        raise ImportError(
            "refattn.interpret.attention_flow needs networkx (a float max-flow solver): "
            "pip install refattn[interpret]"
        ) from None
    return networkx


def layer_graph(capacities: list[np.ndarray]) -> Any:
    """The layered DiGraph of L ``(n, n)`` host matrices: node ``(l, i)``, edge
    ``(l, i) -> (l-1, j)`` of capacity ``capacities[l-1][i, j]`` where it is positive."""
    nx = _networkx()
    graph = nx.DiGraph()
    n = capacities[0].shape[-1]
    graph.add_nodes_from((l, i) for l in range(len(capacities) + 1) for i in range(n))
    for l, c in enumerate(capacities, start=1):
        rows, cols = np.nonzero(c > 0)
        graph.add_edges_from(
            ((l, int(i)), (l - 1, int(j)), {"capacity": float(c[i, j])})
            for i, j in zip(rows, cols, strict=True)
        )
    return graph


def attention_flow(
    weights_per_layer: Sequence[Array] | Array,
    *,
    residual: float = 0.5,
    head_fusion: str = "mean",
    normalize: bool = True,
) -> Array:
    r"""Attention flow from each output token to each input token (module docstring).

    Parameters
    ----------
    weights_per_layer : one array (L, ..., H, n, n), or a sequence of L arrays (..., H, n, n)
        Self-attention weights per layer, first layer first (row-stochastic, checked).
    residual : float in [0, 1]
        Weight of the identity added for the residual connection (0.5 in the paper).
    head_fusion : {"mean", "max", "min"}
    normalize : bool
        Divide each output token's flows by their sum (Abnar's code does; default).

    Returns
    -------
    flow : (..., n, n), in the weights' namespace and dtype; ``flow[..., i, j]`` from output
        token ``i`` (top layer) to input token ``j``. Computed in float64 on the host.
    """
    op = "attention_flow"
    r, _ = check_options(op, residual, head_fusion, 0.0)
    if not isinstance(normalize, bool):
        raise TypeError(f"refattn.{op}: normalize must be a bool, got {normalize!r}")
    xp, layers = check_layers(op, weights_per_layer)
    nx = _networkx()
    mats = [
        host_float64(add_residual(xp, fuse_heads(xp, w, head_fusion, 0.0)[0], r)[0]) for w in layers
    ]
    lead, n = mats[0].shape[:-2], mats[0].shape[-1]
    out = np.zeros((*lead, n, n))
    for index in np.ndindex(*lead):
        graph = layer_graph([m[index] for m in mats])
        top = len(mats)
        for i in range(n):
            for j in range(n):
                out[(*index, i, j)] = nx.maximum_flow_value(graph, (top, i), (0, j))
    if normalize:
        total = out.sum(axis=-1, keepdims=True)
        out = np.divide(out, total, out=np.zeros_like(out), where=total > 0)
    return xp.asarray(out, dtype=layers[0].dtype, device=device_of(layers[0]))
