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
from ..ops.softmax import check_mask, masked_softmax_parts, normalize
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


def _attend_bwd(xp: ModuleType, alpha: Array, keys: Array, cotangent: Any) -> tuple[Array, Array]:
    r"""``(de, dkeys)`` of :func:`_attend` from the tuple cotangent ``(dc, dalpha)``.

    .. math::

        dh_j \mathrel{+}= \alpha_j\, dc,\qquad
        d\alpha^{tot}_j = d\alpha_j + h_j \cdot dc,\qquad
        de = \alpha \circ \bigl(d\alpha^{tot} - \textstyle\sum_j \alpha_j d\alpha^{tot}_j\bigr).
    """
    d_c, d_alpha = cotangent
    if d_c is None:
        d_c = xp.zeros((keys.shape[0], keys.shape[2]), dtype=keys.dtype, device=device_of(keys))
    d_total = (keys @ d_c[:, :, None])[..., 0]
    if d_alpha is not None:
        d_total = d_total + d_alpha
    d_e = alpha * (d_total - xp.sum(alpha * d_total, axis=-1, keepdims=True))
    d_keys = alpha[:, :, None] * d_c[:, None, :]
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
    op: str, xp: ModuleType, params: Any, method: Any, d_h: int, d_q: int, dtype: Any
) -> None:
    if method not in LUONG_METHODS:
        raise ValueError(
            f"refattn.{op}: method must be one of {list(LUONG_METHODS)}, got {method!r}"
        )
    if method == "dot":
        check_param_keys(op, params, (), "method='dot' (it has no parameters: pass {})")
        if d_q != d_h:
            raise ValueError(
                f"refattn.{op}: method='dot' needs d_q == d_h, got query of width {d_q} and "
                f"keys of width {d_h}; use method='general' to map between them"
            )
    elif method == "general":
        check_param_keys(op, params, ("W",), "method='general'")
        check_affine(
            op, xp, get_subtree(op, params, "W", ""), "W", d_in=d_q, d_out=d_h, dtype=dtype
        )
    else:
        check_param_keys(op, params, ("W", "v"), "method='concat'")
        _, d_attn = check_affine(
            op, xp, get_subtree(op, params, "W", ""), "W", d_in=d_h + d_q, d_out=None, dtype=dtype
        )
        _check_v(op, xp, params, d_attn, dtype)


def _multiplicative_attention_fwd(
    params: Params,
    query: Array,
    keys: Array,
    /,
    *,
    method: str = "dot",
    mask: Array | None = None,
) -> tuple[tuple[Array, Array], Any]:
    r"""Multiplicative attention (Luong, Pham, Manning 2015), three score functions.

    .. math::

        \texttt{"dot"}:\ e_j = h_j^\top s, \qquad
        \texttt{"general"}:\ e_j = h_j^\top (W s + b), \qquad
        \texttt{"concat"}:\ e_j = v^\top \tanh(W [h_j; s] + b),

    then :math:`\alpha = \mathrm{softmax}_{\mathrm{kept}}(e)`, :math:`c = \sum_j \alpha_j h_j`.

    Parameters
    ----------
    params : dict
        ``"dot"``: ``{}``. ``"general"``: ``{"W": affine (d_q, d_h)}`` (``s @ weight``; the
        reference module has no bias). ``"concat"``: ``{"W": affine (d_h + d_q, d_attn),
        "v": {"weight": (d_attn, 1)}}``; the rows of ``W.weight`` take ``[h_j; s]`` in that order
        (keys first), as ``torch.cat([hidden_states, query], dim=2)`` in the reference module.
    query : (batch, d_q)
        ``d_q == d_h`` for ``"dot"``.
    keys : (batch, n, d_h)
    method : {"dot", "general", "concat"}
    mask : bool, broadcastable to (batch, n), True = attend

    Returns
    -------
    (context (batch, d_h), weights (batch, n))
    """
    op = "multiplicative_attention"
    xp = namespace(query, keys, mask, *array_leaves(params))
    _batch, _n, d_h, d_q = _check_inputs(op, xp, query, keys, mask)
    _luong_params(op, xp, params, method, d_h, d_q, query.dtype)
    t = s_proj = None
    if method == "dot":
        e = (keys @ query[:, :, None])[..., 0]
    elif method == "general":
        s_proj = affine_forward(xp, params["W"], query)
        e = (keys @ s_proj[:, :, None])[..., 0]
    else:
        weight = params["W"]["weight"]
        s_part = query @ weight[d_h:, :]
        if "bias" in params["W"]:
            s_part = s_part + params["W"]["bias"]
        z = xp.reshape(xp.reshape(keys, (-1, d_h)) @ weight[:d_h, :], (*keys.shape[:2], -1))
        e, t = _tanh_energy(xp, z + s_part[:, None, :], params["v"]["weight"])
    context, alpha = _attend(xp, e, keys, mask)
    return (context, alpha), (xp, params, query, keys, s_proj, t, alpha)


