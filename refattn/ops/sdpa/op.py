r"""``scaled_dot_product_attention``: the public op, its forward and backward math.

.. math::

    S = \mathrm{cap}(\mathrm{scale}\cdot QK^\top) + B,\qquad
    P = \mathrm{softmax}_{\mathrm{kept}}(S),\qquad
    O = (P \circ M_{\mathrm{drop}} / (1 - p))\,V,\qquad
    \mathrm{lse}_i = \log \textstyle\sum_{j\,\mathrm{kept}} e^{S_{ij}} .

The package, one concept a module:

* :mod:`.problem`: every option validated once, the call in a canonical GQA layout;
* :mod:`.scores`: the score pipeline (bias, mask, structured pattern) both kernels share;
* :mod:`.plan`: structured masks as index rules, and the tiles they leave (no arrays);
* :mod:`.materialized`: row blocks whose weights are kept for the backward;
* :mod:`.tiled`: flash-style online softmax, ``O(n d)`` memory, LSE-recompute backward.
"""

from __future__ import annotations

from typing import Any

from ..._op import Op
from . import materialized, tiled
from .problem import prepare
from .scores import ScoreGradients

__all__ = ["scaled_dot_product_attention"]

Array = Any


def _sdpa_fwd(
    q: Array,
    k: Array,
    v: Array,
    /,
    bias: Array | None = None,
    sinks: Array | None = None,
    softcap: float | Array | None = None,
    *,
    mask: Array | None = None,
    is_causal: bool = False,
    causal_alignment: str = "upper_left",
    window: int | tuple[int | None, int | None] | None = None,
    sink_tokens: int = 0,
    score_mod: Op | None = None,
    mask_mod: Any = None,
    query_lengths: Any = None,
    key_lengths: Any = None,
    scale: float | None = None,
    dropout_mask: Array | None = None,
    dropout_p: float = 0.0,
    normalizer: str = "softmax",
    alpha: float | None = None,
    return_weights: bool = False,
    return_lse: bool = False,
    implementation: str = "auto",
    block_size: int | tuple[int, int] | None = None,
    memory_budget: int | None = None,
) -> tuple[Any, Any]:
    r"""Scaled dot-product attention, the float64 reference.

    .. math::

        O = \bigl(\mathrm{softmax}(\mathrm{cap}(\mathrm{scale}\cdot QK^\top) + \mathrm{bias},
        \ \mathrm{mask};\ \sigma) \circ \mathrm{dropout\_mask} / (1 - p)\bigr) V, \qquad
        \mathrm{cap}(x) = c \tanh(x / c)

    where a sink logit ``σ`` joins each row's softmax denominator,
    ``P_ij = e^{S_ij} / (Σ_j' e^{S_ij'} + e^σ)``.

    Parameters
    ----------
    q : (..., Hq, n_q, d_k)
        Queries; ``(n_q, d_k)`` and ``(Hq, n_q, d_k)`` work too.
    k : (..., Hkv, n_k, d_k)
    v : (..., Hkv, n_k, d_v)
        ``Hq`` must be a multiple of ``Hkv``; query head ``h`` uses kv head ``h // (Hq // Hkv)``
        (GQA; ``Hkv = 1`` is MQA). The batch axes ``...`` must be equal.
    bias : float, broadcastable to (..., Hq, n_q, n_k), optional
        Added to the scaled scores (ALiBi, relative positions, torch's float ``attn_mask``).
        Given positionally it is a primal: ``vjp`` returns its gradient ``dS`` summed over its
        broadcast axes (a learnable relative-position table or ALiBi slopes reach it through
        the op that builds the bias). Given as ``bias=`` it is an option, not differentiated.
    sinks : float, (Hq,) or (), optional
        Learnable attention-sink logits (gpt-oss; one per query head, or one for all): a logit
        in every row's softmax denominator with no value, so each row's weights sum to
        ``1 - e^{σ - lse}``. The returned LSE includes it, and a row that sees no key has
        ``lse = σ`` and output 0. Positional: a primal with its gradient
        ``dσ = Σ_{b,i} p_σi (dlse_i - Δ_i)``; ``sinks=``: not differentiated.
    softcap : float > 0 (or a 0-d array), optional
        Caps the scaled scores at ``±c`` smoothly, ``c tanh(x / c)``, before the bias and the
        mask (Gemma 2; FlashAttention's ``softcap``, whose 0 means off, as None and 0 do here).
        ``softcap=c`` is a constant, as in those; given positionally (the sixth primal, after
        ``bias`` and ``sinks``, which may be None) it is learnable and ``vjp`` returns
        ``dc = Σ dB ∘ (t - (x/c)(1 - t²))``, ``t = tanh(x/c)``, as a 0-d array (0 there, a
        cap that is off, gets a zero gradient).
    mask : bool, broadcastable to (..., Hq, n_q, n_k)
        True = attend (the ``torch.nn.functional.scaled_dot_product_attention`` and
        ``jax.nn.dot_product_attention`` meaning).
    is_causal : bool
        Also mask keys after the query, aligned by ``causal_alignment``.
    causal_alignment : {"upper_left", "lower_right"}
        "upper_left" (torch and JAX): key ``j`` is visible to query ``i`` iff ``j <= i``.
        "lower_right" (FlashAttention): iff ``j <= i + n_k - n_q``. The local ``window`` is
        aligned on the same diagonal. The offset ``n_k - n_q`` is the arrays' own: a padding
        ``mask`` does not move it; give ``query_lengths``/``key_lengths`` to align each
        sequence on its own lengths, as FlashAttention does.
    window : int or (left, right), optional
        Local attention: query ``i`` sees keys ``i + o - left <= j <= i + o + right`` with the
        diagonal offset ``o`` of ``causal_alignment`` (0, or ``n_k - n_q``); ``None`` on a side
        is unbounded, an int ``w`` is ``(w, w)``. Upper-left is ``jax.nn.dot_product_attention``'s
        ``local_window_size``; lower-right is FlashAttention's ``window_size`` (whose ``-1`` is
        ``None`` here). Combined with ``is_causal`` by AND. The tiled kernel skips every tile
        outside the band.
    sink_tokens : int >= 0
        StreamingLLM's sink tokens: the first ``sink_tokens`` keys stay visible through the
        ``window`` (not through the causal mask, the padding or ``mask``). A sink token's own
        row keeps its window: unlike :func:`refattn.sliding_window_attention`'s
        ``global_tokens``, whose rows see every key. Without a window it changes nothing.
    score_mod : refattn.Op, optional
        FlexAttention's ``score_mod``: ``score_mod(s, b=, h=, i=, j=)`` maps the scores after
        the cap and the bias (before the masks), elementwise, with index arrays broadcastable
        to the scores (``b`` the flattened batch index, ``h`` the query head, ``i`` the query,
        ``j`` the key). An :class:`refattn.Op`: its backward ``(residuals, dS, /, *, b, h, i,
        j) -> (d_score,)`` is the modifier's derivative, which both kernels apply to ``dS``.
    mask_mod : callable, optional
        FlexAttention's ``mask_mod(b, h, i, j) -> bool`` (True = attend), with the same
        indices; ANDed with the other masks. The tiled kernel evaluates it per tile and skips
        the tiles it hides from every head of a chunk (FlexAttention's block mask).
    query_lengths, key_lengths : ints, one per batch element, optional
        A padded batch (JAX's ``query_seq_lengths``/``key_value_seq_lengths``): element ``b``
        has the queries ``i < query_lengths[b]`` and the keys ``j < key_lengths[b]`` (None: all
        of them). Shaped like the batch axes (or flat), any backend's integer array or a
        sequence, read on the host. Padded rows are fully masked rows (output 0). With
        "lower_right", each sequence's causal diagonal and window sit at its own offset
        ``key_lengths[b] - query_lengths[b]`` (FlashAttention's varlen rule, ``attention_ref``
        with padding masks); with "upper_left" the lengths only pad. The tiled kernel skips
        tiles that no sequence sees. Packed sequences: :func:`refattn.varlen_attention`.
    scale : float, optional
        Defaults to ``1 / sqrt(d_k)``.
    dropout_mask : bool or float, broadcastable to (..., Hq, n_q, n_k)
        True/1 = keep. Kept weights are multiplied by ``1 / (1 - dropout_p)``. There is no RNG in
        refattn's ops: the caller draws the mask, so results are reproducible.
    dropout_p : float in [0, 1)
    normalizer : {"softmax", "sparsemax", "entmax"}
        What turns the scores into weights. "sparsemax" (Martins & Astudillo 2016) and
        "entmax" (α-entmax, Peters et al. 2019; :func:`refattn.entmax`) give exact zeros; they
        have no LSE (``return_lse`` is refused) and run on the materialized kernel. The backward
        is :func:`refattn.ops.entmax.normalize_backward`'s in place of the softmax VJP.
    alpha : float in [1, 2], optional
        α of "entmax" (default 1.5); 1 is softmax, 2 sparsemax. Not differentiated here: a
        learnable α composes :func:`refattn.entmax` with the GEMMs (see docs/entmax.md).
    return_weights : bool
        Also return the attention weights ``P`` (..., Hq, n_q, n_k), **before** dropout.
    return_lse : bool
        Also return the per-row log-sum-exp of the scaled, biased, masked scores
        (..., Hq, n_q); ``-inf`` for a fully masked row.
    implementation : {"auto", "materialized", "tiled"}
        How the same op is computed (results agree to ~1e-15 relative in float64).
        "materialized" forms the ``n_q x n_k`` weights in row blocks and keeps them for the
        backward. "tiled" is flash-style (see :mod:`refattn.ops.sdpa.tiled`): an online softmax over
        key blocks, saving only ``O`` and the LSE, and a backward that recomputes the weights tile
        by tile; its extra memory is ``O(n d)``, and causal masks skip fully hidden tiles (about
        half the work). With ``return_weights=True`` the tiled path still works, but the weights
        are an ``n_q x n_k`` output, so they are materialized (from the final LSE).
        "auto" (default) picks "tiled" when the scores of the whole call,
        ``batch * Hq * n_q * n_k`` entries in the input dtype, exceed ``memory_budget``, and
        "materialized" otherwise, or whenever ``return_weights=True``.
    block_size : int or (block_q, block_k), optional
        Tile size of the tiled implementation (default :data:`refattn.ops.sdpa.plan.DEFAULT_BLOCK`,
        512); ignored by "materialized".
    memory_budget : int, optional
        Bytes of scores "auto" may materialize; default 4 MiB
        (:data:`~refattn.ops.sdpa.problem.DEFAULT_MEMORY_BUDGET`).

    Returns
    -------
    out : (..., Hq, n_q, d_v), or the tuple ``(out, weights?, lse?)`` with the requested extras
        in that order. Fully masked query rows give ``out = 0`` and ``weights = 0``, and their
        gradients are 0.
    """
    pb = prepare(
        q,
        k,
        v,
        mask=mask,
        bias=bias,
        sinks=sinks,
        is_causal=is_causal,
        causal_alignment=causal_alignment,
        window=window,
        sink_tokens=sink_tokens,
        score_mod=score_mod,
        mask_mod=mask_mod,
        query_lengths=query_lengths,
        key_lengths=key_lengths,
        scale=scale,
        softcap=softcap,
        dropout_mask=dropout_mask,
        dropout_p=dropout_p,
        normalizer=normalizer,
        alpha=alpha,
        return_weights=return_weights,
        return_lse=return_lse,
        implementation=implementation,
        block_size=block_size,
        memory_budget=memory_budget,
    )
    kernel = tiled if pb.implementation == "tiled" else materialized
    o, weights, lse, residuals = kernel.forward(pb, want_weights=return_weights)
    return pb.result(o, weights, lse, return_lse=return_lse), residuals


