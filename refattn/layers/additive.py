r"""Bahdanau (additive) and Luong (multiplicative) attention, with hand-derived backward passes.

Both attend from one query vector per batch entry (a decoder state ``s``) over ``n`` encoder
states ``h_j`` and return ``(context, weights)``:

.. math::

    \alpha = \mathrm{softmax}_{\mathrm{kept}}(e),\qquad c = \textstyle\sum_j \alpha_j h_j,

with the energies ``e_j`` of the chosen mechanism:

=====================  ====================================================  ==================
mechanism              energy :math:`e_j`                                    params
=====================  ====================================================  ==================
additive (Bahdanau)    :math:`v^\top \tanh(W_h h_j + W_s s)`                 ``W_h, W_s, v``
Luong ``"dot"``        :math:`h_j^\top s`                                    ``{}``
Luong ``"general"``    :math:`h_j^\top (W s)`                                ``W``
Luong ``"concat"``     :math:`v^\top \tanh(W [h_j; s])`                      ``W, v``
=====================  ====================================================  ==================

Luong's local attention (``local="m"`` at a given position, ``local="p"`` at a predicted one,
with a Gaussian) restricts any of the three Luong scores to a window; see
:func:`multiplicative_attention`.

Parameters follow refattn's convention (see :mod:`refattn.layers.basic`): an affine map is
``{"weight": (d_in, d_out), "bias"?: (d_out,)}`` used as ``x @ weight + bias``, the transpose of
``nn.Linear.weight``. ``v`` is an affine map **without bias**, ``{"weight": (d_attn, 1)}`` (the
layout of ``nn.Linear(d_attn, 1, bias=False)`` transposed): a bias would add the same constant
to every energy and cancel in the softmax, so it is rejected rather than given a zero gradient.

Shapes: ``query (batch, d_q)``, ``keys (batch, n, d_h)``; ``mask`` boolean, True = attend,
broadcastable to ``(batch, n)``. A fully masked row gives zero weights and a zero context, with
zero gradients (the :func:`refattn.softmax` rule). The outputs are the tuple
``(context (batch, d_h), weights (batch, n))``; the cotangent is a tuple of the same length with
``None`` for an output that is not differentiated, and ``refattn.vjp`` returns
``(dparams, dquery, dkeys)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import ModuleType
from typing import Any

from .._backend import default_namespace, describe, device_of, namespace
from .._op import Op
from ..ops.softmax import check_broadcast, check_mask, masked_softmax_parts, normalize
from .basic import (
    affine_backward,
    affine_forward,
    check_affine,
    check_input,
    check_size,
    get_subtree,
    linear_params,
    resolve_dtype,
    same_dtype,
)

__all__ = [
    "LUONG_METHODS",
    "additive_attention",
    "init_additive_attention",
    "init_multiplicative_attention",
    "multiplicative_attention",
]

Array = Any
Params = dict[str, Any]

LUONG_METHODS = ("dot", "general", "concat")


# ----------------------------------------------------------------------------- validation


def array_leaves(tree: Any) -> list[Any]:
    if isinstance(tree, Mapping):
        return [leaf for value in tree.values() for leaf in array_leaves(value)]
    return [tree] if hasattr(tree, "shape") else []


def _check_inputs(op: str, xp: ModuleType, query: Any, keys: Any, mask: Any) -> tuple[int, ...]:
    """Validate ``query (batch, d_q)``, ``keys (batch, n, d_h)`` and the mask; return sizes."""
    check_input(op, xp, "query", query)
    check_input(op, xp, "keys", keys)
    same_dtype(op, xp, {"query": query, "keys": keys})
    if query.ndim != 2 or keys.ndim != 3 or query.shape[0] != keys.shape[0]:
        raise ValueError(
            f"refattn.{op}: expected query (batch, d_q) and keys (batch, n, d_h) with the same "
            f"batch, got query {describe(query)} and keys {describe(keys)}"
        )
    batch, n, d_h = (int(s) for s in keys.shape)
    if mask is not None:
        check_mask(xp, f"{op}: mask", mask, (batch, n))
    return batch, n, d_h, int(query.shape[1])


def check_param_keys(op: str, params: Any, allowed: tuple[str, ...], what: str) -> None:
    if not isinstance(params, Mapping):
        raise TypeError(f"refattn.{op}: params must be a dict, got {type(params).__name__}")
    extra = sorted(set(params) - set(allowed))
    if extra:
        raise ValueError(
            f"refattn.{op}: unexpected parameter(s) {extra} for {what} "
            f"(expected exactly {list(allowed)})"
        )


def _check_v(op: str, xp: ModuleType, params: Params, d_attn: int, dtype: Any) -> None:
    """``v`` is ``{"weight": (d_attn, 1)}`` with no bias."""
    check_affine(op, xp, get_subtree(op, params, "v", ""), "v", d_in=d_attn, d_out=1, dtype=dtype)
    if "bias" in params["v"]:
        raise ValueError(
            f"refattn.{op}: parameter 'v.bias' is not allowed: 'v' is an affine map without bias "
            "({'weight': (d_attn, 1)}); a bias adds one constant to every energy and cancels in "
            "the softmax"
        )


# ----------------------------------------------------------------------------- shared pieces


def _tanh_energy(xp: ModuleType, z: Array, v_weight: Array) -> tuple[Array, Array]:
    """``e = tanh(z) @ v`` for pre-activations ``z (batch, n, d_attn)``: ``(e, tanh(z))``."""
    t = xp.tanh(z)
    return (t @ v_weight)[..., 0], t


def _tanh_energy_bwd(xp: ModuleType, t: Array, v_weight: Array, d_e: Array) -> tuple[Array, Array]:
    r"""``(dz, dv)`` of :func:`_tanh_energy`: :math:`dv = \sum_{b,j} t_{bj}\, de_{bj}`,
    :math:`dz = de\, v^\top \circ (1 - t^2)`."""
    d_attn = int(t.shape[-1])
    d_v = xp.matrix_transpose(xp.reshape(t, (-1, d_attn))) @ xp.reshape(d_e, (-1, 1))
    d_z = (d_e[..., None] * v_weight[:, 0]) * (1.0 - t * t)
    return d_z, d_v


def _attend(xp: ModuleType, e: Array, keys: Array, mask: Array | None) -> tuple[Array, Array]:
    """``(context, alpha)``: masked softmax over ``n`` and the weighted sum of the keys."""
    ex, total, _ = masked_softmax_parts(e, axis=-1, keep=mask, xp=xp)
    alpha = normalize(ex, total, xp=xp)
    return (alpha[:, None, :] @ keys)[:, 0, :], alpha


def _weighted_sum_bwd(
    xp: ModuleType, alpha: Array, keys: Array, cotangent: Any
) -> tuple[Array, Array]:
    r"""``(dalpha_tot, dkeys)`` of ``c = alpha @ keys`` with ``alpha`` also an output, from the
    tuple cotangent ``(dc, dalpha)``: :math:`d\alpha^{tot}_j = d\alpha_j + h_j \cdot dc`,
    :math:`dh_j = \alpha_j\, dc`."""
    d_c, d_alpha = cotangent
    if d_c is None:
        d_c = xp.zeros((keys.shape[0], keys.shape[2]), dtype=keys.dtype, device=device_of(keys))
    d_total = (keys @ d_c[:, :, None])[..., 0]
    if d_alpha is not None:
        d_total = d_total + d_alpha
    return d_total, alpha[:, :, None] * d_c[:, None, :]


def _attend_bwd(xp: ModuleType, alpha: Array, keys: Array, cotangent: Any) -> tuple[Array, Array]:
    r"""``(de, dkeys)`` of :func:`_attend` from the tuple cotangent ``(dc, dalpha)``.

    .. math::

        dh_j \mathrel{+}= \alpha_j\, dc,\qquad
        d\alpha^{tot}_j = d\alpha_j + h_j \cdot dc,\qquad
        de = \alpha \circ \bigl(d\alpha^{tot} - \textstyle\sum_j \alpha_j d\alpha^{tot}_j\bigr).
    """
    d_total, d_keys = _weighted_sum_bwd(xp, alpha, keys, cotangent)
    d_e = alpha * (d_total - xp.sum(alpha * d_total, axis=-1, keepdims=True))
    return d_e, d_keys


# ----------------------------------------------------------------------------- Bahdanau


def _additive_attention_fwd(
    params: Params, query: Array, keys: Array, /, *, mask: Array | None = None
) -> tuple[tuple[Array, Array], Any]:
    r"""Additive attention (Bahdanau, Cho, Bengio 2015).

    .. math::

        e_j = v^\top \tanh(W_h h_j + W_s s),\qquad
        \alpha = \mathrm{softmax}_{\mathrm{kept}}(e),\qquad
        c = \textstyle\sum_j \alpha_j h_j .

    Parameters
    ----------
    params : {"W_h": affine, "W_s": affine, "v": {"weight"}}
        ``W_h`` is ``(d_h, d_attn)``, ``W_s`` is ``(d_q, d_attn)``, ``v.weight`` is
        ``(d_attn, 1)``. ``W_h`` and ``W_s`` may have a bias (the reference module has none);
        ``v`` may not.
    query : (batch, d_q)
        The decoder state ``s``.
    keys : (batch, n, d_h)
        The encoder states ``h_j`` (also the values).
    mask : bool, broadcastable to (batch, n), True = attend

    Returns
    -------
    (context (batch, d_h), weights (batch, n))
    """
    op = "additive_attention"
    xp = namespace(query, keys, mask, *array_leaves(params))
    _batch, _n, d_h, d_q = _check_inputs(op, xp, query, keys, mask)
    check_param_keys(op, params, ("W_h", "W_s", "v"), "additive attention")
    dt = query.dtype
    _, d_attn = check_affine(
        op, xp, get_subtree(op, params, "W_h", ""), "W_h", d_in=d_h, d_out=None, dtype=dt
    )
    check_affine(
        op, xp, get_subtree(op, params, "W_s", ""), "W_s", d_in=d_q, d_out=d_attn, dtype=dt
    )
    _check_v(op, xp, params, d_attn, dt)
    s_proj = affine_forward(xp, params["W_s"], query)
    z = affine_forward(xp, params["W_h"], keys) + s_proj[:, None, :]
    e, t = _tanh_energy(xp, z, params["v"]["weight"])
    context, alpha = _attend(xp, e, keys, mask)
    return (context, alpha), (xp, params, query, keys, t, alpha)


def _additive_attention_bwd(residuals: Any, cotangent: Any, /) -> tuple[Params, Array, Array]:
    r"""VJP of additive attention.

    With :math:`z_j = W_h h_j + W_s s` (rows ``x @ weight + bias``), :math:`t = \tanh z`, and
    :math:`de` from the softmax and weighted sum (:func:`_attend_bwd`):

    .. math::

        dv = \textstyle\sum_{b,j} t_{bj}\, de_{bj},\qquad
        dz_j = de_j\, v \circ (1 - t_j^2), \\
        dW_h = \textstyle\sum_{b,j} h_j\, dz_j^\top,\quad db_h = \sum_{b,j} dz_j,\quad
        dh_j \mathrel{+}= W_h\text{-weight}\; dz_j, \\
        dW_s = \textstyle\sum_b s\,(\sum_j dz_j)^\top,\quad
        db_s = \sum_{b,j} dz_j,\quad ds = W_s\text{-weight} \textstyle\sum_j dz_j .

    ``keys`` enter twice (as values and through ``W_h``); their two gradients add.
    """
    xp, params, query, keys, t, alpha = residuals
    d_e, d_keys = _attend_bwd(xp, alpha, keys, cotangent)
    d_z, d_v = _tanh_energy_bwd(xp, t, params["v"]["weight"], d_e)
    g_h, dk_h = affine_backward(xp, params["W_h"], keys, d_z)
    g_s, d_query = affine_backward(xp, params["W_s"], query, xp.sum(d_z, axis=1))
    grads = {"W_h": g_h, "W_s": g_s, "v": {"weight": d_v}}
    return _like(params, grads), d_query, d_keys + dk_h


additive_attention = Op(
    _additive_attention_fwd, _additive_attention_bwd, name="additive_attention", register=True
)


def _like(params: Params, grads: Params) -> Params:
    """``grads`` reordered to ``params``' key order (gradients mirror their primal's structure)."""
    out: Params = {}
    for key, value in params.items():
        out[key] = _like(value, grads[key]) if isinstance(value, Mapping) else grads[key]
    return out


# ----------------------------------------------------------------------------- Luong


def _luong_params(
    op: str,
    xp: ModuleType,
    params: Any,
    method: Any,
    local: Any,
    d_h: int,
    d_q: int,
    dtype: Any,
) -> None:
    if method not in LUONG_METHODS:
        raise ValueError(
            f"refattn.{op}: method must be one of {list(LUONG_METHODS)}, got {method!r}"
        )
    extra = ("W_p", "v_p") if local == "p" else ()
    if method == "dot":
        check_param_keys(op, params, extra, "method='dot' (it has no parameters: pass {})")
        if d_q != d_h:
            raise ValueError(
                f"refattn.{op}: method='dot' needs d_q == d_h, got query of width {d_q} and "
                f"keys of width {d_h}; use method='general' to map between them"
            )
    elif method == "general":
        check_param_keys(op, params, ("W", *extra), "method='general'")
        check_affine(
            op, xp, get_subtree(op, params, "W", ""), "W", d_in=d_q, d_out=d_h, dtype=dtype
        )
    else:
        check_param_keys(op, params, ("W", "v", *extra), "method='concat'")
        _, d_attn = check_affine(
            op, xp, get_subtree(op, params, "W", ""), "W", d_in=d_h + d_q, d_out=None, dtype=dtype
        )
        _check_v(op, xp, params, d_attn, dtype)
    if local == "p":
        for key in extra:
            if key not in params:
                raise ValueError(
                    f"refattn.{op}: local='p' needs parameters 'W_p' (d_q, d_p) and 'v_p' "
                    f"(d_p, 1) for the predicted position; {key!r} is missing"
                )
        _, d_p = check_affine(
            op, xp, get_subtree(op, params, "W_p", ""), "W_p", d_in=d_q, d_out=None, dtype=dtype
        )
        check_affine(
            op, xp, get_subtree(op, params, "v_p", ""), "v_p", d_in=d_p, d_out=1, dtype=dtype
        )


def _check_positions(
    op: str, xp: ModuleType, name: str, value: Any, batch: int, like: Array
) -> Array:
    """An int or an integer array broadcastable to ``(batch,)``, as ``like``'s float dtype."""
    if isinstance(value, bool) or not (
        isinstance(value, int) or (hasattr(value, "dtype") and xp.isdtype(value.dtype, "integral"))
    ):
        raise TypeError(
            f"refattn.{op}: {name} must be an int or an integer array of shape ({batch},), "
            f"got {describe(value)}"
        )
    if isinstance(value, int):
        value = xp.asarray(value, device=device_of(like))
    check_broadcast(f"{op}: {name}", value, (batch,))
    return xp.astype(xp.broadcast_to(value, (batch,)), like.dtype)