def _multiplicative_attention_bwd(
    residuals: Any, cotangent: Any, /, *, method: str = "dot"
) -> tuple[Params, Array, Array]:
    r"""VJP of multiplicative attention, from :math:`de` (:func:`_attend_bwd`).

    .. math::

        \texttt{"dot"}: &\quad dh_j \mathrel{+}= de_j\, s,\qquad ds = \textstyle\sum_j de_j h_j, \\
        \texttt{"general"}: &\quad u = W s + b,\quad dh_j \mathrel{+}= de_j\, u,\quad
            du = \textstyle\sum_j de_j h_j, \\
            &\quad dW = s\, du^\top,\ db = \textstyle\sum_b du,\ ds = W\text{-weight}\; du, \\
        \texttt{"concat"}: &\quad dz_j = de_j\, v \circ (1 - t_j^2),\quad
            dv = \textstyle\sum_{b,j} t_j\, de_j, \\
            &\quad dW = \begin{bmatrix} \sum_{b,j} h_j dz_j^\top \\
            \sum_b s \,(\sum_j dz_j)^\top \end{bmatrix},\quad
            db = \textstyle\sum_{b,j} dz_j,\quad
            dh_j \mathrel{+}= W_{[:d_h]}\, dz_j,\quad ds = W_{[d_h:]} \textstyle\sum_j dz_j .
    """
    xp, params, query, keys, s_proj, t, alpha = residuals
    d_e, d_keys = _attend_bwd(xp, alpha, keys, cotangent)
    if method == "dot":
        d_keys = d_keys + d_e[:, :, None] * query[:, None, :]
        d_query = (d_e[:, None, :] @ keys)[:, 0, :]
        return {}, d_query, d_keys
    if method == "general":
        d_keys = d_keys + d_e[:, :, None] * s_proj[:, None, :]
        d_u = (d_e[:, None, :] @ keys)[:, 0, :]
        g_w, d_query = affine_backward(xp, params["W"], query, d_u)
        return _like(params, {"W": g_w}), d_query, d_keys
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
    d_keys = d_keys + d_z @ xp.matrix_transpose(weight[:d_h, :])
    d_query = d_s_part @ xp.matrix_transpose(weight[d_h:, :])
    return _like(params, {"W": g_w, "v": {"weight": d_v}}), d_query, d_keys


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
    forces ``W``'s bias. Values are ``U(-1/sqrt(d_in), 1/sqrt(d_in))`` drawn on the host with
    ``numpy.random.default_rng(seed)`` and moved to ``xp`` (NumPy by default) as ``dtype``.
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
    xp = default_namespace() if xp is None else xp
    dt = resolve_dtype(xp, dtype)
    rng = np.random.default_rng(seed)
    if method == "dot":
        if d_q != d_h:
            raise ValueError(f"refattn.{fn}: method='dot' needs d_q == d_h, got {d_q} and {d_h}")
        return {}
    if method == "general":
        return {"W": linear_params(xp, rng, d_q, d_h, bool(bias), dt)}
    with_bias = True if bias is None else bool(bias)
    return {
        "W": linear_params(xp, rng, d_h + d_q, d_attn, with_bias, dt),
        "v": linear_params(xp, rng, d_attn, 1, False, dt),
    }