def _sdpa_bwd(
    residuals: Any,
    cotangent: Any,
    /,
    *,
    return_weights: bool = False,
    return_lse: bool = False,
    n_primals: int = 3,
) -> tuple[Array | None, ...]:
    r"""VJP of scaled dot-product attention.

    With :math:`\tilde P = P \circ M / (1-p)` the dropped weights and upstream cotangents
    :math:`dO` (and optionally :math:`dP^{ext}` for the returned weights, :math:`d\ell` for the
    LSE):

    .. math::

        dV &= \tilde P^\top dO, \qquad
        dP = (dO\,V^\top) \circ M/(1-p) \;(+\, dP^{ext}), \\
        dS_{ij} &= P_{ij}\,\bigl(dP_{ij} - \Delta_i\bigr) + d\ell_i P_{ij}, \qquad
        \Delta_i = \textstyle\sum_j P_{ij} dP_{ij} = \sum_c dO_{ic} O_{ic}
        \;(+\,\sum_j P_{ij} dP^{ext}_{ij}), \\
        dQ &= \mathrm{scale}\cdot dS\,K, \qquad dK = \mathrm{scale}\cdot dS^\top Q .

    With a softcap, :math:`dQ` and :math:`dK` take :math:`dS \circ (1 - \tanh^2(x / c))`, the
    cap's derivative at the scaled score :math:`x`; a learnable cap gets
    :math:`dc = \sum dS \circ \partial_c[c \tanh(x/c)] = \sum dS \circ (t - (x/c)(1 - t^2))`,
    :math:`t = \tanh(x/c)` (before a score modifier's VJP: :math:`dS` there is the gradient at
    the modifier's input). ``dS = P o (dP - Delta)`` is the softmax
    VJP row by row; ``d lse_i / d S_ij = P_ij``. With
    GQA, the rows of a group are stacked as ``(g * n_q)`` rows against one K, so ``dK`` and
    ``dV`` sum the group's contributions inside the GEMM. Masked entries have ``P = 0``, hence
    ``dS = 0`` there, and a fully masked row contributes nothing.

    The kernel was chosen by the forward, and its residuals compute these formulas
    (:meth:`MaterializedResiduals.vjp <refattn.ops.sdpa.materialized.MaterializedResiduals.vjp>`
    from the saved weights, :meth:`TiledResiduals.vjp <refattn.ops.sdpa.tiled.TiledResiduals.vjp>`
    tile by tile, recomputing ``P = exp(S - lse)`` from the saved LSE).
    """
    pb = residuals.pb
    d_o, d_p, d_l = pb.cotangents(cotangent, return_weights=return_weights, return_lse=return_lse)
    learn_bias = n_primals >= 4 and pb.bias is not None
    learn_cap = n_primals >= 6 and pb.softcap is not None
    learned = ScoreGradients(pb, bias=learn_bias, softcap=learn_cap)
    grads = pb.gradients(*residuals.vjp(d_o, d_p, d_l, learned if learned.active else None))
    if n_primals == 3:
        return grads
    d_bias = pb.bias_gradient(learned.bias) if learn_bias else None
    d_sinks = None
    if n_primals >= 5 and pb.sinks is not None:
        weights = residuals.weights() if d_p is not None else None
        d_sinks = pb.sinks_gradient(residuals.o, residuals.lse, weights, d_o, d_p, d_l)
    d_cap = pb.softcap_gradient(learned.softcap) if n_primals >= 6 else None
    return (*grads, d_bias, d_sinks, d_cap)[:n_primals]


scaled_dot_product_attention = Op(
    _sdpa_fwd, _sdpa_bwd, name="scaled_dot_product_attention", register=True
)