def _check_local(
    op: str,
    xp: ModuleType,
    local: Any,
    window: Any,
    position: Any,
    source_length: Any,
    batch: int,
    n: int,
    like: Array,
) -> tuple[Array | None, Array | None]:
    """Validate Luong's local options; return ``(position, S)`` as float arrays (or None)."""
    if local not in (None, "m", "p"):
        raise ValueError(f"refattn.{op}: local must be None, 'm' or 'p', got {local!r}")
    if local is None:
        for name, value in (("window", window), ("position", position)):
            if value is not None:
                raise ValueError(f"refattn.{op}: {name} is given but local is None")
        if source_length is not None:
            raise ValueError(f"refattn.{op}: source_length is given but local is not 'p'")
        return None, None
    low = 1 if local == "p" else 0
    if isinstance(window, bool) or not isinstance(window, int) or window < low:
        raise ValueError(
            f"refattn.{op}: local={local!r} needs window D, an int >= {low} (the half-width of "
            f"[p - D, p + D]{'; sigma = D/2' if local == 'p' else ''}), got {window!r}"
        )
    if local == "m":
        if position is None:
            raise ValueError(
                f"refattn.{op}: local='m' needs position, the aligned source position p_t "
                f"(an int or an integer array of shape ({batch},))"
            )
        if source_length is not None:
            raise ValueError(f"refattn.{op}: source_length is given but local is not 'p'")
        return _check_positions(op, xp, "position", position, batch, like), None
    if position is not None:
        raise ValueError(
            f"refattn.{op}: local='p' predicts the position from the query; position must be None"
        )
    length = n if source_length is None else source_length
    s = _check_positions(op, xp, "source_length", length, batch, like)
    if not bool(xp.all(s >= 1)):
        raise ValueError(f"refattn.{op}: source_length must be >= 1, got {describe(length)}")
    return None, s


