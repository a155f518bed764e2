"""Check cases for the layer ops: linear, layer_norm, activations, feed_forward, MHA, encoder and
decoder layers.

The torch references are written with torch's own functional building blocks on float64
tensors and differentiated by torch's autograd: ``F.linear`` (on the transposed weights, torch's
``(out, in)`` layout), ``F.layer_norm``, ``F.gelu``, and ``F.multi_head_attention_forward`` (the
code behind ``nn.MultiheadAttention``) wherever torch has the feature; GQA/MQA, attention-weight
dropout and the transformer layers' dropout multipliers, which torch's modules cannot take
explicitly, are written as explicit math. Masks are converted to torch's convention (True =
ignore) and never mask a whole row (torch would give NaN there).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..layers.attention import init_multi_head_attention, multi_head_attention
from ..layers.basic import (
    feed_forward,
    gelu,
    gelu_tanh,
    init_feed_forward,
    init_linear,
    layer_norm,
    linear,
    relu,
)
from ..layers.transformer import (
    init_transformer_decoder_layer,
    init_transformer_encoder_layer,
    transformer_decoder_layer,
    transformer_encoder_layer,
)
from . import Case, register_case

_TAGS = ("layers",)
_BIG = 1e30  # finite "minus infinity" for the framework references


def _perturb(rng: np.random.Generator, tree: Any, scale: float = 0.2) -> Any:
    """Move every leaf off torch's init (zero biases, unit norms) so each gradient matters."""
    if isinstance(tree, dict):
        return {k: _perturb(rng, v, scale) for k, v in tree.items()}
    return np.asarray(tree) + scale * rng.standard_normal(tree.shape)


def _drop_key_bias(tree: Any) -> Any:
    """Remove ``key.bias`` from every MHA tree in ``tree``.

    Its gradient is identically zero (adding ``b`` to every key adds ``q . b`` to a whole row of
    scores, which the softmax ignores), so a relative comparison of two round-off-sized numbers
    would be meaningless; the projections without it are still valid refattn trees.
    """
    if isinstance(tree, dict):
        if {"query", "key", "value", "out"} <= set(tree):
            tree = {**tree, "key": {"weight": tree["key"]["weight"]}}
        return {k: _drop_key_bias(v) for k, v in tree.items()}
    return tree


def _keep_mask(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """A random keep-mask with at least one kept key per row (column 0)."""
    mask = rng.random(shape) > 0.35
    mask[..., 0] = True
    return mask


# ----------------------------------------------------------------------------- torch pieces


def _t_linear(torch, p, x):
    return torch.nn.functional.linear(x, p["weight"].T, p.get("bias"))


def _t_act(torch, name, x):
    F = torch.nn.functional
    if name == "relu":
        return F.relu(x)
    return F.gelu(x, approximate="tanh" if name == "gelu_tanh" else "none")


def _t_layer_norm(torch, p, x, eps=1e-5):
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), p["weight"], p.get("bias"), eps)


def _t_feed_forward(torch, p, x, activation="relu", drop=None):
    h = _t_act(torch, activation, _t_linear(torch, p["linear1"], x))
    if drop is not None:
        h = h * drop
    return _t_linear(torch, p["linear2"], h)


def _bias_or_zeros(torch, p):
    if "bias" in p:
        return p["bias"]
    return torch.zeros(p["weight"].shape[1], dtype=p["weight"].dtype)


