r"""Multi-head attention (MHA, MQA, GQA, cross-attention) with hand-derived parameter gradients.

.. math::

    Q = x_q W_q + b_q,\quad K = x_k W_k + b_k,\quad V = x_v W_v + b_v,\\
    O_h = \mathrm{SDPA}(Q_h, K_{h // g}, V_{h // g}),\qquad
    y = [O_1, \dots, O_H]\, W_o + b_o,

with ``H`` query heads of size ``head_dim = d_model / H`` and ``H_kv`` key/value heads
(``g = H / H_kv`` query heads share one; ``H_kv = 1`` is multi-query attention). The attention
core is the op :func:`refattn.scaled_dot_product_attention` (its ``forward`` and ``backward``);
the projections are the affine maps of :mod:`refattn.layers.basic`.
The backward runs the same pieces backwards, in reverse order, by hand.

Parameters are ``{"query", "key", "value", "out"}``, each an affine map
``{"weight": (d_in, d_out), "bias": (d_out,)}``:

=========  ========================  ===========================
key        weight                    meaning
=========  ========================  ===========================
query      (d_model, d_model)        columns ``h*hd:(h+1)*hd`` are head ``h``
key        (d_k, H_kv * head_dim)    ``d_k`` = key's feature size
value      (d_v, H_kv * head_dim)    ``d_v`` = value's feature size
out        (d_model, d_model)        rows ``h*hd:(h+1)*hd`` read head ``h``
bias_k     (H_kv * head_dim,)        optional: torch's ``add_bias_kv``
bias_v     (H_kv * head_dim,)        (one more key/value row)
=========  ========================  ===========================

``bias_k``/``bias_v`` (torch's ``add_bias_kv=True``) append one projected key and value row,
``[K; b_k]``, ``[V; b_v]``, after the projections; ``add_zero_attn=True`` then appends a zero
row to both, as torch does (after splitting the heads). The appended keys are visible to every
query: masks and biases get a True/0 column for each, as torch pads its masks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from .._backend import default_namespace, describe, device_of, namespace
from .._op import Op
from ..ops.sdpa import scaled_dot_product_attention as _sdpa
from ..ops.sdpa.problem import check_lengths, check_score_options
from .basic import (
    affine_backward,
    affine_forward,
    array_leaves,
    batch_first_view,
    batch_first_vjp,
    check_affine,
    check_input,
    check_size,
    get_subtree,
    join_path,
    linear_params,
    resolve_dtype,
    swap_batch_and_sequence,
    uniform,
)

__all__ = ["init_multi_head_attention", "multi_head_attention"]

Array = Any
Params = dict[str, Any]
_OP = "multi_head_attention"


# ----------------------------------------------------------------------------- validation


def check_heads(op: str, d_model: int, n_heads: Any, n_kv_heads: Any) -> tuple[int, int, int]:
    """``(n_heads, n_kv_heads, head_dim)`` after checking divisibility; ValueError otherwise."""
    if isinstance(n_heads, bool) or not isinstance(n_heads, int) or n_heads < 1:
        raise ValueError(f"refattn.{op}: n_heads must be a positive int, got {n_heads!r}")
    if n_kv_heads is None:
        n_kv_heads = n_heads
    if isinstance(n_kv_heads, bool) or not isinstance(n_kv_heads, int) or n_kv_heads < 1:
        raise ValueError(f"refattn.{op}: n_kv_heads must be a positive int, got {n_kv_heads!r}")
    if d_model % n_heads:
        raise ValueError(
            f"refattn.{op}: d_model ({d_model}) must be divisible by n_heads ({n_heads})"
        )
    if n_heads % n_kv_heads:
        raise ValueError(
            f"refattn.{op}: n_heads ({n_heads}) must be divisible by n_kv_heads ({n_kv_heads}) "
            "(each key/value head serves n_heads // n_kv_heads query heads)"
        )
    return n_heads, n_kv_heads, d_model // n_heads


def check_mha_params(
    op: str,
    xp: ModuleType,
    params: Any,
    prefix: str,
    *,
    d_model: int,
    d_k: int,
    d_v: int,
    n_heads: int,
    n_kv_heads: int | None,
    dtype: Any,
    bias_kv: bool = False,
    sinks: bool = False,
) -> tuple[int, int, int]:
    """Validate an MHA parameter tree; return ``(n_heads, n_kv_heads, head_dim)``.

    ``prefix`` is the tree's key path for messages (``"self_attn"``, or ``""`` at the root).
    ``bias_kv``: the tree may hold ``bias_k`` and ``bias_v`` (both or neither); ``sinks``: a
    ``(n_heads,)`` ``sinks`` entry (gpt-oss's learnable sink logits).
    """
    n_heads, n_kv_heads, head_dim = check_heads(op, d_model, n_heads, n_kv_heads)
    kv_width = n_kv_heads * head_dim
    for key, d_in, d_out in (
        ("query", d_model, d_model),
        ("key", d_k, kv_width),
        ("value", d_v, kv_width),
        ("out", d_model, d_model),
    ):
        sub = get_subtree(op, params, key, prefix)
        check_affine(op, xp, sub, join_path(prefix, key), d_in=d_in, d_out=d_out, dtype=dtype)
    allowed = {"query", "key", "value", "out"} | ({"bias_k", "bias_v"} if bias_kv else set())
    allowed |= {"sinks"} if sinks else set()
    extra = sorted(set(params) - allowed)
    if extra:
        names = "'query', 'key', 'value', 'out'" + (" and 'bias_k', 'bias_v'" if bias_kv else "")
        names += " and 'sinks'" if sinks else ""
        raise ValueError(
            f"refattn.{op}: unexpected parameter(s) {[join_path(prefix, k) for k in extra]} "
            f"(multi-head attention here has {names})"
        )
    present = [k for k in ("bias_k", "bias_v") if k in params]
    if len(present) == 1:
        raise ValueError(
            f"refattn.{op}: {join_path(prefix, present[0])} needs its partner (torch's "
            "add_bias_kv appends both a key and a value row)"
        )
    for key in present:
        b = params[key]
        if tuple(getattr(b, "shape", ())) != (kv_width,) or b.dtype != dtype:
            raise ValueError(
                f"refattn.{op}: {join_path(prefix, key)} must be a ({kv_width},) array of "
                f"dtype {dtype} (H_kv * head_dim), got {describe(b)}"
            )
    if "sinks" in params:
        b = params["sinks"]
        if tuple(getattr(b, "shape", ())) != (n_heads,) or b.dtype != dtype:
            raise ValueError(
                f"refattn.{op}: {join_path(prefix, 'sinks')} must be a ({n_heads},) array of "
                f"dtype {dtype} (one sink logit per head), got {describe(b)}"
            )
    return n_heads, n_kv_heads, head_dim


def check_mha_inputs(
    op: str, xp: ModuleType, query: Array, key: Array, value: Array, names: tuple[str, str, str]
) -> None:
    """Floating inputs of one dtype with ``(..., n, d)`` shapes and equal leading axes."""
    for name, x in zip(names, (query, key, value), strict=True):
        check_input(op, xp, name, x, min_ndim=2)
    if query.dtype != key.dtype or query.dtype != value.dtype:
        raise TypeError(
            f"refattn.{op}: {names[0]}, {names[1]} and {names[2]} must share one dtype, got "
            f"{query.dtype}, {key.dtype}, {value.dtype}"
        )
    lead = tuple(query.shape[:-2])
    if tuple(key.shape[:-2]) != lead or tuple(value.shape[:-2]) != lead:
        raise ValueError(
            f"refattn.{op}: {names[0]}, {names[1]} and {names[2]} must share their leading "
            f"(batch) axes, got {tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        )
    if key.shape[-2] != value.shape[-2]:
        raise ValueError(
            f"refattn.{op}: {names[1]} and {names[2]} must have the same number of positions "
            f"(axis -2), got {tuple(key.shape)} and {tuple(value.shape)}"
        )


# ----------------------------------------------------------------------------- kernels


@dataclass
class MHASaved:
    """What the MHA backward needs (residuals of :func:`mha_forward`)."""

    xp: Any
    params: Params
    query: Array
    key: Array
    value: Array
    sdpa_saved: Any  # residuals of the attention core (refattn.scaled_dot_product_attention)
    sdpa_options: dict[str, Any]
    o_merged: Array  # (..., n_q, d_model) heads concatenated: the out projection's input
    lead: tuple[int, ...]
    n_heads: int
    head_dim: int
    n_extra: int = 0  # keys appended after the projections (bias_k row, zero row)


def split_heads(xp: ModuleType, x: Array, n_heads: int, head_dim: int) -> Array:
    """``(*lead, n, n_heads * hd) -> (*lead, n_heads, n, hd)`` (a strided view on NumPy)."""
    lead = tuple(x.shape[:-2])
    n = int(x.shape[-2])
    x = xp.reshape(x, (*lead, n, n_heads, head_dim))
    nl = len(lead)
    return xp.permute_dims(x, (*range(nl), nl + 1, nl, nl + 2))


def merge_heads(xp: ModuleType, x: Array, lead: tuple[int, ...]) -> Array:
    """``(*lead, heads, n, hd) -> (*lead, n, heads * hd)`` (one copy)."""
    heads, n, hd = (int(s) for s in x.shape[-3:])
    b = math.prod(lead)
    x = xp.permute_dims(xp.reshape(x, (b, heads, n, hd)), (0, 2, 1, 3))
    return xp.reshape(x, (*lead, n, heads * hd))


def project_kv(
    xp: ModuleType, params: Params, key: Array, value: Array, n_kv_heads: int, head_dim: int
) -> tuple[Array, Array]:
    """Key and value projections split into heads: ``(*lead, H_kv, n_k, hd)`` each."""
    k = split_heads(xp, affine_forward(xp, params["key"], key), n_kv_heads, head_dim)
    v = split_heads(xp, affine_forward(xp, params["value"], value), n_kv_heads, head_dim)
    return k, v


def mha_forward(
    xp: ModuleType,
    params: Params,
    query: Array,
    key: Array,
    value: Array,
    *,
    n_heads: int,
    n_kv_heads: int,
    head_dim: int,
    need_weights: bool = False,
    projected_kv: tuple[Array, Array] | None = None,
    add_zero_attn: bool = False,
    **sdpa_options: Any,
) -> tuple[Array, Array | None, MHASaved]:
    """``(y, weights or None, saved)``, no parameter validation.

    ``weights`` is ``(..., H, n_q, n_k)`` when ``need_weights``. ``projected_kv`` (used by the
    KV cache) supplies already projected heads ``(*lead, H_kv, n_k, hd)`` instead of projecting
    ``key`` and ``value``; the result is then not differentiable through them.
    ``sdpa_options`` go to :func:`refattn.scaled_dot_product_attention` as they are (masks,
    bias, causal, softcap, dropout: whatever the attention core takes), so a new SDPA option
    needs no change here. With ``bias_k``/``bias_v`` in ``params`` or ``add_zero_attn``, the
    keys are extended (module docstring) and ``mask``, ``bias``, ``dropout_mask`` padded.
    """
    lead = tuple(query.shape[:-2])
    qh = split_heads(xp, affine_forward(xp, params["query"], query), n_heads, head_dim)
    if projected_kv is None:
        kh, vh = project_kv(xp, params, key, value, n_kv_heads, head_dim)
    else:
        kh, vh = projected_kv
    extra_rows = _extra_kv_rows(xp, params, kh, add_zero_attn)
    if extra_rows:
        kh = xp.concat([kh, *(rk for rk, _ in extra_rows)], axis=-2)
        vh = xp.concat([vh, *(rv for _, rv in extra_rows)], axis=-2)
        sdpa_options = _pad_score_options(xp, sdpa_options, int(key.shape[-2]), len(extra_rows))
    options = {**sdpa_options, "return_weights": need_weights}
    if "sinks" in params:  # learnable: bias and sinks go positionally (primals of the core)
        bias = options.pop("bias", None)
        result, sdpa_saved = _sdpa.forward(qh, kh, vh, bias, params["sinks"], **options)
    else:
        result, sdpa_saved = _sdpa.forward(qh, kh, vh, **options)
    o, weights = result if need_weights else (result, None)
    o_merged = merge_heads(xp, o, lead)  # (*lead, H, n_q, hd) -> (*lead, n_q, H * hd)
    y = affine_forward(xp, params["out"], o_merged)
    saved = MHASaved(
        xp=xp,
        params=params,
        query=query,
        key=key,
        value=value,
        sdpa_saved=sdpa_saved,
        sdpa_options=options,
        o_merged=o_merged,
        lead=lead,
        n_heads=n_heads,
        head_dim=head_dim,
        n_extra=len(extra_rows),
    )
    return y, weights, saved


def _extra_kv_rows(
    xp: ModuleType, params: Params, kh: Array, add_zero_attn: bool
) -> list[tuple[Array, Array]]:
    """The key/value rows appended after the projections, ``(*lead, H_kv, 1, hd)`` each:
    torch's ``bias_k``/``bias_v`` row, then ``add_zero_attn``'s zero row."""
    *lead, h_kv, _, hd = (int(n) for n in kh.shape)
    shape = (*lead, h_kv, 1, hd)
    rows = []
    if "bias_k" in params:
        rows.append(
            tuple(
                xp.broadcast_to(xp.reshape(params[name], (h_kv, 1, hd)), shape)
                for name in ("bias_k", "bias_v")
            )
        )
    if add_zero_attn:
        zero = xp.zeros(shape, dtype=kh.dtype, device=device_of(kh))
        rows.append((zero, zero))
    return rows


def _pad_score_options(
    xp: ModuleType, options: dict[str, Any], n_k: int, n_extra: int
) -> dict[str, Any]:
    """``mask``, ``bias`` and ``dropout_mask`` over ``n_k + n_extra`` keys: the appended keys
    are visible (True), unbiased (0) and kept (1), as torch pads ``attn_mask`` and
    ``key_padding_mask``."""
    padded = dict(options)
    for name, fill in (("mask", True), ("bias", 0.0), ("dropout_mask", True)):
        x = options.get(name)
        if x is None:
            continue
        x = xp.broadcast_to(x, (*x.shape[:-1], n_k))
        pad = xp.full((*x.shape[:-1], n_extra), fill, dtype=x.dtype, device=device_of(x))
        padded[name] = xp.concat([x, pad], axis=-1)
    return padded


def mha_backward(
    saved: MHASaved,
    dy: Array | None,
    d_weights: Array | None = None,
    *,
    head_cotangents: list[Array] | None = None,
) -> tuple[Params, Array, Array, Array]:
    """``(dparams, dquery, dkey, dvalue)`` of :func:`mha_forward` (see :func:`_mha_bwd`).

    ``head_cotangents``, if a list, gets the cotangent of the heads' attention output
    ``(*lead, H, n_q, hd)`` appended: what :mod:`refattn.interpret` turns into the weights'
    cotangents ``dO V^T`` and head importances (torch users get it with ``retain_grad``).
    """
    xp, params = saved.xp, saved.params
    if dy is None:
        dy = xp.zeros_like(saved.o_merged)
    # out projection: y = O W_o + b_o
    g_out, d_om = affine_backward(xp, params["out"], saved.o_merged, dy)
    # un-merge the heads: (*lead, n_q, H * hd) -> (*lead, H, n_q, hd), a strided view
    d_o = split_heads(xp, d_om, saved.n_heads, saved.head_dim)
    if head_cotangents is not None:
        head_cotangents.append(d_o)
    cotangent = (d_o, d_weights) if saved.sdpa_options["return_weights"] else d_o
    del d_om, d_o  # (the cotangent keeps them while needed)
    grads = {}
    if "sinks" in params:
        d_all = _sdpa.apply_backward(saved.sdpa_saved, cotangent, **saved.sdpa_options, n_primals=5)
        d_qkv, grads["sinks"] = list(d_all[:3]), d_all[4]
    else:
        d_qkv = list(_sdpa.apply_backward(saved.sdpa_saved, cotangent, **saved.sdpa_options))
    del cotangent
    if saved.n_extra:  # the appended rows: bias_k/bias_v get theirs, the zero row none
        n_k = int(d_qkv[1].shape[-2]) - saved.n_extra
        if "bias_k" in params:
            batch_axes = tuple(range(len(saved.lead)))
            for i, name in ((1, "bias_k"), (2, "bias_v")):
                row = d_qkv[i][..., n_k, :]  # (*lead, H_kv, hd)
                total = xp.sum(row, axis=batch_axes) if batch_axes else row
                grads[name] = xp.reshape(total, tuple(params[name].shape))
        d_qkv[1], d_qkv[2] = d_qkv[1][..., :n_k, :], d_qkv[2][..., :n_k, :]
    # projections Q = x_q W_q + b_q etc.: merge the heads' gradients back into columns. Each
    # head gradient is dropped as soon as it is used, so that the next input gradient reuses its
    # memory (fewer fresh pages: on the 2-core VM each page fault costs microseconds).
    d_inputs = []
    for i, name in enumerate(("query", "key", "value")):
        d_heads = merge_heads(xp, d_qkv[i], saved.lead)
        d_qkv[i] = None
        grads[name], d_x = affine_backward(xp, params[name], getattr(saved, name), d_heads)
        del d_heads
        d_inputs.append(d_x)
    grads["out"] = g_out
    return {k: grads[k] for k in params}, *d_inputs


# ----------------------------------------------------------------------------- the op


def _mha_fwd(
    params: Params,
    query: Array,
    key: Array,
    value: Array,
    /,
    *,
    n_heads: int,
    n_kv_heads: int | None = None,
    mask: Array | None = None,
    bias: Array | None = None,
    is_causal: bool = False,
    causal_alignment: str = "upper_left",
    window: int | tuple[int | None, int | None] | None = None,
    sink_tokens: int = 0,
    query_lengths: Any = None,
    key_lengths: Any = None,
    softcap: float | None = None,
    dropout_mask: Array | None = None,
    dropout_p: float = 0.0,
    add_zero_attn: bool = False,
    batch_first: bool = True,
    return_weights: bool = False,
) -> tuple[Any, Any]:
    r"""Multi-head attention with affine projections (torch's ``nn.MultiheadAttention``).

    .. math::

        y = \mathrm{concat}_h\Bigl(\mathrm{SDPA}\bigl(x_q W_q^{(h)} + b_q^{(h)},\;
        x_k W_k^{(h//g)} + b_k^{(h//g)},\; x_v W_v^{(h//g)} + b_v^{(h//g)}\bigr)\Bigr) W_o + b_o,

    with scale ``1/sqrt(head_dim)``.

    Parameters
    ----------
    params : {"query", "key", "value", "out"}, each ``{"weight": (d_in, d_out), "bias"}``
        Shapes in the module docstring; ``bias`` entries are optional. Optional ``"bias_k"``
        and ``"bias_v"``, ``(H_kv * head_dim,)`` each: torch's ``add_bias_kv=True``, one more
        key and value row appended after the projections (learnable: they get gradients).
        Optional ``"sinks"``, ``(n_heads,)``: gpt-oss's learnable sink logits, one per head in
        each row's softmax denominator (SDPA's ``sinks``; learnable too).
    query : (..., n_q, d_model)
    key : (..., n_k, d_k)
    value : (..., n_k, d_v)
        ``d_k`` and ``d_v`` may differ from ``d_model`` (cross-attention; torch's kdim/vdim).
        The leading axes ``...`` must be equal. **Self-attention** passes the same array three
        times; its gradient is then ``dquery + dkey + dvalue`` (the vjp returns the three
        separately, and the caller sums them).
    n_heads : int
        Query heads; ``d_model`` must be divisible by it.
    n_kv_heads : int, optional
        Key/value heads (default ``n_heads``); ``1`` is MQA, other divisors GQA. Query head
        ``h`` uses key/value head ``h // (n_heads // n_kv_heads)``.
    mask : bool, broadcastable to (..., n_heads, n_q, n_k), optional
        True = attend (convert torch's masks with ``refattn.from_torch_mha_masks``). A key
        padding mask ``(B, n_k)`` is ``mask[:, None, None, :]``.
    bias : float, broadcastable to (..., n_heads, n_q, n_k), optional
        Added to the scaled scores (torch's float ``attn_mask``).
    is_causal : bool
        Mask keys after the query (``causal_alignment`` as in
        :func:`refattn.scaled_dot_product_attention`, default "upper_left" like torch).
    window : int or (left, right), optional
        Local attention window, as in :func:`refattn.scaled_dot_product_attention`.
    sink_tokens : int >= 0
        StreamingLLM's sink tokens, kept through the ``window`` (SDPA's ``sink_tokens``).
    query_lengths, key_lengths : ints, one per batch element, optional
        A padded batch, as in :func:`refattn.scaled_dot_product_attention` (each sequence on
        its own causal diagonal under "lower_right"). Padded query rows attend nothing, so
        their output is the output projection's bias.
    softcap : float > 0, optional
        ``c tanh(s / c)`` on the scaled scores, as in :func:`refattn.scaled_dot_product_attention`.
    dropout_mask : bool or float, broadcastable to (..., n_heads, n_q, n_k), optional
        Dropout on the attention weights, True/1 = keep, scaled by ``1/(1-dropout_p)``.
    dropout_p : float in [0, 1)
    add_zero_attn : bool
        torch's ``add_zero_attn``: a zero key and value row appended (after ``bias_k``/``bias_v``).
        The appended keys are visible to every query: ``mask``, ``bias`` and ``dropout_mask``
        cover the ``n_k`` real keys and are padded with True, 0 and keep for the appended ones
        (as torch pads its masks); ``is_causal``, ``window`` and the lengths are refused with
        them (give the causal mask as ``mask``).
    batch_first : bool
        True (default): ``(..., batch, n, d)`` inputs and output. False: torch's default
        sequence-first ``(n, batch, d)`` (at least 3 axes); masks, bias and weights keep
        their ``(batch, n_heads, n_q, n_k)`` layout either way.
    return_weights : bool
        Also return the per-head weights ``(..., n_heads, n_q, n_k)`` (before dropout; torch's
        ``average_attn_weights=False``); with appended keys, ``n_k + 1`` or ``n_k + 2`` columns,
        the appended ones last, as torch returns them.

    Returns
    -------
    y : (..., n_q, d_model), or ``(y, weights)``.
    """
    xp = namespace(query, key, value, mask, bias, dropout_mask, *array_leaves(params))
    query, key, value = batch_first_view(_OP, xp, batch_first, query=query, key=key, value=value)
    check_mha_inputs(_OP, xp, query, key, value, ("query", "key", "value"))
    d_model = int(query.shape[-1])
    n_heads, n_kv_heads, head_dim = check_mha_params(
        _OP,
        xp,
        params,
        "",
        d_model=d_model,
        d_k=int(key.shape[-1]),
        d_v=int(value.shape[-1]),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        dtype=query.dtype,
        bias_kv=True,
        sinks=True,
    )
    _check_appended_keys(
        "bias_k" in params, add_zero_attn, is_causal, window, query_lengths, key_lengths
    )
    scores_shape = (*query.shape[:-2], n_heads, int(query.shape[-2]), int(key.shape[-2]))
    score_options = {
        "mask": mask,
        "bias": bias,
        "is_causal": is_causal,
        "causal_alignment": causal_alignment,
        "window": window,
        "sink_tokens": sink_tokens,
        "softcap": softcap,
        "dropout_mask": dropout_mask,
        "dropout_p": dropout_p,
    }
    _, window_pair = check_score_options(_OP, xp, scores_shape, query.dtype, **score_options)
    check_lengths(
        _OP, scores_shape, query_lengths, key_lengths, is_causal, causal_alignment, window_pair
    )  # before any projection, like the score options
    score_options.update(query_lengths=query_lengths, key_lengths=key_lengths)
    y, weights, saved = mha_forward(
        xp,
        params,
        query,
        key,
        value,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        need_weights=return_weights,
        add_zero_attn=add_zero_attn,
        **score_options,
    )
    y = y if batch_first else swap_batch_and_sequence(xp, y)
    return ((y, weights) if return_weights else y), saved


def _check_appended_keys(
    bias_kv: bool,
    add_zero_attn: Any,
    is_causal: Any,
    window: Any,
    query_lengths: Any,
    key_lengths: Any,
) -> None:
    """``add_zero_attn`` is a bool; appended keys (``bias_k``/``bias_v``, the zero row) are
    seen by every query, which no structured mask says: those are refused with them."""
    if not isinstance(add_zero_attn, bool):
        raise TypeError(f"refattn.{_OP}: add_zero_attn must be a bool, got {add_zero_attn!r}")
    if not (bias_kv or add_zero_attn):
        return
    given = [
        name
        for name, value in (
            ("is_causal", is_causal),
            ("window", window),
            ("query_lengths", query_lengths),
            ("key_lengths", key_lengths),
        )
        if value not in (None, False)
    ]
    if given:
        what = "bias_k/bias_v" if bias_kv else "add_zero_attn"
        raise ValueError(
            f"refattn.{_OP}: {', '.join(given)} cannot be combined with {what}: the appended "
            "keys are visible to every query (torch pads its masks so); give the causal or "
            "padding mask over the n_k real keys as mask= instead"
        )


def _mha_bwd(
    saved: MHASaved, cotangent: Any, /, *, return_weights: bool = False, batch_first: bool = True
) -> tuple[Params, Array, Array, Array]:
    r"""VJP of multi-head attention: the forward's pieces in reverse.

    With :math:`O` the heads concatenated, ``(B n_q, d_model)``:

    .. math::

        dW_o = O^\top dy,\quad db_o = \textstyle\sum dy,\quad dO = dy\,W_o^\top,

    then ``dO`` is split back into heads and the attention core's backward
    (:func:`refattn.scaled_dot_product_attention`'s backward, derivation there) gives
    ``dQ, dK, dV`` per head (with GQA, ``dK, dV`` sum the ``g`` query heads sharing a kv head);
    the heads are merged back to ``(..., n, H*hd)`` columns and each projection's affine VJP
    gives

    .. math::

        dW_q = x_q^\top dQ,\quad db_q = \textstyle\sum dQ,\quad dx_q = dQ\,W_q^\top

    and likewise for keys and values. A cotangent for the returned weights adds
    :math:`P \circ (dP - \mathrm{rowsum}(P \circ dP))` to the scores' gradient.
    """
    if return_weights:
        dy, d_weights = cotangent
    else:
        dy, d_weights = cotangent, None
    return batch_first_vjp(mha_backward, saved, dy, batch_first, d_weights)


multi_head_attention = Op(_mha_fwd, _mha_bwd, name="multi_head_attention", register=True)


# ----------------------------------------------------------------------------- init


def mha_params(
    xp: ModuleType,
    rng: Any,
    d_model: int,
    n_heads: int,
    n_kv_heads: int | None,
    kdim: int,
    vdim: int,
    bias: bool,
    dtype: Any,
) -> Params:
    """MHA parameters with ``nn.MultiheadAttention``'s init (:func:`init_multi_head_attention`)."""
    _, n_kv, head_dim = check_heads("init_multi_head_attention", d_model, n_heads, n_kv_heads)
    kv_width = n_kv * head_dim
    if kdim == d_model and vdim == d_model:
        # packed in_proj_weight: xavier_uniform over the whole (d_model + 2 kv_width, d_model)
        total = d_model + 2 * kv_width
        packed = uniform(xp, rng, (d_model, total), math.sqrt(6.0 / (d_model + total)), dtype)
        weights = [
            packed[:, :d_model],
            packed[:, d_model : d_model + kv_width],
            packed[:, d_model + kv_width :],
        ]
    else:
        weights = [
            uniform(xp, rng, (d_in, d_out), math.sqrt(6.0 / (d_in + d_out)), dtype)
            for d_in, d_out in ((d_model, d_model), (kdim, kv_width), (vdim, kv_width))
        ]
    out = linear_params(xp, rng, d_model, d_model, bias, dtype)
    params: Params = {}
    for key, w in zip(("query", "key", "value"), weights, strict=True):
        params[key] = {"weight": xp.asarray(w, copy=True)}
        if bias:
            params[key]["bias"] = xp.zeros((w.shape[1],), dtype=dtype)
    if bias:
        out["bias"] = xp.zeros((d_model,), dtype=dtype)
    params["out"] = out
    return params


def init_multi_head_attention(
    d_model: int,
    n_heads: int,
    *,
    n_kv_heads: int | None = None,
    kdim: int | None = None,
    vdim: int | None = None,
    bias: bool = True,
    seed: int = 0,
    xp: ModuleType | None = None,
    dtype: Any = "float64",
) -> Params:
    r"""MHA parameters initialised with ``nn.MultiheadAttention``'s scheme.

    * Query/key/value weights: ``xavier_uniform_``. When ``kdim == vdim == d_model`` torch
      initialises the *packed* ``in_proj_weight`` as one matrix, so the bound is
      :math:`\sqrt{6 / (d_{model} + d_{model} + 2 H_{kv} h_d)}` (``sqrt(6 / (4 d_model))`` for
      plain MHA); otherwise each projection gets its own bound
      :math:`\sqrt{6/(d_{in} + d_{out})}`.
    * Out weight: ``nn.Linear``'s :math:`U(\pm 1/\sqrt{d_{model}})`.
    * All biases: zeros.

    Values are drawn on the host with ``numpy.random.default_rng(seed)`` and moved to ``xp``
    (NumPy by default) in ``dtype``.
    """
    import numpy as np  # host RNG for initial values only

    fn = "init_multi_head_attention"
    check_size(fn, "d_model", d_model)
    kdim = d_model if kdim is None else check_size(fn, "kdim", kdim)
    vdim = d_model if vdim is None else check_size(fn, "vdim", vdim)
    xp = default_namespace() if xp is None else xp
    return mha_params(
        xp,
        np.random.default_rng(seed),
        d_model,
        n_heads,
        n_kv_heads,
        kdim,
        vdim,
        bias,
        resolve_dtype(xp, dtype),
    )
