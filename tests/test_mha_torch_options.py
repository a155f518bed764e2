"""``nn.MultiheadAttention``'s ``add_bias_kv``, ``add_zero_attn`` and ``batch_first=False``,
and the transformer layers' ``batch_first=False``, against torch's own modules.

Each test loads torch's parameters with ``params_from_torch``, calls refattn with the options
``options_from_torch`` reports, and compares outputs, input gradients and every parameter
gradient (``bias_k``/``bias_v`` included, through ``grads_to_torch``) with torch autograd.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import rel_err

import refattn
from refattn.interop.torch import grads_to_torch, options_from_torch, params_from_torch

torch = pytest.importorskip("torch")

E, H, B, L, S = 8, 2, 3, 5, 6


def _randomized(module, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p))
    return module


def _torch_mha(module, q, k, v, d_y, **kwargs):
    leaves = [torch.tensor(x, requires_grad=True) for x in (q, k, v)]
    y, w = module(*leaves, need_weights=True, average_attn_weights=False, **kwargs)
    module.zero_grad()
    y.backward(torch.tensor(d_y))
    return y.detach().numpy(), w.detach().numpy(), [t.grad.numpy() for t in leaves]


@pytest.mark.parametrize("bias_kv", [False, True])
@pytest.mark.parametrize("zero_attn", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
def test_mha_options_match_torch(bias_kv, zero_attn, batch_first):
    module = _randomized(
        torch.nn.MultiheadAttention(
            E,
            H,
            add_bias_kv=bias_kv,
            add_zero_attn=zero_attn,
            batch_first=batch_first,
            dtype=torch.float64,
        )
    )
    rng = np.random.default_rng(1)
    seq = (B, L, E) if batch_first else (L, B, E)
    kv = (B, S, E) if batch_first else (S, B, E)
    q, k, v = rng.standard_normal(seq), rng.standard_normal(kv), rng.standard_normal(kv)
    padding = np.zeros((B, S), bool)
    padding[1, 4:] = True  # torch: True = ignore
    attn_mask = rng.standard_normal((L, S))  # a float mask: added to the scores
    d_y = rng.standard_normal(seq)
    y_t, w_t, d_inputs_t = _torch_mha(
        module,
        q,
        k,
        v,
        d_y,
        key_padding_mask=torch.tensor(np.where(padding, -np.inf, 0.0)),
        attn_mask=torch.tensor(attn_mask),
    )
    params = params_from_torch(module)
    assert ("bias_k" in params) == bias_kv
    options = options_from_torch(module)
    mask = ~padding[:, None, None, :]
    (y, w), pullback = refattn.vjp(
        refattn.multi_head_attention,
        params,
        q,
        k,
        v,
        mask=mask,
        bias=attn_mask,
        return_weights=True,
        **options,
    )
    assert w.shape == (B, H, L, S + bias_kv + zero_attn)
    assert rel_err(y, y_t) <= 1e-13 and rel_err(w, w_t) <= 1e-13
    grads, *d_inputs = pullback((d_y, None))
    for a, b in zip(d_inputs, d_inputs_t, strict=True):
        assert rel_err(a, b) <= 1e-12
    state = grads_to_torch(grads)
    for name, p in module.named_parameters():
        assert rel_err(state[name].numpy(), p.grad.numpy()) <= 1e-12, name


def test_appended_keys_refuse_structured_masks_and_missing_partners():
    params = refattn.init_multi_head_attention(E, H)
    params["bias_k"] = np.zeros(E)
    x = np.zeros((B, L, E))
    with pytest.raises(ValueError, match="bias_k needs its partner"):
        refattn.multi_head_attention(params, x, x, x, n_heads=H)
    params["bias_v"] = np.zeros(E)
    with pytest.raises(ValueError, match="is_causal cannot be combined with bias_k/bias_v"):
        refattn.multi_head_attention(params, x, x, x, n_heads=H, is_causal=True)
    del params["bias_k"], params["bias_v"]
    with pytest.raises(ValueError, match="key_lengths cannot be combined with add_zero_attn"):
        refattn.multi_head_attention(
            params, x, x, x, n_heads=H, add_zero_attn=True, key_lengths=[5, 5, 5]
        )
    with pytest.raises(TypeError, match="add_zero_attn must be a bool"):
        refattn.multi_head_attention(params, x, x, x, n_heads=H, add_zero_attn=1)
    params["bias_k"] = params["bias_v"] = np.zeros(E + 1)
    with pytest.raises(ValueError, match=r"bias_k must be a \(8,\) array"):
        refattn.multi_head_attention(params, x, x, x, n_heads=H)
    with pytest.raises(ValueError, match="unexpected parameter"):
        refattn.transformer_encoder_layer(
            {
                **refattn.init_transformer_encoder_layer(E, H, dim_feedforward=4),
                "self_attn": {
                    **refattn.init_multi_head_attention(E, H),
                    "bias_k": np.zeros(E),
                    "bias_v": np.zeros(E),
                },
            },
            x,
            n_heads=H,
        )
    with pytest.raises(ValueError, match=r"query must have at least 3"):
        refattn.multi_head_attention(
            refattn.init_multi_head_attention(E, H), x[0], x[0], x[0], n_heads=H, batch_first=False
        )


def test_gradcheck_bias_kv_and_zero_attn():
    rng = np.random.default_rng(2)
    params = refattn.init_multi_head_attention(4, 2, n_kv_heads=1, seed=3)
    params["bias_k"], params["bias_v"] = rng.standard_normal(2), rng.standard_normal(2)
    q, k = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 4, 4))
    assert refattn.gradcheck(
        refattn.multi_head_attention,
        params,
        q,
        k,
        k,
        n_heads=2,
        n_kv_heads=1,
        add_zero_attn=True,
        mask=rng.random((2, 1, 3, 4)) < 0.7,
    )


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_sequence_first_layers_match_torch(kind):
    f64 = {"dtype": torch.float64, "dim_feedforward": 12}
    if kind == "encoder":
        module = _randomized(torch.nn.TransformerEncoderLayer(E, H, **f64), seed=4)
        op = refattn.transformer_encoder_layer
    else:
        module = _randomized(torch.nn.TransformerDecoderLayer(E, H, **f64), seed=5)
        op = refattn.transformer_decoder_layer
    module.eval()
    rng = np.random.default_rng(6)
    x, m = rng.standard_normal((L, B, E)), rng.standard_normal((S, B, E))
    d_y = rng.standard_normal((L, B, E))
    leaves = [torch.tensor(a, requires_grad=True) for a in (x, m)]
    y_t = module(*leaves[: 1 if kind == "encoder" else 2])
    y_t.backward(torch.tensor(d_y))
    options = options_from_torch(module)
    assert options["batch_first"] is False
    inputs = (x,) if kind == "encoder" else (x, m)
    y, pullback = refattn.vjp(op, params_from_torch(module), *inputs, **options)
    grads, *d_inputs = pullback(d_y)
    assert rel_err(y, y_t.detach().numpy()) <= 1e-13
    for a, t in zip(d_inputs, leaves[: len(inputs)], strict=True):
        assert rel_err(a, t.grad.numpy()) <= 1e-12
    state = grads_to_torch(grads)
    for name, p in module.named_parameters():
        assert rel_err(state[name].numpy(), p.grad.numpy()) <= 1e-12, name