def _t_mha(
    torch,
    p,
    q,
    k,
    v,
    n_heads,
    *,
    n_kv_heads=None,
    mask=None,
    bias=None,
    is_causal=False,
    drop=None,
    need_weights=False,
):
    """Multi-head attention: ``F.multi_head_attention_forward`` when torch has the feature."""
    F = torch.nn.functional
    d_model = q.shape[-1]
    n_kv_heads = n_kv_heads or n_heads
    hd = d_model // n_heads
    n_q, n_k = q.shape[-2], k.shape[-2]
    keep = mask
    if is_causal:
        causal = torch.ones(n_q, n_k, dtype=torch.bool).tril()
        keep = causal if keep is None else keep & causal
    has_bias = "bias" in p["query"]
    if n_kv_heads == n_heads and drop is None and q.ndim == 3:
        b = q.shape[0]
        attn_mask = None
        if keep is not None or bias is not None:
            full = torch.zeros(b, n_heads, n_q, n_k, dtype=q.dtype)
            if bias is not None:
                full = full + bias
            if keep is not None:
                full = full.masked_fill(~keep.expand(b, n_heads, n_q, n_k), -_BIG)
            attn_mask = full.reshape(b * n_heads, n_q, n_k)
        same = k.shape[-1] == d_model and v.shape[-1] == d_model
        in_w = torch.cat([p[n]["weight"].T for n in ("query", "key", "value")]) if same else None
        in_b = None
        if has_bias:  # a tree without a key bias (its gradient is identically 0) packs zeros
            in_b = torch.cat([_bias_or_zeros(torch, p[n]) for n in ("query", "key", "value")])
        y, w = F.multi_head_attention_forward(
            q.transpose(0, 1),
            k.transpose(0, 1),
            v.transpose(0, 1),
            d_model,
            n_heads,
            in_w,
            in_b,
            None,
            None,
            False,
            0.0,
            p["out"]["weight"].T,
            p["out"].get("bias"),
            training=True,
            need_weights=need_weights,
            attn_mask=attn_mask,
            use_separate_proj_weight=not same,
            q_proj_weight=None if same else p["query"]["weight"].T,
            k_proj_weight=None if same else p["key"]["weight"].T,
            v_proj_weight=None if same else p["value"]["weight"].T,
            average_attn_weights=False,
        )
        y = y.transpose(0, 1)
        return (y, w) if need_weights else y

    # explicit math: GQA/MQA and attention-weight dropout
    def heads(x, n):
        return x.reshape(*x.shape[:-1], n, hd).transpose(-3, -2)

    qh = heads(_t_linear(torch, p["query"], q), n_heads)
    kh = heads(_t_linear(torch, p["key"], k), n_kv_heads).repeat_interleave(
        n_heads // n_kv_heads, dim=-3
    )
    vh = heads(_t_linear(torch, p["value"], v), n_kv_heads).repeat_interleave(
        n_heads // n_kv_heads, dim=-3
    )
    s = qh @ kh.transpose(-2, -1) / math.sqrt(hd)
    if bias is not None:
        s = s + bias
    if keep is not None:
        s = s.masked_fill(~keep, -_BIG)
    w = torch.softmax(s, -1)
    wd = w if drop is None else w * drop
    o = (wd @ vh).transpose(-3, -2)
    y = _t_linear(torch, p["out"], o.reshape(*o.shape[:-2], d_model))
    return (y, w) if need_weights else y


def _t_residuals(torch, p, x, branches, layer_norm_eps, norm_first):
    """torch's residual blocks: ``x + f(LN x)`` (``norm_first``) or ``LN(x + f(x))``, in order;
    ``branches`` are ``(norm name, f)`` pairs, each ``f`` with its output dropout applied."""
    for name, f in branches:
        if norm_first:
            x = x + f(_t_layer_norm(torch, p[name], x, layer_norm_eps))
        else:
            x = _t_layer_norm(torch, p[name], x + f(x), layer_norm_eps)
    return x


def _t_blocks(torch, p, d, n_heads, activation, self_mask, is_causal, ff_drop):
    """The self-attention (``_sa_block``) and feed-forward (``_ff_block``) branches, with the
    dropout masks ``d`` (the feed-forward's output dropout is ``d[ff_drop]``)."""

    def sa(h):
        y = _t_mha(
            torch,
            p["self_attn"],
            h,
            h,
            h,
            n_heads,
            mask=self_mask,
            is_causal=is_causal,
            drop=d.get("self_attn"),
        )
        return y * d["dropout1"] if "dropout1" in d else y

    def ff(h):
        y = _t_feed_forward(torch, p, h, activation, d.get("dropout"))
        return y * d[ff_drop] if ff_drop in d else y

    return sa, ff


