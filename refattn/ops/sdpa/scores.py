r"""The score pipeline that both SDPA kernels share: from ``scale Q Kᵀ`` to the masked logits.

For one tile of a :class:`~refattn.ops.sdpa.problem.Problem` (query rows ``r0:r1``, keys
``c0:c1``, a chunk of heads), :func:`masked_scores` takes the scaled scores straight out of the
GEMM and applies, in this order,

.. math::

    S = \mathrm{cap}\bigl(\mathrm{scale}\; Q K^\top\bigr) + B, \qquad
    S_{ij} = -\infty \ \text{where}\ \neg(\mathrm{mask}_{ij} \wedge \mathrm{pattern}(i, j)
    \wedge \mathrm{lengths}_b(i, j)),

where :math:`\mathrm{cap}(x) = c \tanh(x / c)` is the softcap (Gemma 2, FlashAttention's
``softcap``; the identity when off), ``B`` the bias and ``pattern`` the structured (causal) mask
evaluated from indices; with a padded batch's lengths, ``lengths_b`` is each sequence's own
rule (its padding, and the causal diagonal and window on its own lengths,
:class:`~refattn.ops.sdpa.plan.Lengths`): a tiled chunk's sequences share one rule, applied as
its pattern; the materialized kernel evaluates every sequence's at once (:func:`lengths_keep`).
The order is FlashAttention's (``attention_ref``): cap, then bias, then mask.
The materialized kernel calls it once per row block (all keys), the tiled kernels once per
tile, in base-2 units (``unit = log2 e``: the GEMM already folded it into the scores).

A new score option is applied here, once, and its derivative is applied to ``dS`` where the
two kernels form it (``_backward_block`` in :mod:`~refattn.ops.sdpa.materialized`,
``_backward_unit`` in :mod:`~refattn.ops.sdpa.tiled`).
"""

from __future__ import annotations

import functools
import math
import threading
from typing import Any

from ..._backend import describe, device_of
from .plan import DEFAULT_BLOCK, Heads, Lengths, Pattern
from .problem import Problem

__all__ = [
    "ScoreChain",
    "ScoreGradients",
    "full_keep",
    "heads_of",
    "index_grids",
    "lengths_keep",
    "masked_scores",
    "masked_scores_and_slope",
    "mod_keep",
    "pattern_keep",
    "tile",
]

Array = Any

#: partial-tile masks up to this many entries are cached (the tiles along one diagonal share one)
_CACHED_MASK_ENTRIES = DEFAULT_BLOCK * DEFAULT_BLOCK


def heads_of(x: Array, hc: Heads | None) -> Array:
    """Heads ``hc`` of a canonical ``(B|1, Hkv|1, ...)`` array (all heads when ``hc`` is None)."""
    if hc is None:
        return x
    b = slice(None) if x.shape[0] == 1 else slice(hc.b0, hc.b1)
    h = slice(None) if x.shape[1] == 1 else slice(hc.h0, hc.h1)
    return x[b, h, ...]


def tile(x: Array | None, hc: Heads | None, r0: int, r1: int, c0: int, c1: int) -> Array | None:
    """Tile of a canonical broadcastable ``(B|1, Hkv|1, g|1, n_q|1, n_k|1)`` array.

    Only the tile is sliced (a view): a broadcast mask or bias is never expanded.
    """
    if x is None:
        return None
    r = slice(None) if x.shape[3] == 1 else slice(r0, r1)
    c = slice(None) if x.shape[4] == 1 else slice(c0, c1)
    return heads_of(x, hc)[:, :, :, r, c]


def masked_scores(
    pb: Problem,
    s: Array,
    hc: Heads | None,
    r0: int,
    r1: int,
    c0: int = 0,
    c1: int | None = None,
    *,
    full: bool = False,
    unit: float = 1.0,
) -> Array:
    """``cap(s) + unit * bias``, ``-inf`` where the mask or the pattern hides a pair.

    ``s`` is ``unit * scale Q Kᵀ`` of the tile (rows ``r0:r1``, keys ``c0:c1``, all keys by
    default), ``(b, h, g, r, c)``; it is updated in place where possible. ``full`` says the plan
    found the tile fully inside the pattern. In base-2 units (``unit = log2 e``) the cap is
    ``unit c``: ``unit c tanh(x / c) = (unit c) tanh(unit x / (unit c))``.
    """
    return _pipeline(pb, s, hc, r0, r1, c0, c1, full, unit, False)[0]


