r"""Sliding-window attention with global tokens (Longformer / BigBird style), banded.

.. math::

    \mathrm{keep}(i, j) = \bigl(|i - j| \le w \;\vee\; i < G \;\vee\; j < G\bigr)
    \;\wedge\; (j \le i \ \text{if causal}),

that is, position ``i`` attends to positions ``i - w .. i + w`` (only ``i - w .. i`` when
causal), the first ``G = global_tokens`` positions attend to every position, and every position
attends to them. Causality wins over globality: a causal global token attends ``0 .. i`` and is
attended to by the positions after it.

The computation never forms an ``n x n`` mask. It runs the tiled kernels of
:mod:`refattn.ops.sdpa.tiled` with a :class:`~refattn.ops.sdpa.plan.Pattern` describing the
band: a block of ``b`` query rows is scored only against the key blocks that meet its band
``[r0 - w, r1 + w)`` and the global key block(s); the ``G`` global rows form their own block
and are scored against every key. Per row that is ``O(w + b + G)`` keys, so the forward and the
backward cost ``O(n (w + G) d)`` time (plus ``O(G n d)`` for the global rows), and their memory
beyond inputs and outputs is a few ``b x b`` tiles per thread.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .._op import Op
from .sdpa.plan import Pattern
from .sdpa.problem import check_block_size, prepare
from .sdpa.tiled import TiledResiduals, forward, make_plan

__all__ = ["sliding_window_attention", "window_pattern"]

Array = Any

_OP = "sliding_window_attention"


def window_pattern(window: int, global_tokens: int = 0, is_causal: bool = False) -> Pattern:
    """The :class:`~refattn.ops.sdpa.plan.Pattern` of a sliding window with global tokens."""
    if is_causal:
        return Pattern(causal=0, left=window, n_global=global_tokens)
    return Pattern(left=window, right=window, n_global=global_tokens)


def _check_int(name: str, value: Any, low: int, high: int | None, what: str) -> int:
    ok = isinstance(value, int) and not isinstance(value, bool)
    if not ok or value < low or (high is not None and value > high):
        bound = f"an int >= {low}" if high is None else f"an int in [{low}, {high}]"
        raise ValueError(f"refattn.{_OP}: {name} must be {bound} ({what}), got {value!r}")
    return int(value)


def _default_block(window: int) -> int:
    """Tiles about as wide as the window (between 64 and 256): each row visits ~3 tiles."""
    return max(64, min(256, window))


def _sliding_window_fwd(
    q: Array,
    k: Array,
    v: Array,
    /,
    *,
    window: int,
    global_tokens: int = 0,
    is_causal: bool = False,
    scale: float | None = None,
    block_size: int | tuple[int, int] | None = None,
) -> tuple[Array, TiledResiduals]:
    r"""Sliding-window self-attention with global tokens, in ``O(n w d)`` time, ``O(n w)`` memory.

    .. math::

        O_i = \sum_{j \in N(i)} \mathrm{softmax}_j\bigl(\mathrm{scale}\; q_i \cdot k_j\bigr)\, v_j,
        \qquad
        N(i) = \{j : |i - j| \le w\} \cup \{j : i < G \ \vee\ j < G\},

    intersected with ``{j <= i}`` when causal. It equals
    ``scaled_dot_product_attention(q, k, v, mask=keep)`` with the boolean mask above, without
    building the mask.

    Parameters
    ----------
    q : (..., Hq, n, d_k)
        Queries; ``(n, d_k)`` works too.
    k : (..., Hkv, n, d_k)
    v : (..., Hkv, n, d_v)
        Self-attention: ``k`` and ``v`` have the same number of positions ``n`` as ``q``. ``Hq``
        must be a multiple of ``Hkv`` (GQA), as in SDPA.
    window : int >= 0
        ``w``: position ``i`` attends ``i - w .. i + w`` (``i - w .. i`` when causal).
    global_tokens : int in [0, n]
        ``G``: the first ``G`` positions attend to all positions and all positions attend them.
    is_causal : bool
        Also hide keys after the query (``j > i``), global tokens included.
    scale : float, optional
        Defaults to ``1 / sqrt(d_k)``.
    block_size : int or (block_q, block_k), optional
        Tile size (default: the window clipped to [64, 256]); results do not depend on it.

    Returns
    -------
    out : (..., Hq, n, d_v)
    """
    window = _check_int("window", window, 0, None, "the half-width of the band")
    if not isinstance(is_causal, bool):
        raise TypeError(f"refattn.{_OP}: is_causal must be a bool, got {is_causal!r}")
    blocks = check_block_size(block_size, _OP)
    pb = prepare(q, k, v, scale=scale, op=_OP)
    if pb.n_q != pb.n_k:
        raise ValueError(
            f"refattn.{_OP}: this is self-attention, q and k must have the same number of "
            f"positions (axis -2), got q {tuple(q.shape)} and k {tuple(k.shape)}"
        )
    global_tokens = _check_int(
        "global_tokens", global_tokens, 0, pb.n_q, f"global positions out of n={pb.n_q}"
    )
    pb = dataclasses.replace(pb, pattern=window_pattern(window, global_tokens, is_causal))
    default = _default_block(window)
    plan = make_plan(pb, blocks or (default, default))
    o, _, _, residuals = forward(pb, want_weights=False, plan=plan)
    return pb.xp.reshape(o, pb.out_shape), residuals


def _sliding_window_bwd(residuals: TiledResiduals, d_out: Array, /) -> tuple[Array, Array, Array]:
    r"""VJP of sliding-window attention: the softmax-attention VJP restricted to the band.

    With :math:`P_{ij} = e^{S_{ij} - \mathrm{lse}_i}` for :math:`j \in N(i)` (0 outside),
    recomputed tile by tile from the saved LSE, over the same visible tiles as the forward:

    .. math::

        dV_j = \sum_{i : j \in N(i)} P_{ij}\, dO_i, \qquad
        dS_{ij} = P_{ij}\,\bigl(dO_i \cdot v_j - \Delta_i\bigr), \qquad
        \Delta_i = dO_i \cdot O_i, \\
        dQ_i = \mathrm{scale} \sum_{j \in N(i)} dS_{ij}\, k_j, \qquad
        dK_j = \mathrm{scale} \sum_{i : j \in N(i)} dS_{ij}\, q_i .

    Entries outside the band have ``P = 0`` and hence ``dS = 0``: skipping their tiles is exact.
    """
    pb = residuals.pb
    d_q, d_k, d_v = residuals.vjp(pb.xp.reshape(d_out, residuals.o.shape))
    return pb.gradients(d_q, d_k, d_v)


sliding_window_attention = Op(
    _sliding_window_fwd, _sliding_window_bwd, name="sliding_window_attention", register=True
)