def _t_encoder(
    torch,
    p,
    x,
    *,
    n_heads,
    mask=None,
    is_causal=False,
    norm_first=False,
    activation="relu",
    layer_norm_eps=1e-5,
    dropout_masks=None,
):
    """``nn.TransformerEncoderLayer._sa_block``/``_ff_block`` with explicit dropout masks."""
    d = dropout_masks or {}
    sa, ff = _t_blocks(torch, p, d, n_heads, activation, mask, is_causal, "dropout2")
    return _t_residuals(torch, p, x, (("norm1", sa), ("norm2", ff)), layer_norm_eps, norm_first)


def _t_decoder(
    torch,
    p,
    x,
    m,
    *,
    n_heads,
    self_mask=None,
    memory_mask=None,
    is_causal=False,
    norm_first=False,
    activation="relu",
    layer_norm_eps=1e-5,
    dropout_masks=None,
):
    """``nn.TransformerDecoderLayer``'s three blocks with explicit dropout masks."""
    d = dropout_masks or {}
    sa, ff = _t_blocks(torch, p, d, n_heads, activation, self_mask, is_causal, "dropout3")

    def ca(h):
        y = _t_mha(
            torch, p["cross_attn"], h, m, m, n_heads, mask=memory_mask, drop=d.get("cross_attn")
        )
        return y * d["dropout2"] if "dropout2" in d else y

    branches = (("norm1", sa), ("norm2", ca), ("norm3", ff))
    return _t_residuals(torch, p, x, branches, layer_norm_eps, norm_first)


# ----------------------------------------------------------------------------- basic ops


def _linear_make(x_shape, d_out, bias=True):
    def make(rng):
        params = _perturb(rng, init_linear(x_shape[-1], d_out, bias=bias, seed=1))
        return (params, rng.standard_normal(x_shape)), {}

    return make


def _linear_ref(torch, primals, options):
    params, x = primals
    return _t_linear(torch, params, x)


for _name, _make in (
    ("batched", _linear_make((2, 3, 4), 5)),
    ("no_bias", _linear_make((3, 4), 2, bias=False)),
    ("vector", _linear_make((4,), 3)),
):
    register_case(Case(linear, _name, _make, torch_ref=_linear_ref, tags=_TAGS))


def _layer_norm_make(x_shape, bias=True, spread=1.0):
    def make(rng):
        d = x_shape[-1]
        params = {"weight": 1.0 + 0.3 * rng.standard_normal(d)}
        if bias:
            params["bias"] = 0.3 * rng.standard_normal(d)
        x = spread * rng.standard_normal(x_shape) + rng.standard_normal((*x_shape[:-1], 1))
        # ("eps" is not set here: gradcheck's own ``eps`` keyword, the finite-difference step,
        # would take it; tests/test_layers_basic.py checks a non-default eps)
        return (params, x), {}

    return make


def _layer_norm_ref(torch, primals, options):
    params, x = primals
    return _t_layer_norm(torch, params, x)


for _name, _make in (
    ("batched", _layer_norm_make((2, 3, 5))),
    ("no_bias", _layer_norm_make((4, 3), bias=False)),
    ("small_spread", _layer_norm_make((3, 4), spread=0.05)),
):
    register_case(Case(layer_norm, _name, _make, torch_ref=_layer_norm_ref, tags=_TAGS))


def _activation_make(rng):
    # values on both sides of 0 and into the tails, none exactly at the ReLU kink
    x = np.concatenate([rng.standard_normal(12) * 2.0, [-7.5, -4.0, 3.0, 6.5]])
    return (x.reshape(4, 4),), {}


for _op, _act in ((relu, "relu"), (gelu, "gelu"), (gelu_tanh, "gelu_tanh")):

    def _ref(torch, primals, options, _act=_act):
        return _t_act(torch, _act, primals[0])

    register_case(Case(_op, "tails", _activation_make, torch_ref=_ref, tags=_TAGS))


def _ff_make(activation, dropout=False, bias=True):
    def make(rng):
        params = _perturb(rng, init_feed_forward(4, 6, bias=bias, seed=2))
        x = rng.standard_normal((2, 3, 4))
        options: dict[str, Any] = {"activation": activation}
        if dropout:
            options["dropout_mask"] = rng.random((2, 3, 6)) > 0.3
            options["dropout_p"] = 0.3
        return (params, x), options

    return make