def _luong_energy(
    xp: ModuleType, params: Params, method: str, query: Array, keys: Array
) -> tuple[Array, Array | None, Array | None]:
    """Luong's score ``e (batch, n)`` for ``method``, with what its backward needs."""
    t = s_proj = None
    if method == "dot":
        e = (keys @ query[:, :, None])[..., 0]
    elif method == "general":
        s_proj = affine_forward(xp, params["W"], query)
        e = (keys @ s_proj[:, :, None])[..., 0]
    else:
        d_h = int(keys.shape[2])
        weight = params["W"]["weight"]
        s_part = query @ weight[d_h:, :]
        if "bias" in params["W"]:
            s_part = s_part + params["W"]["bias"]
        z = xp.reshape(xp.reshape(keys, (-1, d_h)) @ weight[:d_h, :], (*keys.shape[:2], -1))
        e, t = _tanh_energy(xp, z + s_part[:, None, :], params["v"]["weight"])
    return e, s_proj, t


def _luong_energy_bwd(
    xp: ModuleType,
    params: Params,
    method: str,
    query: Array,
    keys: Array,
    s_proj: Array | None,
    t: Array | None,
    d_e: Array,
) -> tuple[Params, Array, Array]:
    r"""``(dparams, dquery, dkeys)`` of :func:`_luong_energy` from ``de``.

    .. math::

        \texttt{"dot"}: &\quad dh_j = de_j\, s,\qquad ds = \textstyle\sum_j de_j h_j, \\
        \texttt{"general"}: &\quad u = W s + b,\quad dh_j = de_j\, u,\quad
            du = \textstyle\sum_j de_j h_j, \\
            &\quad dW = s\, du^\top,\ db = \textstyle\sum_b du,\ ds = W\text{-weight}\; du, \\
        \texttt{"concat"}: &\quad dz_j = de_j\, v \circ (1 - t_j^2),\quad
            dv = \textstyle\sum_{b,j} t_j\, de_j, \\
            &\quad dW = \begin{bmatrix} \sum_{b,j} h_j dz_j^\top \\
            \sum_b s \,(\sum_j dz_j)^\top \end{bmatrix},\quad
            db = \textstyle\sum_{b,j} dz_j,\quad
            dh_j = W_{[:d_h]}\, dz_j,\quad ds = W_{[d_h:]} \textstyle\sum_j dz_j .
    """
    if method == "dot":
        return {}, (d_e[:, None, :] @ keys)[:, 0, :], d_e[:, :, None] * query[:, None, :]
    if method == "general":
        d_u = (d_e[:, None, :] @ keys)[:, 0, :]
        g_w, d_query = affine_backward(xp, params["W"], query, d_u)
        return {"W": g_w}, d_query, d_e[:, :, None] * s_proj[:, None, :]
    weight = params["W"]["weight"]
    d_h = int(keys.shape[2])
    d_z, d_v = _tanh_energy_bwd(xp, t, params["v"]["weight"], d_e)
    d_s_part = xp.sum(d_z, axis=1)  # (batch, d_attn)
    d_z2 = xp.reshape(d_z, (-1, int(d_z.shape[-1])))
    d_w_h = xp.matrix_transpose(xp.reshape(keys, (-1, d_h))) @ d_z2
    d_w_s = xp.matrix_transpose(query) @ d_s_part
    g_w: Params = {"weight": xp.concat([d_w_h, d_w_s], axis=0)}
    if "bias" in params["W"]:
        g_w["bias"] = xp.sum(d_s_part, axis=0)
    d_keys = d_z @ xp.matrix_transpose(weight[:d_h, :])
    d_query = d_s_part @ xp.matrix_transpose(weight[d_h:, :])
    return {"W": g_w, "v": {"weight": d_v}}, d_query, d_keys


