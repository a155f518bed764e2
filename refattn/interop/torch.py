"""Convert PyTorch modules' parameters to refattn parameter trees and back.

Supported modules: ``nn.MultiheadAttention`` (packed ``in_proj_weight``, or separate
``q_proj_weight``/``k_proj_weight``/``v_proj_weight`` when ``kdim``/``vdim`` differ from
``embed_dim``), ``nn.TransformerEncoderLayer`` and ``nn.TransformerDecoderLayer``.

**Layout.** refattn stores an affine map as ``{"weight": (d_in, d_out), "bias": (d_out,)}`` and
computes ``x @ weight + bias``; torch's ``nn.Linear`` stores ``weight`` as ``(out, in)`` and
computes ``x @ weight.T + bias``. Every weight is transposed on the way in and out. torch packs
the query, key and value projections of ``nn.MultiheadAttention`` into one ``(3E, E)``
``in_proj_weight`` and one ``(3E,)`` ``in_proj_bias`` (rows ``0:E`` query, ``E:2E`` key,
``2E:3E`` value); refattn keeps them apart as ``query``, ``key`` and ``value``.

=================================  ===============================================
torch (state_dict name)            refattn (tree path)
=================================  ===============================================
in_proj_weight[0:E].T              query.weight (and key, value for E:2E, 2E:3E)
q_proj_weight.T                    query.weight (k_proj_weight -> key, v -> value)
in_proj_bias[0:E]                  query.bias (and key, value)
out_proj.weight.T, out_proj.bias   out.weight, out.bias
self_attn.*                        self_attn.*
multihead_attn.*                   cross_attn.*
linear1.weight.T, linear1.bias     linear1.weight, linear1.bias (linear2 alike)
norm1.weight, norm1.bias           norm1.weight, norm1.bias (norm2, norm3 alike)
=================================  ===============================================

Gradients have the structure of the parameters, so :func:`grads_to_torch` is the same mapping;
its names match ``module.named_parameters()``.

``bias_k``/``bias_v`` (``add_bias_kv=True``, ``(1, 1, E)``) become the MHA tree's ``bias_k``
and ``bias_v`` (``(E,)``), appended after the projections as torch does; ``add_zero_attn`` is
an option of the call (:func:`options_from_torch` reports it, with ``batch_first``). torch is
imported lazily, inside the functions.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import ModuleType
from typing import Any

from .._backend import to_host

__all__ = [
    "grads_to_torch",
    "options_from_torch",
    "params_from_torch",
    "params_to_torch",
]

Params = dict[str, Any]
KINDS = ("multi_head_attention", "transformer_encoder_layer", "transformer_decoder_layer")
_MODULE_KINDS = {
    "MultiheadAttention": "multi_head_attention",
    "TransformerEncoderLayer": "transformer_encoder_layer",
    "TransformerDecoderLayer": "transformer_decoder_layer",
}
_ATTN_PREFIXES = {"self_attn": "self_attn", "multihead_attn": "cross_attn"}


# ----------------------------------------------------------------------------- torch -> refattn


def params_from_torch(
    source: Any,
    *,
    kind: str | None = None,
    xp: ModuleType | None = None,
    dtype: Any = None,
) -> Params:
    """A refattn parameter tree from a torch module or its ``state_dict``.

    Parameters
    ----------
    source : nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer,
        or a ``state_dict`` (mapping of names to tensors) of one of them
    kind : {"multi_head_attention", "transformer_encoder_layer", "transformer_decoder_layer"}
        Inferred from the module's class or the state dict's names when omitted.
    xp : array namespace, optional
        Where to put the arrays (NumPy by default). Values go through host NumPy.
    dtype : "float32", "float64" or a dtype of ``xp``, optional
        Defaults to the tensors' own dtype.

    Returns
    -------
    params : dict
        ``{"query", "key", "value", "out"}`` for MHA; ``{"self_attn", "norm1", "norm2",
        "linear1", "linear2"}`` for the encoder layer; plus ``"cross_attn"`` and ``"norm3"`` for
        the decoder layer.

    Raises
    ------
    ValueError
        For missing or unexpected names.
    """
    import numpy as np

    from .._backend import default_namespace

    state, kind = _state_and_kind(source, kind)
    xp = default_namespace() if xp is None else xp

    def convert(t: Any, path: str, transpose: bool) -> Any:
        host = t.detach().cpu().numpy()
        if transpose:
            host = np.ascontiguousarray(host.T)
        dt = dtype
        if dt is None:
            dt = getattr(xp, str(host.dtype), None)
            if dt is None or host.dtype.kind != "f":
                raise TypeError(f"refattn.params_from_torch: '{path}' has dtype {host.dtype}")
        elif isinstance(dt, str):
            dt = getattr(xp, dt)
        return xp.asarray(host, dtype=dt)

    used: set[str] = set()

    def take(name: str, required: bool = True) -> Any:
        if name not in state:
            if required:
                raise ValueError(
                    f"refattn.params_from_torch: the {kind} state dict has no '{name}' "
                    f"(names present: {sorted(state)})"
                )
            return None
        used.add(name)
        return state[name]

    if kind == "multi_head_attention":
        params = _mha_from_state(take, convert, "")
    else:
        params = {}
        prefixes = ["self_attn"] + (
            ["multihead_attn"] if kind == "transformer_decoder_layer" else []
        )
        for prefix in prefixes:
            params[_ATTN_PREFIXES[prefix]] = _mha_from_state(take, convert, prefix + ".")
        norms = ["norm1", "norm2"] + (["norm3"] if kind == "transformer_decoder_layer" else [])
        for name in norms:
            params[name] = {"weight": convert(take(f"{name}.weight"), f"{name}.weight", False)}
            b = take(f"{name}.bias", required=False)
            if b is not None:
                params[name]["bias"] = convert(b, f"{name}.bias", False)
        for name in ("linear1", "linear2"):
            params[name] = _linear_from_state(take, convert, name)
    unused = sorted(set(state) - used)
    if unused:
        raise ValueError(
            f"refattn.params_from_torch: unexpected names in the {kind} state dict: {unused}"
        )
    return params


def _linear_from_state(take: Any, convert: Any, name: str) -> Params:
    p = {"weight": convert(take(f"{name}.weight"), f"{name}.weight", True)}
    b = take(f"{name}.bias", required=False)
    if b is not None:
        p["bias"] = convert(b, f"{name}.bias", False)
    return p


def _mha_from_state(take: Any, convert: Any, prefix: str) -> Params:
    bias_kv = {
        name: take(prefix + name, required=False) for name in ("bias_k", "bias_v")
    }  # (1, 1, E): appended to the projected keys and values (add_bias_kv=True)
    out = _linear_from_state(take, convert, prefix + "out_proj")
    d_model = int(out["weight"].shape[0])
    packed = take(prefix + "in_proj_weight", required=False)
    if packed is not None:
        ws = [packed[i * d_model : (i + 1) * d_model] for i in range(3)]
        names = [prefix + "in_proj_weight"] * 3
    else:
        names = [prefix + f"{c}_proj_weight" for c in "qkv"]
        ws = [take(n) for n in names]
    bias = take(prefix + "in_proj_bias", required=False)
    params: Params = {}
    for i, (key, w, name) in enumerate(zip(("query", "key", "value"), ws, names, strict=True)):
        params[key] = {"weight": convert(w, name, True)}
        if bias is not None:
            params[key]["bias"] = convert(
                bias[i * d_model : (i + 1) * d_model], prefix + "in_proj_bias", False
            )
    params["out"] = out
    for name, b in bias_kv.items():
        if b is not None:
            params[name] = convert(b.reshape(-1), prefix + name, False)
    return params


def _state_and_kind(source: Any, kind: str | None) -> tuple[Mapping[str, Any], str]:
    if isinstance(source, Mapping):
        state = source
        inferred = _kind_from_names(state.keys())
    else:
        cls = type(source).__name__
        if cls not in _MODULE_KINDS:
            raise TypeError(
                "refattn.params_from_torch: source must be nn.MultiheadAttention, "
                "nn.TransformerEncoderLayer, nn.TransformerDecoderLayer or a state dict, got "
                f"{cls}"
            )
        state = source.state_dict()
        inferred = _MODULE_KINDS[cls]
    if kind is None:
        kind = inferred
    elif kind not in KINDS:
        raise ValueError(f"refattn.params_from_torch: kind must be one of {KINDS}, got {kind!r}")
    return state, kind


def _kind_from_names(names: Any) -> str:
    names = list(names)
    if any(n.startswith("multihead_attn.") for n in names):
        return "transformer_decoder_layer"
    if any(n.startswith("self_attn.") for n in names):
        return "transformer_encoder_layer"
    return "multi_head_attention"


def options_from_torch(module: Any) -> dict[str, Any]:
    """The keyword options that make a refattn call match a torch module.

    ``n_heads`` and ``batch_first`` for every module (torch's default ``batch_first=False``
    is sequence-first ``(n, batch, d)``; refattn takes either); ``add_zero_attn`` for
    ``nn.MultiheadAttention``; ``norm_first``, ``activation`` and ``layer_norm_eps`` for the
    transformer layers. ValueError for an activation refattn does not have.
    """
    cls = type(module).__name__
    if cls == "MultiheadAttention":
        return {
            "n_heads": int(module.num_heads),
            "add_zero_attn": bool(module.add_zero_attn),
            "batch_first": bool(module.batch_first),
        }
    if cls not in _MODULE_KINDS:
        raise TypeError(f"refattn.options_from_torch: unsupported module {cls}")
    return {
        "n_heads": int(module.self_attn.num_heads),
        "norm_first": bool(module.norm_first),
        "activation": _activation_name(module.activation),
        "layer_norm_eps": float(module.norm1.eps),
        "batch_first": bool(module.self_attn.batch_first),
    }


def _activation_name(act: Any) -> str:
    import torch.nn.functional as F

    if act is F.relu or type(act).__name__ == "ReLU":
        return "relu"
    if act is F.gelu:
        return "gelu"
    if type(act).__name__ == "GELU":
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    raise ValueError(f"refattn.options_from_torch: unsupported activation {act!r}")


# ----------------------------------------------------------------------------- refattn -> torch


def params_to_torch(params: Params, *, kind: str | None = None) -> dict[str, Any]:
    """A torch ``state_dict`` (CPU tensors, the arrays' dtype) from a refattn parameter tree.

    ``module.load_state_dict(params_to_torch(params))`` loads it into a module built with the
    matching sizes. MHA query/key/value weights are packed into ``in_proj_weight`` when key and
    value read ``d_model`` features (torch's ``kdim == vdim == embed_dim``), and written as
    ``q_proj_weight``/``k_proj_weight``/``v_proj_weight`` otherwise.

    Raises ValueError for trees torch cannot hold: GQA/MQA key/value projections (torch's MHA
    has as many key/value heads as query heads) and biases on some projections but not others.
    """
    kind = _kind_from_params(params) if kind is None else kind
    if kind not in KINDS:
        raise ValueError(f"refattn.params_to_torch: kind must be one of {KINDS}, got {kind!r}")
    out: dict[str, Any] = {}
    if kind == "multi_head_attention":
        _mha_to_state(params, "", out)
        return out
    _mha_to_state(_sub(params, "self_attn"), "self_attn.", out)
    if kind == "transformer_decoder_layer":
        _mha_to_state(_sub(params, "cross_attn"), "multihead_attn.", out)
    for name in ("linear1", "linear2"):
        lin = _sub(params, name)
        out[f"{name}.weight"] = _tensor(_sub(lin, "weight", name), transpose=True)
        if "bias" in lin:
            out[f"{name}.bias"] = _tensor(lin["bias"])
    norms = ("norm1", "norm2") + (("norm3",) if kind == "transformer_decoder_layer" else ())
    for name in norms:
        norm = _sub(params, name)
        out[f"{name}.weight"] = _tensor(_sub(norm, "weight", name))
        if "bias" in norm:
            out[f"{name}.bias"] = _tensor(norm["bias"])
    return out


def grads_to_torch(grads: Params, *, kind: str | None = None, module: Any = None) -> dict[str, Any]:
    """Gradients in torch's layout, keyed like ``module.named_parameters()``.

    ``grads`` is a gradient tree from a refattn vjp (the ``dparams`` of
    ``multi_head_attention``, ``transformer_encoder_layer`` or ``transformer_decoder_layer``);
    the mapping is :func:`params_to_torch`'s (weights transposed to ``(out, in)``, MHA
    projections packed). When ``module`` is given, the names and shapes are checked against its
    parameters and each parameter's ``.grad`` is set (replaced) with the result.
    """
    state = params_to_torch(grads, kind=kind)
    if module is not None:
        named = dict(module.named_parameters())
        if set(named) != set(state):
            raise ValueError(
                "refattn.grads_to_torch: the gradient names do not match the module's "
                f"parameters: missing {sorted(set(named) - set(state))}, extra "
                f"{sorted(set(state) - set(named))}"
            )
        for name, g in state.items():
            p = named[name]
            if tuple(p.shape) != tuple(g.shape):
                raise ValueError(
                    f"refattn.grads_to_torch: '{name}' has shape {tuple(g.shape)}, the module's "
                    f"parameter {tuple(p.shape)}"
                )
            p.grad = g.to(dtype=p.dtype, device=p.device)
    return state


def _sub(tree: Any, key: str, prefix: str = "") -> Any:
    if not isinstance(tree, Mapping) or key not in tree:
        path = f"{prefix}.{key}" if prefix else key
        raise ValueError(f"refattn.params_to_torch: missing '{path}'")
    return tree[key]


def _kind_from_params(params: Params) -> str:
    if "cross_attn" in params:
        return "transformer_decoder_layer"
    if "self_attn" in params:
        return "transformer_encoder_layer"
    return "multi_head_attention"


def _tensor(x: Any, *, transpose: bool = False) -> Any:
    import numpy as np
    import torch

    host = to_host(x)
    if transpose:
        host = host.T
    return torch.from_numpy(np.array(host, copy=True, order="C"))


def _mha_to_state(params: Params, prefix: str, out: dict[str, Any]) -> None:
    import torch

    where = prefix.rstrip(".") or "params"
    q, k, v, o = (_sub(params, key, prefix.rstrip(".")) for key in ("query", "key", "value", "out"))
    d_model = int(_sub(q, "weight").shape[1])
    for name, m in (("key", k), ("value", v)):
        if int(_sub(m, "weight").shape[1]) != d_model:
            raise ValueError(
                f"refattn.params_to_torch: {where}.{name}.weight has "
                f"{int(m['weight'].shape[1])} outputs, not d_model={d_model}: GQA/MQA "
                "projections have no nn.MultiheadAttention counterpart"
            )
    has_bias = ["bias" in m for m in (q, k, v, o)]
    if any(has_bias) and not all(has_bias):
        raise ValueError(
            f"refattn.params_to_torch: {where} has biases on some projections but not all; "
            "nn.MultiheadAttention has all four (bias=True) or none (bias=False)"
        )
    packed = int(k["weight"].shape[0]) == d_model and int(v["weight"].shape[0]) == d_model
    ws = [_tensor(m["weight"], transpose=True) for m in (q, k, v)]
    if packed:
        out[prefix + "in_proj_weight"] = torch.cat(ws, dim=0)
    else:
        for c, w in zip("qkv", ws, strict=True):
            out[prefix + f"{c}_proj_weight"] = w
    if all(has_bias):
        out[prefix + "in_proj_bias"] = torch.cat([_tensor(m["bias"]) for m in (q, k, v)])
    out[prefix + "out_proj.weight"] = _tensor(o["weight"], transpose=True)
    if all(has_bias):
        out[prefix + "out_proj.bias"] = _tensor(o["bias"])
    for name in ("bias_k", "bias_v"):
        if name in params:
            out[prefix + name] = _tensor(params[name]).reshape(1, 1, -1)