def _ff_ref(torch, primals, options):
    params, x = primals
    drop = options.get("dropout_mask")
    if drop is not None:
        drop = drop.to(x.dtype) / (1.0 - options["dropout_p"])
    return _t_feed_forward(torch, params, x, options["activation"], drop)


for _name, _make in (
    ("relu", _ff_make("relu")),
    ("gelu", _ff_make("gelu")),
    ("gelu_tanh_no_bias", _ff_make("gelu_tanh", bias=False)),
    ("dropout", _ff_make("gelu", dropout=True)),
):
    register_case(Case(feed_forward, _name, _make, torch_ref=_ff_ref, tags=_TAGS))


# ----------------------------------------------------------------------------- MHA


def _mha_make(
    *,
    d_model=4,
    n_heads=2,
    n_kv_heads=None,
    kdim=None,
    vdim=None,
    n_q=3,
    n_k=None,
    batch=(2,),
    bias=True,
    self_attention=False,
    **flags,
):
    def make(rng):
        n_keys = n_q if n_k is None else n_k
        params = _perturb(
            rng,
            init_multi_head_attention(
                d_model, n_heads, n_kv_heads=n_kv_heads, kdim=kdim, vdim=vdim, bias=bias, seed=3
            ),
        )
        params = _drop_key_bias(params)
        q = rng.standard_normal((*batch, n_q, d_model))
        if self_attention:
            k = v = q
        else:
            k = rng.standard_normal((*batch, n_keys, kdim or d_model))
            v = rng.standard_normal((*batch, n_keys, vdim or d_model))
        scores = (*batch, n_heads, n_q, n_keys)
        options: dict[str, Any] = {"n_heads": n_heads}
        if n_kv_heads is not None:
            options["n_kv_heads"] = n_kv_heads
        if flags.get("mask"):
            options["mask"] = _keep_mask(rng, scores)
        if flags.get("score_bias"):
            options["bias"] = rng.standard_normal((n_q, n_keys))
        if flags.get("causal"):
            options["is_causal"] = True
        if flags.get("dropout"):
            options["dropout_mask"] = rng.random(scores) > 0.25
            options["dropout_p"] = 0.25
        if flags.get("weights"):
            options["return_weights"] = True
        return (params, q, k, v), options

    return make


def _mha_ref(torch, primals, options):
    params, q, k, v = primals
    drop = options.get("dropout_mask")
    if drop is not None:
        drop = drop.to(q.dtype) / (1.0 - options["dropout_p"])
    return _t_mha(
        torch,
        params,
        q,
        k,
        v,
        options["n_heads"],
        n_kv_heads=options.get("n_kv_heads"),
        mask=options.get("mask"),
        bias=options.get("bias"),
        is_causal=options.get("is_causal", False),
        drop=drop,
        need_weights=options.get("return_weights", False),
    )


for _name, _make in (
    ("self", _mha_make(self_attention=True)),
    ("cross_kdim_vdim", _mha_make(kdim=3, vdim=5, n_k=4)),
    ("gqa", _mha_make(d_model=8, n_heads=4, n_kv_heads=2, n_q=2, n_k=3, batch=(1,))),
    ("mqa_unbatched", _mha_make(n_kv_heads=1, batch=(), n_k=4)),
    ("mask", _mha_make(mask=True)),
    ("causal_no_bias", _mha_make(causal=True, bias=False)),
    ("additive_bias", _mha_make(score_bias=True)),
    ("dropout", _mha_make(dropout=True)),
    ("weights", _mha_make(mask=True, weights=True)),
):
    register_case(Case(multi_head_attention, _name, _make, torch_ref=_mha_ref, tags=_TAGS))


# ----------------------------------------------------------------------------- layers