def masked_scores_and_slope(
    pb: Problem,
    s: Array,
    hc: Heads | None,
    r0: int,
    r1: int,
    c0: int = 0,
    c1: int | None = None,
    *,
    full: bool = False,
    unit: float = 1.0,
) -> tuple[Array, ScoreChain]:
    """:func:`masked_scores` and the :class:`ScoreChain` that takes ``dS`` back through the
    score modifier and the softcap."""
    return _pipeline(pb, s, hc, r0, r1, c0, c1, full, unit, True)


class ScoreChain:
    r"""The derivative of one tile's pipeline, for the backwards: ``dS`` (of the softmax's
    input) back to the bias and to ``scale Q Kᵀ``.

    With ``S = mod(cap(x) + B)``: :meth:`to_bias` applies the score modifier's VJP
    (``dB = mod^*(dS)``, the identity without one), then :meth:`to_scores` the cap's slope
    ``1 - t^2`` with ``t = tanh(x / c)`` (``dx = dB \circ (1 - t^2)``), whose gradient gives
    ``dQ`` and ``dK``; :meth:`cap_derivative` is ``∂cap/∂c`` for a learnable cap. ``tanh``
    holds ``t`` (None without a cap).
    """

    def __init__(self, tanh: Array | None = None, mod_vjp: Any = None) -> None:
        self.tanh, self.mod_vjp = tanh, mod_vjp

    def to_bias(self, d_s: Array) -> Array:
        return d_s if self.mod_vjp is None else self.mod_vjp(d_s)

    def to_scores(self, d_b: Array) -> Array:
        """``d_b`` times the cap's slope (in place, unless it came from a score modifier)."""
        if self.tanh is None:
            return d_b
        slope = 1.0 - self.tanh * self.tanh
        if self.mod_vjp is not None:
            return d_b * slope
        d_b *= slope
        return d_b

    def cap_derivative(self, xp: Any) -> Array:
        r"""``∂/∂c [c tanh(x/c)] = t - (x/c)(1 - t^2)``, with ``x/c = atanh(t)``: the product
        ``atanh(t)(1 - t^2)`` is well conditioned (its error is an ulp of ``t``), and where
        ``t`` rounded to ±1 it is 0 to rounding (``|x/c| > 19`` in float64)."""
        t = self.tanh
        saturated = xp.abs(t) >= 1.0
        u = xp.atanh(xp.where(saturated, xp.zeros_like(t), t))
        return t - u * (1.0 - t * t)

    @property
    def identity(self) -> bool:
        return self.tanh is None and self.mod_vjp is None


def index_grids(
    pb: Problem, xp: Any, hc: Heads | None, r0: int, r1: int, c0: int, c1: int, device: Any
) -> tuple[Array, Array, Array, Array]:
    """FlexAttention's indices of a tile, broadcastable to ``(b, h_kv, g, r, c)``: the
    flattened batch index ``b``, the query head ``h = h_kv g + (its place in the group)``, the
    query ``i`` and the key ``j``."""
    b_all, h_kv_all, g = (int(n) for n in pb.q.shape[:3])
    b0, b1, h0, h1 = (0, b_all, 0, h_kv_all) if hc is None else (hc.b0, hc.b1, hc.h0, hc.h1)
    b = xp.reshape(xp.arange(b0, b1, device=device), (-1, 1, 1, 1, 1))
    h_kv = xp.reshape(xp.arange(h0, h1, device=device), (1, -1, 1, 1, 1))
    h = h_kv * g + xp.reshape(xp.arange(g, device=device), (1, 1, -1, 1, 1))
    i = xp.reshape(xp.arange(r0, r1, device=device), (1, 1, 1, -1, 1))
    j = xp.reshape(xp.arange(c0, c1, device=device), (1, 1, 1, 1, -1))
    return b, h, i, j


def mod_keep(
    pb: Problem, xp: Any, hc: Heads | None, r0: int, r1: int, c0: int, c1: int, device: Any
) -> Array:
    """``mask_mod(b, h, i, j)`` of one tile, checked: boolean, broadcastable to the tile."""
    keep = pb.mask_mod(*index_grids(pb, xp, hc, r0, r1, c0, c1, device))
    if getattr(keep, "dtype", None) != xp.bool:
        raise TypeError(
            f"refattn.scaled_dot_product_attention: mask_mod must return a boolean array "
            f"(True = attend), got {describe(keep)}"
        )
    return keep


