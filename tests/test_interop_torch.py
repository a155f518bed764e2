"""``refattn.interop.torch``: state dicts both ways, gradients into torch's layout, options."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import to_numpy

import refattn
from refattn.interop.torch import (
    grads_to_torch,
    options_from_torch,
    params_from_torch,
    params_to_torch,
)
from refattn.layers.attention import init_multi_head_attention, multi_head_attention
from refattn.layers.transformer import (
    init_transformer_decoder_layer,
    init_transformer_encoder_layer,
)

torch = pytest.importorskip("torch")


def _modules():
    f64 = {"dtype": torch.float64}
    return {
        "mha_packed": torch.nn.MultiheadAttention(8, 2, **f64),
        "mha_kdim_vdim": torch.nn.MultiheadAttention(8, 2, kdim=3, vdim=5, **f64),
        "mha_no_bias": torch.nn.MultiheadAttention(8, 4, bias=False, **f64),
        "mha_bias_kv": torch.nn.MultiheadAttention(8, 2, add_bias_kv=True, **f64),
        "encoder": torch.nn.TransformerEncoderLayer(8, 2, 12, batch_first=True, **f64),
        "encoder_no_bias": torch.nn.TransformerEncoderLayer(
            8, 2, 12, batch_first=True, bias=False, **f64
        ),
        "decoder": torch.nn.TransformerDecoderLayer(8, 2, 12, batch_first=True, **f64),
    }


@pytest.mark.parametrize("name", list(_modules()))
def test_state_dict_round_trip_is_exact(name):
    module = _modules()[name]
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p))
    params = params_from_torch(module)
    state = params_to_torch(params)
    reference = module.state_dict()
    assert set(state) == set(reference)
    for key, value in reference.items():
        assert state[key].dtype == value.dtype
        assert torch.equal(state[key], value), key
    # and from a plain state dict (kind inferred from the names)
    again = params_from_torch(reference)
    assert refattn._tree.structure(again) == refattn._tree.structure(params)


def test_layout_is_transposed():
    module = torch.nn.MultiheadAttention(4, 2, kdim=3, vdim=3, dtype=torch.float64)
    params = params_from_torch(module)
    np.testing.assert_array_equal(params["key"]["weight"], module.k_proj_weight.detach().numpy().T)
    np.testing.assert_array_equal(
        params["out"]["weight"], module.out_proj.weight.detach().numpy().T
    )
    packed = torch.nn.MultiheadAttention(4, 2, dtype=torch.float64)
    params = params_from_torch(packed)
    w = packed.in_proj_weight.detach().numpy()
    np.testing.assert_array_equal(params["value"]["weight"], w[8:12].T)
    np.testing.assert_array_equal(params["query"]["bias"], packed.in_proj_bias.detach()[:4])


def test_refattn_init_loads_into_torch_and_matches():
    params = init_transformer_encoder_layer(8, 2, dim_feedforward=12, seed=3)
    module = torch.nn.TransformerEncoderLayer(
        8, 2, 12, dropout=0.0, batch_first=True, dtype=torch.float64
    )
    module.load_state_dict(params_to_torch(params))
    x = np.random.default_rng(0).standard_normal((2, 3, 8))
    y = refattn.layers.transformer_encoder_layer(params, x, n_heads=2)
    with torch.no_grad():
        ty = module.train()(torch.tensor(x))
    assert np.max(np.abs(y - ty.numpy())) < 1e-13
    dec = init_transformer_decoder_layer(8, 2, dim_feedforward=12, seed=4)
    torch.nn.TransformerDecoderLayer(8, 2, 12, dtype=torch.float64).load_state_dict(
        params_to_torch(dec)
    )


def test_grads_to_torch_sets_module_grads():
    module = torch.nn.MultiheadAttention(
        8, 2, kdim=3, vdim=5, batch_first=True, dtype=torch.float64
    )
    params = params_from_torch(module)
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal(s) for s in ((2, 3, 8), (2, 4, 3), (2, 4, 5)))
    y, pullback = refattn.vjp(multi_head_attention, params, q, k, v, n_heads=2)
    dy = rng.standard_normal(y.shape)
    dparams, *_ = pullback(dy)
    ty, _ = module(*(torch.tensor(a) for a in (q, k, v)), need_weights=False)
    ty.backward(torch.tensor(dy))
    expected = {n: p.grad.clone() for n, p in module.named_parameters()}
    module.zero_grad(set_to_none=True)
    grads = grads_to_torch(dparams, module=module)
    for name, p in module.named_parameters():
        assert p.grad is not None
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-12, atol=1e-14)
        assert torch.equal(grads[name], p.grad)


def test_dtype_and_backend_conversion():
    import array_api_strict

    module = torch.nn.MultiheadAttention(4, 2)  # float32
    params = params_from_torch(module, xp=array_api_strict)
    assert params["query"]["weight"].dtype == array_api_strict.float32
    params64 = params_from_torch(module, dtype="float64")
    assert params64["out"]["weight"].dtype == np.float64
    back = params_to_torch(params)
    assert back["in_proj_weight"].dtype == torch.float32
    assert torch.equal(back["in_proj_weight"], module.in_proj_weight.detach())
    assert np.array_equal(
        to_numpy(params["query"]["weight"]), module.in_proj_weight.detach().numpy()[:4].T
    )


def test_options_from_torch():
    enc = torch.nn.TransformerEncoderLayer(
        8, 4, norm_first=True, activation="gelu", layer_norm_eps=1e-6
    )
    assert options_from_torch(enc) == {
        "n_heads": 4,
        "norm_first": True,
        "activation": "gelu",
        "layer_norm_eps": 1e-6,
        "batch_first": False,
    }
    tanh = torch.nn.TransformerEncoderLayer(8, 4, activation=torch.nn.GELU(approximate="tanh"))
    assert options_from_torch(tanh)["activation"] == "gelu_tanh"
    assert options_from_torch(torch.nn.MultiheadAttention(8, 2)) == {
        "n_heads": 2,
        "add_zero_attn": False,
        "batch_first": False,
    }
    mha = torch.nn.MultiheadAttention(8, 2, add_zero_attn=True, batch_first=True)
    assert options_from_torch(mha) == {"n_heads": 2, "add_zero_attn": True, "batch_first": True}
    with pytest.raises(ValueError, match="unsupported activation"):
        options_from_torch(torch.nn.TransformerEncoderLayer(8, 4, activation=torch.nn.SiLU()))


def test_unsupported_modules_and_trees_rejected():
    with pytest.raises(TypeError, match="source must be"):
        params_from_torch(torch.nn.Linear(2, 2))
    state = dict(torch.nn.MultiheadAttention(8, 2).state_dict())
    del state["out_proj.weight"]
    with pytest.raises(ValueError, match=r"no 'out_proj\.weight'"):
        params_from_torch(state)
    with pytest.raises(ValueError, match="GQA/MQA"):
        params_to_torch(init_multi_head_attention(8, 4, n_kv_heads=2))
    partial = init_multi_head_attention(8, 2)
    del partial["key"]["bias"]
    with pytest.raises(ValueError, match="biases on some projections"):
        params_to_torch(partial)


def test_importing_interop_does_not_import_torch():
    code = "import sys, refattn.interop.torch; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