def _encoder_make(
    *, norm_first=False, activation="relu", mask=False, causal=False, dropout=False, bias=True
):
    def make(rng):
        d_model, n_heads, d_ff, n = 4, 2, 6, 3
        params = _perturb(
            rng,
            init_transformer_encoder_layer(
                d_model, n_heads, dim_feedforward=d_ff, bias=bias, seed=4
            ),
        )
        params = _drop_key_bias(params)
        x = rng.standard_normal((2, n, d_model))
        options: dict[str, Any] = {
            "n_heads": n_heads,
            "norm_first": norm_first,
            "activation": activation,
        }
        if mask:
            options["mask"] = _keep_mask(rng, (2, 1, n, n))
        if causal:
            options["is_causal"] = True
        if dropout:
            options["dropout_masks"] = {
                "self_attn": (rng.random((2, n_heads, n, n)) > 0.2) / 0.8,
                "dropout1": (rng.random((2, n, d_model)) > 0.2) / 0.8,
                "dropout": (rng.random((2, n, d_ff)) > 0.2) / 0.8,
                "dropout2": (rng.random((2, n, d_model)) > 0.2) / 0.8,
            }
        return (params, x), options

    return make


def _torch_dropout_masks(torch, options):
    masks = options.get("dropout_masks")
    if masks is not None:
        options = {**options, "dropout_masks": {k: torch.as_tensor(v) for k, v in masks.items()}}
    return options


def _encoder_ref(torch, primals, options):
    params, x = primals
    return _t_encoder(torch, params, x, **_torch_dropout_masks(torch, options))


for _name, _make in (
    ("post_ln_relu", _encoder_make()),
    ("post_ln_gelu_mask", _encoder_make(activation="gelu", mask=True)),
    ("pre_ln_relu_causal", _encoder_make(norm_first=True, causal=True)),
    (
        "pre_ln_gelu_tanh_no_bias",
        _encoder_make(norm_first=True, activation="gelu_tanh", bias=False),
    ),
    ("post_ln_dropout", _encoder_make(dropout=True)),
):
    register_case(
        Case(transformer_encoder_layer, _name, _make, torch_ref=_encoder_ref, fast=True, tags=_TAGS)
    )


def _decoder_make(*, norm_first=False, activation="relu", masks=False, causal=False, dropout=False):
    def make(rng):
        d_model, n_heads, d_ff, n_t, n_m = 4, 2, 6, 3, 4
        params = _perturb(
            rng,
            init_transformer_decoder_layer(d_model, n_heads, dim_feedforward=d_ff, seed=5),
        )
        params = _drop_key_bias(params)
        x = rng.standard_normal((2, n_t, d_model))
        memory = rng.standard_normal((2, n_m, d_model))
        options: dict[str, Any] = {
            "n_heads": n_heads,
            "norm_first": norm_first,
            "activation": activation,
        }
        if masks:
            options["self_mask"] = _keep_mask(rng, (n_t, n_t))
            options["memory_mask"] = _keep_mask(rng, (2, 1, 1, n_m))
        if causal:
            options["is_causal"] = True
        if dropout:
            options["dropout_masks"] = {
                "self_attn": (rng.random((2, n_heads, n_t, n_t)) > 0.2) / 0.8,
                "cross_attn": (rng.random((2, n_heads, n_t, n_m)) > 0.2) / 0.8,
                "dropout1": (rng.random((2, n_t, d_model)) > 0.2) / 0.8,
                "dropout2": (rng.random((2, n_t, d_model)) > 0.2) / 0.8,
                "dropout3": (rng.random((2, n_t, d_model)) > 0.2) / 0.8,
                "dropout": (rng.random((2, n_t, d_ff)) > 0.2) / 0.8,
            }
        return (params, x, memory), options

    return make


def _decoder_ref(torch, primals, options):
    params, x, memory = primals
    return _t_decoder(torch, params, x, memory, **_torch_dropout_masks(torch, options))


for _name, _make in (
    ("post_ln_causal", _decoder_make(causal=True)),
    ("pre_ln_gelu_masks", _decoder_make(norm_first=True, activation="gelu", masks=True)),
    ("post_ln_dropout", _decoder_make(dropout=True)),
):
    register_case(
        Case(transformer_decoder_layer, _name, _make, torch_ref=_decoder_ref, fast=True, tags=_TAGS)
    )
