"""Check cases for softmax, log_softmax and scaled_dot_product_attention.

The torch and JAX references are written as explicit math on float64 tensors, differentiated by
the framework's autodiff. Fully masked rows are written so that the framework's autodiff
produces no NaN: scores are filled with a large *finite* negative number, and the row's weights
are then multiplied by "row has a kept entry" (0 or 1).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..ops import scaled_dot_product_attention
from ..ops.masks import causal_mask
from ..ops.softmax import log_softmax, softmax
from . import Case, register_case

_BIG = 1e30  # finite "minus infinity" for the framework references


# ----------------------------------------------------------------------------- softmax


def _softmax_make(shape, *, masked: str | None = None, scale_logits: float = 1.0, axis: int = -1):
    def make(rng: np.random.Generator):
        x = rng.standard_normal(shape) * scale_logits
        options: dict[str, Any] = {"axis": axis}
        if masked is not None:
            mask = rng.random(shape) > 0.3
            if masked == "full_row":
                index = [0] * len(shape)
                index[axis] = slice(None)
                mask[tuple(index)] = False
            options["mask"] = mask
        return (x,), options

    return make


def _torch_softmax(log: bool):
    def ref(torch, primals, options):
        (x,) = primals
        axis = options.get("axis", -1)
        mask = options.get("mask")
        if mask is None:
            return torch.log_softmax(x, axis) if log else torch.softmax(x, axis)
        filled = torch.where(mask, x, torch.full_like(x, -_BIG))
        any_kept = mask.any(dim=axis, keepdim=True)
        if log:
            y = torch.log_softmax(filled, axis)
            return torch.where(mask & any_kept, y, torch.full_like(y, -math.inf))
        return torch.softmax(filled, axis) * mask * any_kept

    return ref


def _jax_softmax(log: bool):
    def ref(jnp, primals, options):
        import jax

        (x,) = primals
        axis = options.get("axis", -1)
        mask = options.get("mask")
        if mask is None:
            return jax.nn.log_softmax(x, axis) if log else jax.nn.softmax(x, axis)
        filled = jnp.where(mask, x, -_BIG)
        any_kept = mask.any(axis=axis, keepdims=True)
        if log:
            y = jax.nn.log_softmax(filled, axis)
            return jnp.where(mask & any_kept, y, -jnp.inf)
        return jax.nn.softmax(filled, axis) * mask * any_kept

    return ref


_CASES_FOR_TESTS: list[Case] = []

for _op, _log in ((softmax, False), (log_softmax, True)):
    for _name, _make in (
        ("plain", _softmax_make((3, 5))),
        ("axis0", _softmax_make((4, 3), axis=0)),
        ("mask", _softmax_make((2, 3, 5), masked="some")),
        ("fully_masked_row", _softmax_make((3, 5), masked="full_row")),
        ("large_logits", _softmax_make((3, 5), scale_logits=1e4)),
    ):
        _CASES_FOR_TESTS.append(
            register_case(
                Case(
                    _op,
                    _name,
                    _make,
                    torch_ref=_torch_softmax(_log),
                    jax_ref=_jax_softmax(_log),
                    tags=("core",),
                )
            )
        )


# ----------------------------------------------------------------------------- attention


def sdpa_make(
    q_shape,
    kv_heads: int | None = None,
    n_k: int | None = None,
    d_v: int | None = None,
    **flags: Any,
):
    """Case factory: q (..., Hq, n_q, d), k/v with ``kv_heads`` heads and ``n_k`` keys."""

    def make(rng: np.random.Generator):
        *lead, n_q, d = q_shape
        h_kv = kv_heads if kv_heads is not None else (lead[-1] if lead else None)
        kv_lead = [*lead[:-1], h_kv] if lead else []
        nk = n_k if n_k is not None else n_q
        dv = d_v if d_v is not None else d
        q = rng.standard_normal(q_shape)
        k = rng.standard_normal((*kv_lead, nk, d))
        v = rng.standard_normal((*kv_lead, nk, dv))
        scores_shape = (*lead, n_q, nk)
        options: dict[str, Any] = {}
        if flags.get("mask"):
            mask = rng.random(scores_shape) > 0.35
            if flags["mask"] == "fully_masked_row":
                mask[(..., 1, slice(None))] = False
            options["mask"] = mask
        primals = [q, k, v]
        if flags.get("bias") == "primal":  # learnable: a positional bias, with its gradient
            primals.append(rng.standard_normal(flags.get("bias_shape", (n_q, nk))))
        elif flags.get("bias"):
            options["bias"] = rng.standard_normal((n_q, nk))
        if flags.get("sinks"):  # learnable sink logits, one per query head (the 5th primal)
            primals.append(rng.standard_normal((lead[-1],)))
        if flags.get("window"):
            options["window"] = flags["window"]
        if flags.get("sink_tokens"):
            options["sink_tokens"] = flags["sink_tokens"]
        if flags.get("softcap") == "primal":  # a learnable cap (the 6th primal, after sinks)
            primals.append(np.asarray(1.5))
        elif flags.get("softcap"):
            options["softcap"] = flags["softcap"]
        if flags.get("causal"):
            options["is_causal"] = True
            options["causal_alignment"] = flags["causal"]
        if flags.get("dropout"):
            options["dropout_mask"] = rng.random(scores_shape) > 0.25
            options["dropout_p"] = 0.25
        if flags.get("scale"):
            options["scale"] = flags["scale"]
        if flags.get("weights"):
            options["return_weights"] = True
        if flags.get("lse"):
            options["return_lse"] = True
        return tuple(primals), options

    return make


def _reference_attention(ops: dict[str, Any], primals, options):
    """Attention as explicit math, written once over a framework's ops.

    ``ops`` maps: ``asarray``, ``where``, ``softmax``, ``logsumexp``, ``any_last``,
    ``repeat_heads``, ``transpose_last``, ``expand_last`` (add a trailing axis), ``tanh``,
    ``exp``, ``logaddexp`` for torch or JAX. ``primals`` are ``(q, k, v)``, with a learnable
    ``bias``, ``sinks`` (one logit per query head in each row's denominator, no value) and
    ``softcap`` when given positionally.
    """
    q, k, v = primals[:3]
    bias = primals[3] if len(primals) > 3 else options.get("bias")
    sinks = primals[4] if len(primals) > 4 else None
    n_q, n_k = q.shape[-2], k.shape[-2]
    h_q = q.shape[-3] if q.ndim >= 3 else 1
    if q.ndim >= 3 and k.shape[-3] != h_q:
        k = ops["repeat_heads"](k, h_q // k.shape[-3])
        v = ops["repeat_heads"](v, h_q // v.shape[-3])
    scale = options.get("scale") or 1.0 / math.sqrt(q.shape[-1])
    s = (q @ ops["transpose_last"](k)) * scale
    cap = primals[5] if len(primals) > 5 else options.get("softcap")
    if cap is not None:
        s = cap * ops["tanh"](s / cap)
    if bias is not None:
        s = s + bias
    keep = options.get("mask")
    align = options.get("causal_alignment", "upper_left")
    if options.get("is_causal"):
        causal = ops["asarray"](causal_mask(n_q, n_k, align))
        keep = causal if keep is None else keep & causal
    if options.get("window") is not None:
        band = _window_keep(n_q, n_k, options["window"], align, options.get("sink_tokens", 0))
        keep = ops["asarray"](band) if keep is None else keep & ops["asarray"](band)
    any_kept = None
    if keep is not None:
        s = ops["where"](keep, s, -_BIG)
        any_kept = ops["any_last"](keep)
    if sinks is None:
        p = ops["softmax"](s)
    else:  # the sink joins the denominator; a row that sees no key has lse = sink
        lse_sink = ops["logaddexp"](ops["logsumexp"](s), sinks[:, None])
        p = ops["exp"](s - ops["expand_last"](lse_sink))
    if keep is not None:
        p = p * keep * ops["expand_last"](any_kept)
    pd = p
    if options.get("dropout_mask") is not None:
        pd = p * options["dropout_mask"] / (1.0 - options["dropout_p"])
    extras = []
    if options.get("return_weights"):
        extras.append(p)
    if options.get("return_lse") and sinks is not None:
        extras.append(lse_sink)
    elif options.get("return_lse"):
        lse = ops["logsumexp"](s)
        if any_kept is not None:
            lse = ops["where"](any_kept, lse, -math.inf)
        extras.append(lse)
    out = pd @ v
    return (out, *extras) if extras else out


def torch_sdpa(torch, primals, options):
    ops = {
        "asarray": torch.as_tensor,
        "where": lambda c, a, b: torch.where(c, a, torch.as_tensor(b, dtype=a.dtype)),
        "softmax": lambda s: torch.softmax(s, -1),
        "logsumexp": lambda s: torch.logsumexp(s, -1),
        "any_last": lambda m: m.any(-1),
        "repeat_heads": lambda x, g: x.repeat_interleave(g, dim=-3),
        "transpose_last": lambda x: x.transpose(-2, -1),
        "expand_last": lambda x: x[..., None],
        "tanh": torch.tanh,
        "exp": torch.exp,
        "logaddexp": torch.logaddexp,
    }
    return _reference_attention(ops, primals, options)


def _window_keep(n_q: int, n_k: int, window: Any, align: str, sink_tokens: int) -> np.ndarray:
    """FlashAttention's window rule (``attention_ref``'s ``construct_local_mask``): key ``j``
    is visible to query ``i`` iff ``i + o - left <= j <= i + o + right`` with ``o`` the
    alignment's offset, plus StreamingLLM's first ``sink_tokens`` keys."""
    left, right = window if isinstance(window, tuple) else (window, window)
    o = 0 if align == "upper_left" else n_k - n_q
    i = np.arange(n_q)[:, None] + o
    j = np.arange(n_k)[None, :]
    keep = np.ones((n_q, n_k), dtype=bool)
    if left is not None:
        keep &= j >= i - left
    if right is not None:
        keep &= j <= i + right
    return keep | (j < sink_tokens)


def jax_sdpa(jnp, primals, options):
    import jax

    ops = {
        "asarray": jnp.asarray,
        "where": jnp.where,
        "softmax": lambda s: jax.nn.softmax(s, -1),
        "logsumexp": lambda s: jax.nn.logsumexp(s, -1),
        "any_last": lambda m: m.any(-1),
        "repeat_heads": lambda x, g: jnp.repeat(x, g, axis=-3),
        "transpose_last": lambda x: jnp.swapaxes(x, -1, -2),
        "expand_last": lambda x: x[..., None],
        "tanh": jnp.tanh,
        "exp": jnp.exp,
        "logaddexp": jnp.logaddexp,
    }
    return _reference_attention(ops, primals, options)


_SDPA_CASES = {
    "2d": sdpa_make((5, 3)),
    "mha": sdpa_make((2, 2, 4, 3)),
    "cross_nq_ne_nk_dv": sdpa_make((2, 3, 3), n_k=5, d_v=2),
    "gqa": sdpa_make((1, 4, 3, 2), kv_heads=2),
    "mqa": sdpa_make((1, 3, 3, 2), kv_heads=1),
    "bool_mask": sdpa_make((2, 2, 4, 3), mask="some"),
    "fully_masked_row": sdpa_make((2, 2, 4, 3), mask="fully_masked_row", lse=True),
    "bias": sdpa_make((2, 4, 3), bias=True),
    "causal_upper_left": sdpa_make((2, 3, 2), n_k=5, causal="upper_left"),
    "causal_lower_right": sdpa_make((2, 3, 2), n_k=5, causal="lower_right"),
    "causal_lower_right_nq_gt_nk": sdpa_make((2, 5, 2), n_k=3, causal="lower_right", lse=True),
    "dropout": sdpa_make((2, 4, 3), dropout=True),
    "scale": sdpa_make((2, 4, 3), scale=0.7),
    "weights_and_lse": sdpa_make((2, 2, 3, 3), mask="some", weights=True, lse=True),
    "learnable_bias": sdpa_make((2, 2, 4, 3), bias="primal", bias_shape=(2, 1, 4), lse=True),
    "learnable_bias_softcap": sdpa_make(
        (2, 4, 3), bias="primal", bias_shape=(2, 4, 4), softcap=1.5, causal="upper_left"
    ),
    "sinks": sdpa_make((2, 3, 4, 2), bias="primal", sinks=True, lse=True),
    "learnable_softcap": sdpa_make(
        (2, 2, 4, 3), bias="primal", sinks=True, softcap="primal", causal="lower_right", lse=True
    ),
    "sinks_gqa_causal_window": sdpa_make(
        (1, 4, 5, 2),
        kv_heads=2,
        n_k=7,
        causal="lower_right",
        window=(1, 0),
        bias="primal",
        sinks=True,
        mask="fully_masked_row",
        weights=True,
        lse=True,
    ),
    "sink_tokens_window": sdpa_make(
        (2, 6, 2), window=(1, 1), sink_tokens=2, bias="primal", bias_shape=(1, 6), lse=True
    ),
}

for _name, _make in _SDPA_CASES.items():
    register_case(
        Case(
            scaled_dot_product_attention,
            _name,
            _make,
            torch_ref=torch_sdpa,
            jax_ref=jax_sdpa,
            tags=("core",),
        )
    )
