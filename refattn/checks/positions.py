"""Check cases for positional encodings and Bahdanau / Luong attention.

The torch references are explicit float64 math written from the definitions refattn is checked
against (seed 002: ``SinusoidalPositionalEncoding``, ``LearnedPositionalEmbedding``,
``RotaryPositionalEmbedding``, ``BahdanauAttention``, ``LuongAttention``, and Shaw et al.'s
``e_ij = q_i (k_j + a^K_ij)^T / sqrt(d_k)``), differentiated by torch's autograd. They share no
code with refattn: RoPE's interleaved convention is written with complex numbers (Meta's Llama
``apply_rotary_emb``), relative attention with a gather of the tables, and parameters are used
in torch's ``(out, in)`` layout through ``F.linear``. Masked scores are filled with a large
finite negative number and fully masked rows are zeroed afterwards, so autograd sees no NaN.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..layers.additive import additive_attention, multiplicative_attention
from ..layers.positions import (
    add_sinusoidal_positions,
    learned_positions,
    relative_position_attention,
    rope,
)
from . import Case, register_case

_BIG = 1e30  # finite "minus infinity" for the framework references
_TAGS = ("layers", "positions")


# ----------------------------------------------------------------------------- torch references


def _torch_positions(torch, x, options):
    positions = options.get("positions")
    if positions is None:
        return torch.arange(x.shape[-2], dtype=torch.float64)
    return positions.to(torch.float64)


def _torch_add_sinusoidal(torch, primals, options):
    """Seed 002's SinusoidalPositionalEncoding in float64 (``exp``/``log`` form of 1/base^e)."""
    (x,) = primals
    d = x.shape[-1]
    base = options.get("base", 10000.0)
    position = _torch_positions(torch, x, options)[..., None]
    div_term = torch.exp(torch.arange(0, d, 2, dtype=torch.float64) * (-math.log(base) / d))
    pe = torch.zeros((*position.shape[:-1], d), dtype=torch.float64)
    pe[..., 0::2] = torch.sin(position * div_term)
    pe[..., 1::2] = torch.cos(position * div_term[: d // 2])
    return x + pe


def _torch_learned(torch, primals, options):
    """``x + nn.Embedding(table)(positions)``: torch's autograd does the scatter-add."""
    table, x = primals
    positions = options.get("positions")
    if positions is None:
        positions = torch.arange(x.shape[-2])
    return x + torch.nn.functional.embedding(positions, table)


def _torch_rope(torch, primals, options):
    """Seed 002's RotaryPositionalEmbedding (rotate-half) or Meta Llama's complex form."""
    (x,) = primals
    d = x.shape[-1]
    base = options.get("base", 10000.0)
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    freqs = _torch_positions(torch, x, options)[..., None] * inv_freq
    if options.get("interleaved", False):
        xc = torch.view_as_complex(x.reshape(*x.shape[:-1], d // 2, 2))
        rotated = torch.view_as_real(xc * torch.polar(torch.ones_like(freqs), freqs))
        return rotated.flatten(-2)
    emb = torch.cat([freqs, freqs], dim=-1)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * emb.cos() + torch.cat([-x2, x1], dim=-1) * emb.sin()


def _torch_relative(torch, primals, options):
    """Shaw et al. with the tables gathered at the clipped distances."""
    q, k, v, rel_k, *rest = primals
    rel_v = rest[0] if rest else None
    kmax = options["max_distance"]
    n_q, n_k = q.shape[-2], k.shape[-2]
    distance = torch.arange(n_k)[None, :] - torch.arange(n_q)[:, None]
    index = torch.clamp(distance, -kmax, kmax) + kmax
    scale = options.get("scale") or 1.0 / math.sqrt(q.shape[-1])
    a_k = rel_k[index]  # (n_q, n_k, d_k)
    s = (q @ k.transpose(-2, -1) + torch.einsum("...id,ijd->...ij", q, a_k)) * scale
    keep = options.get("mask")
    if options.get("is_causal"):
        causal = distance <= 0
        keep = causal if keep is None else keep & causal
    if keep is None:
        p = torch.softmax(s, -1)
    else:
        s = torch.where(keep, s, torch.full_like(s, -_BIG))
        p = torch.softmax(s, -1) * keep * keep.any(-1, keepdim=True)
    out = p @ v
    if rel_v is not None:
        out = out + torch.einsum("...ij,ijd->...id", p, rel_v[index])
    return out


def _torch_linear(torch, params, x):
    """``nn.Linear`` with refattn's ``(d_in, d_out)`` weight given in torch's ``(out, in)``."""
    return torch.nn.functional.linear(x, params["weight"].T, params.get("bias"))


def _torch_attend(torch, energy, hidden_states, mask):
    """Seed 002's ``F.softmax(energy, dim=1)`` and ``bmm`` context, with an optional mask."""
    if mask is None:
        attention = torch.softmax(energy, dim=1)
    else:
        energy = torch.where(mask, energy, torch.full_like(energy, -_BIG))
        attention = torch.softmax(energy, dim=1) * mask * mask.any(-1, keepdim=True)
    context = torch.bmm(attention.unsqueeze(1), hidden_states).squeeze(1)
    return context, attention


def _torch_bahdanau(torch, primals, options):
    """Seed 002's BahdanauAttention.forward(hidden_states, query)."""
    params, query, hidden_states = primals
    energy = _torch_linear(
        torch,
        params["v"],
        torch.tanh(
            _torch_linear(torch, params["W_h"], hidden_states)
            + _torch_linear(torch, params["W_s"], query.unsqueeze(1))
        ),
    )
    return _torch_attend(torch, energy.squeeze(-1), hidden_states, options.get("mask"))


def _torch_luong(torch, primals, options):
    """Seed 002's LuongAttention.forward(hidden_states, query)."""
    params, query, hidden_states = primals
    method = options["method"]
    if method == "dot":
        energy = torch.bmm(hidden_states, query.unsqueeze(2)).squeeze(-1)
    elif method == "general":
        query_transformed = _torch_linear(torch, params["W"], query)
        energy = torch.bmm(hidden_states, query_transformed.unsqueeze(2)).squeeze(-1)
    else:
        seq_len = hidden_states.size(1)
        query_expanded = query.unsqueeze(1).expand(-1, seq_len, -1)
        concat = torch.cat([hidden_states, query_expanded], dim=2)
        hidden = torch.tanh(_torch_linear(torch, params["W"], concat))
        energy = _torch_linear(torch, params["v"], hidden).squeeze(-1)
    local = options.get("local")
    if local is None:
        return _torch_attend(torch, energy, hidden_states, options.get("mask"))
    # Luong section 3.2: a window [p - D, p + D]; local-p predicts p and multiplies the window's
    # softmax by a Gaussian with sigma = D/2.
    window = options["window"]
    if local == "m":
        p = options["position"].to(torch.float64) * torch.ones(query.shape[0], dtype=torch.float64)
    else:
        length = options.get("source_length", hidden_states.size(1))
        length = torch.as_tensor(length, dtype=torch.float64)
        hidden_p = torch.tanh(_torch_linear(torch, params["W_p"], query))
        p = length * torch.sigmoid(_torch_linear(torch, params["v_p"], hidden_p).squeeze(-1))
    j = torch.arange(hidden_states.size(1), dtype=torch.float64)
    keep = (j - p.unsqueeze(1)).abs() <= window
    if options.get("mask") is not None:
        keep = keep & options["mask"]
    context, attention = _torch_attend(torch, energy, hidden_states, keep)
    if local == "m":
        return context, attention
    sigma = window / 2
    attention = attention * torch.exp(-((j - p.unsqueeze(1)) ** 2) / (2 * sigma**2))
    return torch.bmm(attention.unsqueeze(1), hidden_states).squeeze(1), attention


# ----------------------------------------------------------------------------- case factories


def _x_make(shape, **options: Any):
    def make(rng: np.random.Generator):
        opts = dict(options)
        if opts.get("positions") == "random":
            opts["positions"] = rng.integers(0, 40, size=shape[-2:-1])
        elif opts.get("positions") == "float":
            opts["positions"] = rng.uniform(0.0, 30.0, size=shape[:-1])
        return (rng.standard_normal(shape),), opts

    return make


def _learned_make(max_len, shape, positions=None):
    def make(rng: np.random.Generator):
        options = {}
        if positions == "repeated":  # duplicates: the scatter-add must accumulate them
            options["positions"] = np.array([2, 0, 2, 5, 2])[: shape[-2]]
        elif positions == "per_batch":
            options["positions"] = rng.integers(0, max_len, size=shape[:-1])
        table = rng.standard_normal((max_len, shape[-1]))
        return (table, rng.standard_normal(shape)), options

    return make


def _relative_make(q_shape, n_k=None, d_v=None, kmax=2, rel_v=True, **flags: Any):
    def make(rng: np.random.Generator):
        *lead, n_q, d_k = q_shape
        nk = n_q if n_k is None else n_k
        dv = d_k if d_v is None else d_v
        primals = [
            rng.standard_normal(q_shape),
            rng.standard_normal((*lead, nk, d_k)),
            rng.standard_normal((*lead, nk, dv)),
            rng.standard_normal((2 * kmax + 1, d_k)),
        ]
        if rel_v:
            primals.append(rng.standard_normal((2 * kmax + 1, dv)))
        options: dict[str, Any] = {"max_distance": kmax}
        if flags.get("mask"):
            mask = rng.random((*lead, n_q, nk)) > 0.35
            if flags["mask"] == "fully_masked_row":
                mask[(..., 1, slice(None))] = False
            options["mask"] = mask
        if flags.get("causal"):
            options["is_causal"] = True
        if flags.get("scale"):
            options["scale"] = flags["scale"]
        return tuple(primals), options

    return make


def _affine(rng, d_in, d_out, bias):
    params = {"weight": rng.standard_normal((d_in, d_out)) / math.sqrt(d_in)}
    if bias:
        params["bias"] = 0.3 * rng.standard_normal(d_out)
    return params


def _attention_make(
    kind, d_h=4, d_q=3, d_attn=5, n=4, batch=2, bias=False, mask=None, local=None, window=None
):
    def make(rng: np.random.Generator):
        if kind == "additive":
            params = {
                "W_h": _affine(rng, d_h, d_attn, bias),
                "W_s": _affine(rng, d_q, d_attn, bias),
                "v": _affine(rng, d_attn, 1, False),
            }
            options: dict[str, Any] = {}
        else:
            options = {"method": kind}
            if kind == "dot":
                params = {}
            elif kind == "general":
                params = {"W": _affine(rng, d_q, d_h, bias)}
            else:
                params = {
                    "W": _affine(rng, d_h + d_q, d_attn, bias),
                    "v": _affine(rng, d_attn, 1, False),
                }
        query = rng.standard_normal((batch, d_h if kind == "dot" else d_q))
        keys = rng.standard_normal((batch, n, d_h))
        if mask is not None:
            keep = rng.random((batch, n)) > 0.3
            keep[:, 0] = True
            if mask == "fully_masked_row":
                keep[1, :] = False
            options["mask"] = keep
        if local is not None:
            options.update(local=local, window=window)
        if local == "m":  # one position outside [0, n): the window keeps what overlaps
            options["position"] = np.array([1, n + 1])[:batch]
        elif local == "p":
            params["W_p"] = _affine(rng, query.shape[1], 3, bias)
            params["v_p"] = _affine(rng, 3, 1, bias)
            options["source_length"] = np.array([n, n - 2])[:batch]
        return (params, query, keys), options

    return make


# ----------------------------------------------------------------------------- registration

_CASES = [
    (add_sinusoidal_positions, "plain", _x_make((2, 4, 6)), _torch_add_sinusoidal),
    (
        add_sinusoidal_positions,
        "odd_d_positions",
        _x_make((3, 5), positions="random"),
        _torch_add_sinusoidal,
    ),
    (learned_positions, "default_positions", _learned_make(6, (2, 4, 3)), _torch_learned),
    (
        learned_positions,
        "repeated_positions",
        _learned_make(6, (2, 5, 3), "repeated"),
        _torch_learned,
    ),
    (
        learned_positions,
        "per_batch_positions",
        _learned_make(4, (2, 3, 2), "per_batch"),
        _torch_learned,
    ),
    (rope, "rotate_half", _x_make((2, 2, 4, 6)), _torch_rope),
    (rope, "interleaved", _x_make((2, 2, 4, 6), interleaved=True), _torch_rope),
    (rope, "positions_base", _x_make((2, 3, 4), positions="random", base=500.0), _torch_rope),
    (
        rope,
        "float_positions_interleaved",
        _x_make((2, 3, 4), positions="float", interleaved=True),
        _torch_rope,
    ),
    (relative_position_attention, "plain", _relative_make((2, 4, 3)), _torch_relative),
    (
        relative_position_attention,
        "heads_cross_dv_keys_only",
        _relative_make((1, 2, 3, 2), n_k=5, d_v=3, kmax=1, rel_v=False),
        _torch_relative,
    ),
    (
        relative_position_attention,
        "mask_fully_masked_row",
        _relative_make((2, 4, 3), mask="fully_masked_row"),
        _torch_relative,
    ),
    (
        relative_position_attention,
        "causal_scale_kmax1",
        _relative_make((2, 4, 2), kmax=1, causal=True, scale=0.7),
        _torch_relative,
    ),
    (additive_attention, "plain", _attention_make("additive"), _torch_bahdanau),
    (
        additive_attention,
        "bias_fully_masked_row",
        _attention_make("additive", bias=True, mask="fully_masked_row"),
        _torch_bahdanau,
    ),
    (multiplicative_attention, "dot", _attention_make("dot"), _torch_luong),
    (multiplicative_attention, "general", _attention_make("general"), _torch_luong),
    (
        multiplicative_attention,
        "general_bias_mask",
        _attention_make("general", bias=True, mask="some"),
        _torch_luong,
    ),
    (multiplicative_attention, "concat", _attention_make("concat", bias=True), _torch_luong),
    (
        multiplicative_attention,
        "local_m_general_mask",
        _attention_make("general", n=9, mask="some", local="m", window=2),
        _torch_luong,
    ),
    (
        multiplicative_attention,
        "local_p_dot",
        _attention_make("dot", n=9, local="p", window=2),
        _torch_luong,
    ),
    (
        multiplicative_attention,
        "local_p_concat_bias_mask",
        _attention_make("concat", n=9, bias=True, mask="some", local="p", window=3),
        _torch_luong,
    ),
    (
        multiplicative_attention,
        "concat_fully_masked_row",
        _attention_make("concat", mask="fully_masked_row"),
        _torch_luong,
    ),
]

for _op, _name, _make, _ref in _CASES:
    register_case(Case(_op, _name, _make, torch_ref=_ref, tags=_TAGS))
