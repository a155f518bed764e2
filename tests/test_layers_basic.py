"""Basic layer ops: linear, layer_norm, relu/gelu/gelu_tanh, feed_forward, and their init.

Backwards are checked by ``refattn.gradcheck`` on every backend (the registered check cases of
``refattn.checks.layers``; NumPy with torch autograd runs in ``test_checks.py``) and against torch
float64 autograd. The exact GELU's ``erfc`` is checked against SciPy and ``math.erf``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import randn, rel_err, to_numpy

import refattn
from refattn._check_runner import run_case
from refattn.checks import all_cases
from refattn.layers.basic import (
    erfc,
    erfc_portable,
    feed_forward,
    gelu,
    gelu_tanh,
    init_feed_forward,
    init_layer_norm,
    init_linear,
    layer_norm,
    linear,
    relu,
)

_OPS = {"linear", "layer_norm", "relu", "gelu", "gelu_tanh", "feed_forward"}
CASES = [c for c in all_cases() if c.op.name in _OPS]


def tree_to(xp, tree, dtype="float64"):
    if isinstance(tree, dict):
        return {k: tree_to(xp, v, dtype) for k, v in tree.items()}
    return xp.asarray(to_numpy(tree), dtype=getattr(xp, dtype))


# ----------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label)
def test_case_gradcheck_on_backend(case, xp):
    result = run_case(case, xp=xp, frameworks=())
    assert result.status["gradcheck"] == "ok", result.status


def test_cases_cover_every_basic_op():
    assert {c.op.name for c in CASES} == _OPS


def test_layer_norm_eps_against_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x = 0.05 * rng.standard_normal((3, 6)) + rng.standard_normal((3, 1))
    params = {"weight": 1 + 0.3 * rng.standard_normal(6), "bias": rng.standard_normal(6)}
    eps = 0.01  # comparable to the variance: a wrong eps placement would show
    y, pullback = refattn.vjp(layer_norm, params, x, eps=eps)
    dy = rng.standard_normal(y.shape)
    dparams, dx = pullback(dy)
    tx = torch.tensor(x, requires_grad=True)
    tw = torch.tensor(params["weight"], requires_grad=True)
    tb = torch.tensor(params["bias"], requires_grad=True)
    ty = torch.nn.functional.layer_norm(tx, (6,), tw, tb, eps)
    ty.backward(torch.tensor(dy))
    assert rel_err(y, ty.detach().numpy()) < 1e-13
    assert rel_err(dx, tx.grad.numpy()) < 1e-12
    assert rel_err(dparams["weight"], tw.grad.numpy()) < 1e-12
    assert rel_err(dparams["bias"], tb.grad.numpy()) < 1e-12
    # and gradcheck at that eps (through a wrapper: gradcheck's own ``eps`` is its step)
    wrapped = refattn.Op(
        lambda p, x: layer_norm.forward(p, x, eps=eps),
        layer_norm.backward,
        name="layer_norm_eps",
    )
    assert refattn.gradcheck(wrapped, params, x)


def test_layer_norm_output_is_normalised(xp):
    x = randn(xp, (4, 7), seed=1) * 3.0 + 5.0
    params = init_layer_norm(7, xp=xp)
    y = to_numpy(layer_norm(params, x, eps=0.0))
    np.testing.assert_allclose(y.mean(axis=-1), 0.0, atol=1e-14)
    np.testing.assert_allclose(y.var(axis=-1), 1.0, rtol=1e-13)


# ----------------------------------------------------------------------------- erf / GELU


def test_erfc_portable_matches_scipy():
    scipy_special = pytest.importorskip("scipy.special")
    xp = refattn._backend.default_namespace()
    x = np.linspace(-27.0, 27.0, 400_001)
    got = erfc_portable(xp, x)
    want = scipy_special.erfc(x)
    assert np.max(np.abs(got - want)) <= 2e-15
    tail = (x >= 2.5) & (want > 1e-300)  # normal numbers: subnormals lose relative precision
    assert np.max(np.abs(got[tail] - want[tail]) / want[tail]) <= 3e-15
    assert np.all(np.isfinite(got))


def test_erfc_float32_portable():
    xp = refattn._backend.default_namespace()
    x = np.linspace(-6, 6, 1001, dtype=np.float32)
    got = erfc_portable(xp, x)
    assert got.dtype == np.float32
    want = np.array([math.erfc(float(v)) for v in x])
    assert np.max(np.abs(got - want)) < 1e-6


def test_gelu_matches_math_erf(xp):
    values = [-8.0, -3.3, -1.0, -1e-3, 0.0, 2e-4, 0.5, 1.7, 4.2, 9.0]
    x = xp.asarray(values, dtype=xp.float64)
    y = to_numpy(gelu(x))
    want = np.array([v * 0.5 * (1.0 + math.erf(v / math.sqrt(2.0))) for v in values])
    np.testing.assert_allclose(y, want, rtol=0, atol=2e-15)
    # and the derivative Phi(x) + x phi(x) through the pullback
    _, pullback = refattn.vjp(gelu, x)
    (dx,) = pullback(xp.ones_like(x))
    dwant = [
        0.5 * (1 + math.erf(v / math.sqrt(2))) + v * math.exp(-v * v / 2) / math.sqrt(2 * math.pi)
        for v in values
    ]
    np.testing.assert_allclose(to_numpy(dx), dwant, rtol=0, atol=2e-15)


def test_erfc_dispatch_agrees_with_portable(xp):
    x = xp.asarray(np.linspace(-7, 7, 2001))
    got = to_numpy(erfc(xp, x))
    want = to_numpy(erfc_portable(xp, x))
    assert np.max(np.abs(got - want)) < 3e-15


def test_relu_gradient_at_zero_is_zero_like_torch(xp):
    x = xp.asarray([-1.0, 0.0, 2.0])
    _, pullback = refattn.vjp(relu, x)
    (dx,) = pullback(xp.ones_like(x))
    np.testing.assert_array_equal(to_numpy(dx), [0.0, 0.0, 1.0])


@pytest.mark.parametrize("op", [relu, gelu, gelu_tanh], ids=lambda op: op.name)
def test_activation_float32_stays_float32(xp, op):
    x32 = randn(xp, (3, 5), seed=2, dtype="float32")
    y32 = op(x32)
    assert y32.dtype == xp.float32
    assert type(y32) is type(x32)
    y64 = op(xp.astype(x32, xp.float64))
    assert rel_err(y32, y64) < 1e-6


# ----------------------------------------------------------------------------- dtype / backend


def test_linear_and_ffn_float32_backend(xp):
    params = init_feed_forward(4, 6, seed=3, xp=xp, dtype="float32")
    x = randn(xp, (2, 3, 4), seed=4, dtype="float32")
    y, pullback = refattn.vjp(feed_forward, params, x, activation="gelu")
    assert y.dtype == xp.float32 and type(y) is type(x)
    dparams, dx = pullback(xp.ones_like(y))
    assert dparams["linear1"]["weight"].dtype == xp.float32
    assert dx.dtype == xp.float32
    y64 = feed_forward(tree_to(xp, params), xp.astype(x, xp.float64), activation="gelu")
    assert rel_err(y, y64) < 1e-5


def test_linear_leading_axes_flattened_consistently(xp):
    params = init_linear(4, 3, seed=5, xp=xp)
    x = randn(xp, (2, 3, 4), seed=6)
    y = to_numpy(linear(params, x))
    rows = np.stack([to_numpy(linear(params, x[i, j, :])) for i in range(2) for j in range(3)])
    np.testing.assert_allclose(y.reshape(6, 3), rows, rtol=1e-14)


# ----------------------------------------------------------------------------- init


def test_init_linear_uses_torch_bounds_and_seed(xp):
    d_in, d_out = 64, 48
    p = init_linear(d_in, d_out, seed=7, xp=xp, dtype="float32")
    w, b = to_numpy(p["weight"]), to_numpy(p["bias"])
    assert p["weight"].dtype == xp.float32 and w.shape == (d_in, d_out) and b.shape == (d_out,)
    bound = 1 / math.sqrt(d_in)
    assert np.max(np.abs(w)) <= bound and np.max(np.abs(w)) > 0.95 * bound
    assert np.max(np.abs(b)) <= bound
    assert abs(np.std(w) - bound / math.sqrt(3)) < 0.05 * bound  # uniform's std
    again = init_linear(d_in, d_out, seed=7, xp=xp, dtype="float32")
    np.testing.assert_array_equal(to_numpy(again["weight"]), w)
    other = init_linear(d_in, d_out, seed=8, xp=xp, dtype="float32")
    assert not np.array_equal(to_numpy(other["weight"]), w)
    assert "bias" not in init_linear(3, 2, bias=False)


def test_init_layer_norm_ones_zeros(xp):
    p = init_layer_norm(5, xp=xp)
    np.testing.assert_array_equal(to_numpy(p["weight"]), np.ones(5))
    np.testing.assert_array_equal(to_numpy(p["bias"]), np.zeros(5))


# ----------------------------------------------------------------------------- errors


def test_missing_and_misshaped_parameters_named():
    x = np.ones((2, 4))
    with pytest.raises(ValueError, match="missing parameter 'weight'"):
        linear({"bias": np.zeros(3)}, x)
    with pytest.raises(ValueError, match=r"'weight' must have shape \(4, ·\)"):
        linear({"weight": np.zeros((5, 3))}, x)
    with pytest.raises(ValueError, match=r"'bias' must have shape \(3,\)"):
        linear({"weight": np.zeros((4, 3)), "bias": np.zeros(2)}, x)
    with pytest.raises(TypeError, match="'weight' must have the inputs' dtype"):
        linear({"weight": np.zeros((4, 3), dtype=np.float32)}, x)
    with pytest.raises(ValueError, match=r"'linear2.weight' must have shape \(6, 4\)"):
        params = init_feed_forward(4, 6)
        params["linear2"]["weight"] = np.zeros((6, 5))
        feed_forward(params, x)
    with pytest.raises(ValueError, match="missing parameter 'linear1'"):
        feed_forward({"linear2": init_linear(6, 4)}, x)
    with pytest.raises(ValueError, match="unexpected parameter"):
        layer_norm({"weight": np.ones(4), "gamma": np.ones(4)}, x)


def test_bad_options_rejected():
    x = np.ones((2, 4))
    params = init_feed_forward(4, 6)
    with pytest.raises(ValueError, match="activation must be one of"):
        feed_forward(params, x, activation="swish")
    with pytest.raises(ValueError, match="needs an explicit dropout_mask"):
        feed_forward(params, x, dropout_p=0.1)
    with pytest.raises(ValueError, match="does not broadcast"):
        feed_forward(params, x, dropout_mask=np.ones((2, 5), dtype=bool))
    with pytest.raises(TypeError, match="real floating"):
        relu(np.ones(3, dtype=np.int64))
    with pytest.raises(ValueError, match="eps must be finite"):
        layer_norm(init_layer_norm(4), x, eps=-1.0)