def _multiplicative_attention_fwd(
    params: Params,
    query: Array,
    keys: Array,
    /,
    *,
    method: str = "dot",
    mask: Array | None = None,
    local: str | None = None,
    window: int | None = None,
    position: Any = None,
    source_length: Any = None,
) -> tuple[tuple[Array, Array], Any]:
    r"""Multiplicative attention (Luong, Pham, Manning 2015): three scores, global or local.

    .. math::

        \texttt{"dot"}:\ e_j = h_j^\top s, \qquad
        \texttt{"general"}:\ e_j = h_j^\top (W s + b), \qquad
        \texttt{"concat"}:\ e_j = v^\top \tanh(W [h_j; s] + b).

    **Global** (``local=None``): :math:`\alpha = \mathrm{softmax}_{\mathrm{kept}}(e)`,
    :math:`c = \sum_j \alpha_j h_j`.

    **Local** (Luong §3.2) attends a window :math:`[p - D, p + D]` around an aligned source
    position :math:`p`; positions are :math:`j = 0, \dots, n-1`:

    * ``local="m"`` (monotonic): :math:`p` is given (``position``, Luong's :math:`p_t = t`),
      :math:`\alpha = \mathrm{softmax}` over the kept positions with :math:`|j - p| \le D`.
    * ``local="p"`` (predictive): :math:`p = S\,\sigma(v_p^\top \tanh(W_p s))` with the source
      length :math:`S`, the window softmax :math:`a` as for ``"m"``, then the weights are
      multiplied by a Gaussian centred on :math:`p`,
      :math:`\alpha_j = a_j \exp(-(j - p)^2 / 2\sigma^2)` with :math:`\sigma = D/2`, as in the
      paper (so they sum to less than 1; they are not renormalised).

    The window's edges depend on :math:`p` through a comparison, which is piecewise constant:
    :math:`p`'s gradient comes through the Gaussian only (as autograd of the same formula
    gives). A row whose window and mask keep nothing follows the fully-masked-row rule.

    Parameters
    ----------
    params : dict
        ``"dot"``: ``{}``. ``"general"``: ``{"W": affine (d_q, d_h)}`` (``s @ weight``; the
        reference module has no bias). ``"concat"``: ``{"W": affine (d_h + d_q, d_attn),
        "v": {"weight": (d_attn, 1)}}``; the rows of ``W.weight`` take ``[h_j; s]`` in that order
        (keys first), as ``torch.cat([hidden_states, query], dim=2)`` in the reference module.
        ``local="p"`` adds ``"W_p": affine (d_q, d_p)`` and ``"v_p": affine (d_p, 1)`` (Luong's
        have no bias; a bias is allowed here, since it moves :math:`p` rather than cancelling).
    query : (batch, d_q)
        ``d_q == d_h`` for ``"dot"``.
    keys : (batch, n, d_h)
    method : {"dot", "general", "concat"}
    mask : bool, broadcastable to (batch, n), True = attend
    local : {None, "m", "p"}
    window : int
        ``D``, for local attention: ``>= 0`` for ``"m"``, ``>= 1`` for ``"p"`` (σ = D/2).
    position : int or integer array (batch,)
        ``p`` for ``local="m"``; may lie outside ``[0, n)`` (the window then keeps what overlaps).
    source_length : int or integer array (batch,), optional
        ``S`` for ``local="p"``, default ``n``; per-sequence lengths of a padded batch.

    Returns
    -------
    (context (batch, d_h), weights (batch, n))
    """
    op = "multiplicative_attention"
    arrays = [a for a in (position, source_length) if hasattr(a, "shape")]
    xp = namespace(query, keys, mask, *arrays, *array_leaves(params))
    batch, n, d_h, d_q = _check_inputs(op, xp, query, keys, mask)
    p_m, s_len = _check_local(op, xp, local, window, position, source_length, batch, n, query)
    _luong_params(op, xp, params, method, local, d_h, d_q, query.dtype)
    e, s_proj, t = _luong_energy(xp, params, method, query, keys)
    if local is None:
        context, alpha = _attend(xp, e, keys, mask)
        return (context, alpha), (xp, params, query, keys, s_proj, t, alpha, None)
    u = p = None
    if local == "m":
        p = p_m
    else:
        u = xp.tanh(affine_forward(xp, params["W_p"], query))
        p = s_len / (1.0 + xp.exp(-affine_forward(xp, params["v_p"], u)[:, 0]))
    j = xp.arange(n, dtype=query.dtype, device=device_of(query))
    keep = xp.abs(j - p[:, None]) <= window
    if mask is not None:
        keep = keep & mask
    context, a = _attend(xp, e, keys, keep)
    if local == "m":
        return (context, a), (xp, params, query, keys, s_proj, t, a, None)
    sigma = window / 2.0
    g = xp.exp(-((j - p[:, None]) ** 2) / (2.0 * sigma * sigma))
    alpha = a * g
    context = (alpha[:, None, :] @ keys)[:, 0, :]
    local_p = (a, g, j, p, s_len, u, sigma)
    return (context, alpha), (xp, params, query, keys, s_proj, t, alpha, local_p)