def _pipeline(
    pb: Problem,
    s: Array,
    hc: Heads | None,
    r0: int,
    r1: int,
    c0: int,
    c1: int | None,
    full: bool,
    unit: float,
    want_slope: bool,
) -> tuple[Array, ScoreChain | None]:
    xp = pb.xp
    c1 = pb.n_k if c1 is None else c1
    tanh = mod_vjp = None
    if pb.softcap is not None:
        cap = pb.softcap * unit
        t = xp.tanh(s / cap)
        if want_slope:  # the backward's chain keeps t
            tanh, s = t, t * cap
        else:
            s = t
            s *= cap
    bias = tile(pb.bias, hc, r0, r1, c0, c1)
    if bias is not None:
        s += bias if unit == 1.0 else bias * unit
    if pb.score_mod is not None:
        s, mod_vjp = _modified(pb, s, hc, r0, r1, c0, c1, unit)
    keep = tile(pb.keep, hc, r0, r1, c0, c1)
    pattern = pb.pattern
    if pb.lengths is not None and hc is None:  # all sequences at once (materialized)
        per_seq = lengths_keep(pb.lengths, xp, r0, r1, c0, c1, device_of(s))
        keep = per_seq if keep is None else xp.logical_and(keep, per_seq)
        pattern = None
    elif pb.lengths is not None:  # a tiled chunk: its sequences share one rule (the plan's)
        pattern = pb.lengths.patterns[hc.b0]
    if not full and pattern is not None:
        structured = pattern_keep(pattern, xp, r0, r1, c0, c1, device_of(s))
        keep = structured if keep is None else xp.logical_and(keep, structured)
    if not full and pb.mask_mod is not None:
        modded = mod_keep(pb, xp, hc, r0, r1, c0, c1, device_of(s))
        keep = modded if keep is None else xp.logical_and(keep, modded)
    if keep is not None:
        s = xp.where(keep, s, -math.inf)
    return s, (ScoreChain(tanh, mod_vjp) if want_slope else None)


def _modified(
    pb: Problem,
    s: Array,
    hc: Heads | None,
    r0: int,
    r1: int,
    c0: int,
    c1: int,
    unit: float,
) -> tuple[Array, Any]:
    """``unit * score_mod(s / unit, b, h, i, j)`` and its VJP (natural units both ways)."""
    xp = pb.xp
    shape = tuple(s.shape)
    b, h, i, j = index_grids(pb, xp, hc, r0, r1, c0, c1, device_of(s))
    natural = s if unit == 1.0 else s / unit
    out, residuals = pb.score_mod.forward(natural, b=b, h=h, i=i, j=j)
    if tuple(getattr(out, "shape", ())) != shape or out.dtype != s.dtype:
        raise ValueError(
            f"refattn.scaled_dot_product_attention: score_mod must return the scores' shape "
            f"{shape} and dtype {s.dtype}, got {describe(out)}"
        )

    def vjp(d_s: Array) -> Array:
        (d_in,) = pb.score_mod.apply_backward(residuals, d_s, b=b, h=h, i=i, j=j)
        return d_in

    return (out if unit == 1.0 else out * unit), vjp


def pattern_keep(
    pattern: Pattern, xp: Any, r0: int, r1: int, c0: int, c1: int, device: Any
) -> Array:
    """The ``(r1 - r0, c1 - c0)`` boolean keep-mask of one tile (read-only: it may be cached).

    Without global tokens and length bounds the mask depends on ``i - j`` only, so the tiles
    along one diagonal (all causal diagonal tiles, say) share one cached mask.
    """
    relative = (
        pattern.n_global == 0 and pattern.n_sink == 0 and pattern.rows is None
    ) and pattern.keys is None
    if relative and (r1 - r0) * (c1 - c0) <= _CACHED_MASK_ENTRIES:
        return _relative_keep(pattern, xp, r1 - r0, c1 - c0, r0 - c0, device)
    return _keep(pattern, xp, r0, r1, c0, c1, device)


@functools.lru_cache(maxsize=16)
def _relative_keep(
    pattern: Pattern, xp: Any, rows: int, cols: int, offset: int, device: Any
) -> Array:
    """:func:`pattern_keep` of a tile whose first row is ``offset`` past its first column."""
    return _keep(pattern, xp, offset, offset + rows, 0, cols, device)


def _keep(pattern: Pattern, xp: Any, r0: int, r1: int, c0: int, c1: int, device: Any) -> Array:
    i = xp.arange(r0, r1, device=device)[:, None]
    j = xp.arange(c0, c1, device=device)[None, :]
    keep = xp.ones((r1 - r0, c1 - c0), dtype=xp.bool, device=device)
    if pattern.left is not None:
        keep = xp.logical_and(keep, i - j <= pattern.left)
    if pattern.right is not None:
        keep = xp.logical_and(keep, j - i <= pattern.right)
    if pattern.n_global:
        keep = xp.logical_or(keep, xp.logical_or(i < pattern.n_global, j < pattern.n_global))
    if pattern.n_sink:
        keep = xp.logical_or(keep, j < pattern.n_sink)
    if pattern.causal is not None:
        keep = xp.logical_and(keep, j - i <= pattern.causal)
    if pattern.rows is not None:
        keep = xp.logical_and(keep, i < pattern.rows)
    if pattern.keys is not None:
        keep = xp.logical_and(keep, j < pattern.keys)
    return keep


