"""Transformer encoder and decoder layers against ``nn.TransformerEncoderLayer`` and
``nn.TransformerDecoderLayer`` in float64 (outputs, input gradients and every parameter
gradient), gradcheck on every backend, a stack chained through pullbacks, and errors.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import randn, rel_err, to_numpy

import refattn
from refattn._check_runner import run_case
from refattn.checks import all_cases
from refattn.interop.torch import grads_to_torch, options_from_torch, params_from_torch
from refattn.layers.transformer import (
    init_transformer_decoder_layer,
    init_transformer_encoder_layer,
    transformer_decoder_layer,
    transformer_encoder_layer,
)

CASES = [
    c
    for c in all_cases()
    if c.op.name in ("transformer_encoder_layer", "transformer_decoder_layer")
]
TOL = 1e-10


def perturbed(torch, module, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return module.train()  # train mode (dropout=0): torch's fused fast path is off


def assert_param_grads_match(module, dparams):
    mine = grads_to_torch(dparams)
    named = dict(module.named_parameters())
    assert set(mine) == set(named)
    for name, p in named.items():
        assert rel_err(mine[name].numpy(), p.grad.numpy()) < TOL, name


# ----------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label)
def test_case_gradcheck_on_backend(case, xp):
    result = run_case(case, xp=xp, frameworks=())
    assert result.status["gradcheck"] == "ok", result.status


# ----------------------------------------------------------------------------- torch modules


@pytest.mark.parametrize("norm_first", [False, True], ids=["post_ln", "pre_ln"])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_encoder_matches_torch(norm_first, activation):
    torch = pytest.importorskip("torch")
    d_model, n_heads, d_ff, b, n = 8, 2, 16, 2, 5
    module = torch.nn.TransformerEncoderLayer(
        d_model,
        n_heads,
        d_ff,
        dropout=0.0,
        activation=activation,
        batch_first=True,
        norm_first=norm_first,
        dtype=torch.float64,
    )
    perturbed(torch, module)
    params = params_from_torch(module)
    options = options_from_torch(module)
    assert options["activation"] == activation and options["norm_first"] is norm_first
    rng = np.random.default_rng(1)
    x = rng.standard_normal((b, n, d_model))
    padding = np.zeros((b, n), dtype=bool)
    padding[0, -2:] = True  # True = padded (torch)
    causal = torch.ones(n, n, dtype=torch.bool).triu(1)  # True = ignore, like the padding mask
    mask, _ = refattn.from_torch_mha_masks(None, padding)
    y, pullback = refattn.vjp(
        transformer_encoder_layer, params, x, mask=mask, is_causal=True, **options
    )
    tx = torch.tensor(x, requires_grad=True)
    ty = module(tx, src_mask=causal, src_key_padding_mask=torch.tensor(padding), is_causal=True)
    dy = rng.standard_normal(y.shape)
    ty.backward(torch.tensor(dy))
    dparams, dx = pullback(dy)
    assert rel_err(y, ty.detach().numpy()) < TOL
    assert rel_err(dx, tx.grad.numpy()) < TOL
    assert_param_grads_match(module, dparams)


@pytest.mark.parametrize("norm_first", [False, True], ids=["post_ln", "pre_ln"])
def test_decoder_matches_torch(norm_first):
    torch = pytest.importorskip("torch")
    d_model, n_heads, d_ff, b, n_t, n_m = 8, 4, 12, 2, 4, 6
    module = torch.nn.TransformerDecoderLayer(
        d_model,
        n_heads,
        d_ff,
        dropout=0.0,
        activation="gelu",
        batch_first=True,
        norm_first=norm_first,
        dtype=torch.float64,
    )
    perturbed(torch, module, seed=1)
    params = params_from_torch(module)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((b, n_t, d_model))
    memory = rng.standard_normal((b, n_m, d_model))
    memory_padding = np.zeros((b, n_m), dtype=bool)
    memory_padding[1, -3:] = True
    tgt_mask = torch.nn.Transformer.generate_square_subsequent_mask(n_t, dtype=torch.float64)
    memory_mask, _ = refattn.from_torch_mha_masks(None, memory_padding)
    y, pullback = refattn.vjp(
        transformer_decoder_layer,
        params,
        x,
        memory,
        is_causal=True,
        memory_mask=memory_mask,
        **options_from_torch(module),
    )
    tx = torch.tensor(x, requires_grad=True)
    tm = torch.tensor(memory, requires_grad=True)
    ty = module(
        tx,
        tm,
        tgt_mask=tgt_mask,
        tgt_is_causal=True,
        memory_key_padding_mask=torch.tensor(memory_padding),
    )
    dy = rng.standard_normal(y.shape)
    ty.backward(torch.tensor(dy))
    dparams, dx, dmemory = pullback(dy)
    assert rel_err(y, ty.detach().numpy()) < TOL
    assert rel_err(dx, tx.grad.numpy()) < TOL
    assert rel_err(dmemory, tm.grad.numpy()) < TOL
    assert_param_grads_match(module, dparams)


def test_float_masks_are_biases():
    """torch's float ``src_mask`` / ``tgt_mask`` / ``memory_mask`` are refattn's additive biases."""
    torch = pytest.importorskip("torch")
    d_model, n_heads, n, n_m = 8, 2, 4, 3
    rng = np.random.default_rng(4)
    enc = perturbed(
        torch,
        torch.nn.TransformerEncoderLayer(
            d_model, n_heads, 12, dropout=0.0, batch_first=True, dtype=torch.float64
        ),
        seed=5,
    )
    dec = perturbed(
        torch,
        torch.nn.TransformerDecoderLayer(
            d_model,
            n_heads,
            12,
            dropout=0.0,
            batch_first=True,
            norm_first=True,
            dtype=torch.float64,
        ),
        seed=6,
    )
    x = rng.standard_normal((2, n, d_model))
    memory = rng.standard_normal((2, n_m, d_model))
    src_bias = rng.standard_normal((n, n))
    src_bias[0, 1:] = -np.inf  # -inf entries are masked out, as in torch
    memory_bias = rng.standard_normal((n, n_m))
    tx = torch.tensor(x, requires_grad=True)
    tm = torch.tensor(memory, requires_grad=True)
    ty = enc(tx, src_mask=torch.tensor(src_bias))
    tz = dec(ty, tm, tgt_mask=torch.tensor(src_bias), memory_mask=torch.tensor(memory_bias))
    dz = rng.standard_normal(tuple(tz.shape))
    tz.backward(torch.tensor(dz))
    y, pb_enc = refattn.vjp(
        transformer_encoder_layer,
        params_from_torch(enc),
        x,
        bias=src_bias,
        **options_from_torch(enc),
    )
    z, pb_dec = refattn.vjp(
        transformer_decoder_layer,
        params_from_torch(dec),
        y,
        memory,
        self_bias=src_bias,
        memory_bias=memory_bias,
        **options_from_torch(dec),
    )
    assert rel_err(z, tz.detach().numpy()) < TOL
    d_dec, dy, dmemory = pb_dec(dz)
    d_enc, dx = pb_enc(dy)
    assert rel_err(dx, tx.grad.numpy()) < TOL
    assert rel_err(dmemory, tm.grad.numpy()) < TOL
    assert_param_grads_match(enc, d_enc)
    assert_param_grads_match(dec, d_dec)


def test_encoder_stack_chained_through_pullbacks():
    torch = pytest.importorskip("torch")
    d_model, n_heads, d_ff, n_layers = 8, 2, 12, 3
    modules = [
        perturbed(
            torch,
            torch.nn.TransformerEncoderLayer(
                d_model,
                n_heads,
                d_ff,
                dropout=0.0,
                batch_first=True,
                norm_first=i % 2 == 1,
                activation="gelu" if i == 1 else "relu",
                dtype=torch.float64,
            ),
            seed=10 + i,
        )
        for i in range(n_layers)
    ]
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 4, d_model))
    # forward through the stack, keeping each layer's pullback
    h, pullbacks = x, []
    for m in modules:
        h, pb = refattn.vjp(
            transformer_encoder_layer,
            params_from_torch(m),
            h,
            is_causal=True,
            **options_from_torch(m),
        )
        pullbacks.append(pb)
    dy = rng.standard_normal(h.shape)
    # backward: each pullback's input gradient is the cotangent of the layer below
    g, layer_grads = dy, []
    for pb in reversed(pullbacks):
        dparams, g = pb(g)
        layer_grads.append(dparams)
    layer_grads.reverse()
    tx = torch.tensor(x, requires_grad=True)
    th = tx
    causal = torch.nn.Transformer.generate_square_subsequent_mask(4, dtype=torch.float64)
    for m in modules:
        th = m(th, src_mask=causal, is_causal=True)
    th.backward(torch.tensor(dy))
    assert rel_err(h, th.detach().numpy()) < TOL
    assert rel_err(g, tx.grad.numpy()) < TOL
    for m, dparams in zip(modules, layer_grads, strict=True):
        assert_param_grads_match(m, dparams)


# ----------------------------------------------------------------------------- backends / dtype


def test_encoder_float32_backend(xp):
    p32 = init_transformer_encoder_layer(8, 2, dim_feedforward=16, seed=4, xp=xp, dtype="float32")
    p64 = init_transformer_encoder_layer(8, 2, dim_feedforward=16, seed=4, xp=xp)
    x32 = randn(xp, (2, 3, 8), seed=5, dtype="float32")
    y32, pullback = refattn.vjp(transformer_encoder_layer, p32, x32, n_heads=2, norm_first=True)
    assert y32.dtype == xp.float32 and type(y32) is type(x32)
    dparams, dx = pullback(xp.ones_like(y32))
    assert dx.dtype == xp.float32 and dparams["norm1"]["weight"].dtype == xp.float32
    y64 = transformer_encoder_layer(p64, xp.astype(x32, xp.float64), n_heads=2, norm_first=True)
    assert rel_err(y32, to_numpy(y64)) < 1e-5


def test_decoder_cross_attention_with_other_memory_width(xp):
    params = init_transformer_decoder_layer(8, 2, dim_feedforward=8, d_memory=5, seed=6, xp=xp)
    x = randn(xp, (1, 3, 8), seed=7)
    memory = randn(xp, (1, 4, 5), seed=8)
    y, pullback = refattn.vjp(transformer_decoder_layer, params, x, memory, n_heads=2)
    _, _, dmemory = pullback(xp.ones_like(y))
    assert tuple(dmemory.shape) == (1, 4, 5)
    # the memory gradient is the directional derivative: check it on one direction
    direction = randn(xp, (1, 4, 5), seed=9)
    step = 1e-6
    plus = transformer_decoder_layer(params, x, memory + step * direction, n_heads=2)
    minus = transformer_decoder_layer(params, x, memory - step * direction, n_heads=2)
    numerical = float(np.sum(to_numpy(plus - minus))) / (2 * step)
    analytical = float(np.sum(to_numpy(dmemory * direction)))
    assert abs(numerical - analytical) <= 1e-7 * max(1.0, abs(numerical))


# ----------------------------------------------------------------------------- errors


def test_errors_name_the_key_path():
    x = np.ones((2, 3, 8))
    params = init_transformer_encoder_layer(8, 2, dim_feedforward=16)
    broken = {**params, "self_attn": {**params["self_attn"], "query": {"bias": np.zeros(8)}}}
    with pytest.raises(ValueError, match=r"missing parameter 'self_attn\.query\.weight'"):
        transformer_encoder_layer(broken, x, n_heads=2)
    broken = {**params, "linear2": {"weight": np.zeros((15, 8)), "bias": np.zeros(8)}}
    with pytest.raises(ValueError, match=r"'linear2.weight' must have shape \(16, 8\)"):
        transformer_encoder_layer(broken, x, n_heads=2)
    broken = {**params, "norm2": {"weight": np.ones(7)}}
    with pytest.raises(ValueError, match=r"'norm2.weight' must have shape \(8,\)"):
        transformer_encoder_layer(broken, x, n_heads=2)
    with pytest.raises(ValueError, match=r"missing parameter\(s\) \['norm1'\]"):
        transformer_encoder_layer({k: v for k, v in params.items() if k != "norm1"}, x, n_heads=2)
    with pytest.raises(ValueError, match=r"d_model \(8\) must be divisible by n_heads \(3\)"):
        transformer_encoder_layer(params, x, n_heads=3)
    with pytest.raises(ValueError, match="unknown dropout_masks key"):
        transformer_encoder_layer(params, x, n_heads=2, dropout_masks={"dropout3": x})
    with pytest.raises(ValueError, match="does not broadcast"):
        transformer_encoder_layer(params, x, n_heads=2, dropout_masks={"dropout": np.ones(5)})
    dec = init_transformer_decoder_layer(8, 2, dim_feedforward=16)
    broken = {**dec, "cross_attn": {**dec["cross_attn"], "key": {"weight": np.zeros((8, 6))}}}
    with pytest.raises(ValueError, match=r"'cross_attn.key.weight' must have shape \(8, 8\)"):
        transformer_decoder_layer(broken, x, x, n_heads=2)
    with pytest.raises(ValueError, match="memory_mask"):
        transformer_decoder_layer(dec, x, x, n_heads=2, memory_mask=np.ones((2, 2), dtype=bool))