def _multiplicative_attention_bwd(
    residuals: Any, cotangent: Any, /, *, method: str = "dot"
) -> tuple[Params, Array, Array]:
    r"""VJP of multiplicative attention.

    Global and ``local="m"``: :math:`de` from the softmax and the weighted sum
    (:func:`_attend_bwd`, the window is part of the mask), then the score's backward
    (:func:`_luong_energy_bwd`). ``local="p"``, with :math:`\alpha = a \circ g`,
    :math:`g_j = \exp(-(j-p)^2/2\sigma^2)`, :math:`p = S\sigma(y)`,
    :math:`y = v_p^\top u + b_{v_p}`, :math:`u = \tanh(W_p s + b_p)`:

    .. math::

        d\alpha^{tot}_j &= d\alpha_j + h_j \cdot dc,\qquad dh_j \mathrel{+}= \alpha_j\, dc, \\
        da = d\alpha^{tot} \circ g,\quad
        de &= a \circ (da - \textstyle\sum_j a_j da_j),\quad
        dp = \textstyle\sum_j d\alpha^{tot}_j\, a_j g_j \,(j - p)/\sigma^2, \\
        dy = dp\; p\,(1 - p/S),\quad
        dv_p &= u\, dy,\quad du = v_p\, dy,\quad dz = du \circ (1 - u^2),\quad
        dW_p = s\, dz^\top,\quad ds \mathrel{+}= W_p\, dz .
    """
    xp, params, query, keys, s_proj, t, alpha, local_p = residuals
    if local_p is None:
        d_e, d_keys = _attend_bwd(xp, alpha, keys, cotangent)
        grads, d_query, dk_e = _luong_energy_bwd(xp, params, method, query, keys, s_proj, t, d_e)
        return _like(params, grads), d_query, d_keys + dk_e
    a, g, j, p, s_len, u, sigma = local_p
    d_total, d_keys = _weighted_sum_bwd(xp, alpha, keys, cotangent)
    d_a = d_total * g
    d_e = a * (d_a - xp.sum(a * d_a, axis=-1, keepdims=True))
    d_p = xp.sum(d_total * alpha * (j - p[:, None]), axis=-1) / (sigma * sigma)
    d_y = d_p * p * (1.0 - p / s_len)
    g_vp, d_u = affine_backward(xp, params["v_p"], u, d_y[:, None])
    g_wp, dq_p = affine_backward(xp, params["W_p"], query, d_u * (1.0 - u * u))
    grads, d_query, dk_e = _luong_energy_bwd(xp, params, method, query, keys, s_proj, t, d_e)
    grads.update({"W_p": g_wp, "v_p": g_vp})
    return _like(params, grads), d_query + dq_p, d_keys + dk_e