def lengths_keep(
    lengths: Lengths, xp: Any, r0: int, r1: int, c0: int, c1: int, device: Any
) -> Array:
    """The ``(B, 1, 1, r1 - r0, c1 - c0)`` keep-mask of one tile for every sequence of a
    padded batch: each sequence's own :class:`~refattn.ops.sdpa.plan.Pattern`
    (:attr:`~refattn.ops.sdpa.plan.Lengths.patterns`), stacked."""
    shape = (len(lengths.q), 1, 1, r1 - r0, c1 - c0)
    if not lengths.q:  # an empty batch
        return xp.zeros(shape, dtype=xp.bool, device=device)
    masks = [_keep(p, xp, r0, r1, c0, c1, device) for p in lengths.patterns]
    return xp.reshape(xp.stack(masks), shape)


def full_keep(pb: Problem) -> Array | None:
    """The whole keep-mask ``mask AND pattern``, broadcastable canonically, or None.

    It is ``n_q x n_k``: for reference implementations and tests, never for the kernels.
    """
    xp = pb.xp
    if pb.lengths is not None:
        per_seq = lengths_keep(pb.lengths, xp, 0, pb.n_q, 0, pb.n_k, device_of(pb.q))
        return per_seq if pb.keep is None else xp.logical_and(pb.keep, per_seq)
    if pb.pattern is None:
        return pb.keep
    structured = _keep(pb.pattern, xp, 0, pb.n_q, 0, pb.n_k, device_of(pb.q))
    structured = xp.reshape(structured, (1, 1, 1, pb.n_q, pb.n_k))
    return structured if pb.keep is None else xp.logical_and(pb.keep, structured)


class ScoreGradients:
    r"""The gradients of the score pipeline's learnable parameters, accumulated tile by tile
    from ``dB``, the gradient at ``cap(x) + B`` (``S = mod(cap(x) + B)``):

    * a learnable bias: ``dB`` summed over the bias's broadcast axes (``∂S/∂B = 1`` before
      the modifier); ``bias`` has the canonical shape ``(B|1, Hkv|1, g|1, n_q|1, n_k|1)``;
    * a learnable softcap ``c``: ``dc = Σ dB ∘ ∂cap/∂c`` over every kept score,
      ``∂/∂c [c tanh(x/c)] = t - (x/c)(1 - t^2)`` (:meth:`ScoreChain.cap_derivative`);
      ``softcap`` is a 0-d array.

    Tiles of one call may add to the same entries from several threads (a bias shared by rows
    or heads, the one cap), so :meth:`add` takes a lock.
    """

    def __init__(self, pb: Problem, *, bias: bool, softcap: bool) -> None:
        xp = self.xp = pb.xp
        self.bias = xp.zeros_like(pb.bias) if bias else None
        self.softcap = xp.zeros((), dtype=pb.q.dtype, device=device_of(pb.q)) if softcap else None
        self._lock = threading.Lock()

    def add(
        self,
        d_b: Array,
        chain: ScoreChain | None,
        hc: Heads | None,
        r0: int,
        r1: int,
        c0: int,
        c1: int,
    ) -> None:
        """Add one tile's ``dB`` ``(b, h, g, r, c)`` (heads ``hc``, rows ``r0:r1``, keys
        ``c0:c1``; ``chain`` the tile's, for the cap)."""
        xp = self.xp
        d_c = None
        if self.softcap is not None and chain is not None and chain.tanh is not None:
            d_c = xp.sum(d_b * chain.cap_derivative(xp))
        part = index = None
        if self.bias is not None:
            grad = self.bias
            axes = tuple(i for i in range(5) if grad.shape[i] == 1 and d_b.shape[i] != 1)
            part = xp.sum(d_b, axis=axes, keepdims=True) if axes else d_b
            b = slice(None) if grad.shape[0] == 1 or hc is None else slice(hc.b0, hc.b1)
            h = slice(None) if grad.shape[1] == 1 or hc is None else slice(hc.h0, hc.h1)
            r = slice(None) if grad.shape[3] == 1 else slice(r0, r1)
            c = slice(None) if grad.shape[4] == 1 else slice(c0, c1)
            index = (b, h, slice(None), r, c)
        with self._lock:
            if part is not None:
                self.bias[index] = self.bias[index] + part
            if d_c is not None:
                self.softcap = self.softcap + d_c

    @property
    def active(self) -> bool:
        return self.bias is not None or self.softcap is not None