multiplicative_attention = Op(
    _multiplicative_attention_fwd,
    _multiplicative_attention_bwd,
    name="multiplicative_attention",
    register=True,
)


# ----------------------------------------------------------------------------- init


def init_additive_attention(
    d_h: int,
    d_q: int | None = None,
    d_attn: int | None = None,
    *,
    bias: bool = False,
    seed: int = 0,
    xp: ModuleType | None = None,
    dtype: Any = "float64",
) -> Params:
    """Parameters of :func:`additive_attention`, with ``nn.Linear``'s default init.

    ``{"W_h": (d_h, d_attn), "W_s": (d_q, d_attn), "v": {"weight": (d_attn, 1)}}``; ``d_q`` and
    ``d_attn`` default to ``d_h``. ``bias`` adds biases to ``W_h`` and ``W_s`` (the reference
    ``BahdanauAttention`` module has none, hence the default). Each weight and bias is
    :math:`U(-1/\\sqrt{d_{in}}, 1/\\sqrt{d_{in}})`, drawn in the order W_h, W_s, v on the host
    with ``numpy.random.default_rng(seed)`` and moved to ``xp`` (NumPy by default) as ``dtype``.
    """
    import numpy as np  # host RNG for initial values only

    fn = "init_additive_attention"
    d_h = check_size(fn, "d_h", d_h)
    d_q = d_h if d_q is None else check_size(fn, "d_q", d_q)
    d_attn = d_h if d_attn is None else check_size(fn, "d_attn", d_attn)
    xp = default_namespace() if xp is None else xp
    dt = resolve_dtype(xp, dtype)
    rng = np.random.default_rng(seed)
    return {
        "W_h": linear_params(xp, rng, d_h, d_attn, bias, dt),
        "W_s": linear_params(xp, rng, d_q, d_attn, bias, dt),
        "v": linear_params(xp, rng, d_attn, 1, False, dt),
    }


def init_multiplicative_attention(
    d_h: int,
    d_q: int | None = None,
    *,
    method: str = "general",
    d_attn: int | None = None,
    bias: bool | None = None,
    local: str | None = None,
    d_p: int | None = None,
    seed: int = 0,
    xp: ModuleType | None = None,
    dtype: Any = "float64",
) -> Params:
    """Parameters of :func:`multiplicative_attention` for ``method``, ``nn.Linear``'s init.

    * ``"dot"``: ``{}``.
    * ``"general"``: ``{"W": (d_q, d_h)}``, no bias by default (the reference module's
      ``nn.Linear(hidden, hidden, bias=False)``).
    * ``"concat"``: ``{"W": (d_h + d_q, d_attn) with bias, "v": {"weight": (d_attn, 1)}}`` (the
      reference module's ``nn.Linear(2 * hidden, hidden)`` and ``nn.Linear(hidden, 1,
      bias=False)``); ``d_attn`` defaults to ``d_h``.

    ``d_q`` defaults to ``d_h``; ``bias=None`` keeps the reference defaults above, True/False
    forces ``W``'s bias. ``local="p"`` adds Luong's position predictor, ``"W_p": (d_q, d_p)``
    and ``"v_p": (d_p, 1)``, both without bias (``d_p`` defaults to ``d_h``), drawn after the
    score's parameters; ``local="m"`` has no parameters of its own. Values are
    ``U(-1/sqrt(d_in), 1/sqrt(d_in))`` drawn on the host with ``numpy.random.default_rng(seed)``
    and moved to ``xp`` (NumPy by default) as ``dtype``.
    """
    import numpy as np  # host RNG for initial values only

    fn = "init_multiplicative_attention"
    if method not in LUONG_METHODS:
        raise ValueError(
            f"refattn.{fn}: method must be one of {list(LUONG_METHODS)}, got {method!r}"
        )
    d_h = check_size(fn, "d_h", d_h)
    d_q = d_h if d_q is None else check_size(fn, "d_q", d_q)
    d_attn = d_h if d_attn is None else check_size(fn, "d_attn", d_attn)
    if local not in (None, "m", "p"):
        raise ValueError(f"refattn.{fn}: local must be None, 'm' or 'p', got {local!r}")
    d_p = d_h if d_p is None else check_size(fn, "d_p", d_p)
    xp = default_namespace() if xp is None else xp
    dt = resolve_dtype(xp, dtype)
    rng = np.random.default_rng(seed)
    params: Params = {}
    if method == "dot":
        if d_q != d_h:
            raise ValueError(f"refattn.{fn}: method='dot' needs d_q == d_h, got {d_q} and {d_h}")
    elif method == "general":
        params["W"] = linear_params(xp, rng, d_q, d_h, bool(bias), dt)
    else:
        with_bias = True if bias is None else bool(bias)
        params["W"] = linear_params(xp, rng, d_h + d_q, d_attn, with_bias, dt)
        params["v"] = linear_params(xp, rng, d_attn, 1, False, dt)
    if local == "p":
        params["W_p"] = linear_params(xp, rng, d_q, d_p, False, dt)
        params["v_p"] = linear_params(xp, rng, d_p, 1, False, dt)
    return params
