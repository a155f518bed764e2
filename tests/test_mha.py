"""Multi-head attention: against ``torch.nn.MultiheadAttention`` in float64 (outputs, input
gradients and every parameter gradient), gradcheck on every backend, GQA/MQA, errors.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import randn, rel_err, to_numpy

import refattn
from refattn._check_runner import run_case
from refattn.checks import all_cases
from refattn.interop.torch import grads_to_torch, params_from_torch
from refattn.layers.attention import init_multi_head_attention, multi_head_attention

CASES = [c for c in all_cases() if c.op.name == "multi_head_attention"]
TOL = 1e-10


def perturbed_module(torch, module, seed=0):
    """Move every parameter off torch's init (zero biases) so every gradient is exercised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return module.train()  # train mode: torch's fused inference fast path is off


def assert_param_grads_match(torch, module, dparams):
    """Every parameter gradient in torch's layout, each tensor to TOL relative."""
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


# ----------------------------------------------------------------------------- torch module


@pytest.mark.parametrize(
    "kdim,vdim,bias,masks",
    [
        (None, None, True, "none"),
        (None, None, True, "bool"),
        (3, 5, True, "float"),
        (6, 6, False, "bool"),
    ],
)
def test_matches_torch_module(kdim, vdim, bias, masks):
    torch = pytest.importorskip("torch")
    d_model, n_heads, b, n_q, n_k = 8, 2, 2, 3, 5
    module = torch.nn.MultiheadAttention(
        d_model, n_heads, bias=bias, kdim=kdim, vdim=vdim, batch_first=True, dtype=torch.float64
    )
    perturbed_module(torch, module)
    params = params_from_torch(module)
    rng = np.random.default_rng(1)
    q = rng.standard_normal((b, n_q, d_model))
    k = rng.standard_normal((b, n_k, kdim or d_model))
    v = rng.standard_normal((b, n_k, vdim or d_model))
    torch_kw = {}
    options = {}
    if masks == "bool":
        attn_mask = rng.random((n_q, n_k)) < 0.3  # True = ignore
        attn_mask[:, 0] = False
        padding = np.zeros((b, n_k), dtype=bool)
        padding[1, -2:] = True
        torch_kw = {"attn_mask": torch.tensor(attn_mask), "key_padding_mask": torch.tensor(padding)}
        mask, _ = refattn.from_torch_mha_masks(attn_mask, padding)
        options["mask"] = mask
    elif masks == "float":
        attn_bias = rng.standard_normal((b * n_heads, n_q, n_k))
        torch_kw = {"attn_mask": torch.tensor(attn_bias)}
        options["bias"] = attn_bias.reshape(b, n_heads, n_q, n_k)
    (y, w), pullback = refattn.vjp(
        multi_head_attention, params, q, k, v, n_heads=n_heads, return_weights=True, **options
    )
    tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    ty, tw = module(tq, tk, tv, need_weights=True, average_attn_weights=False, **torch_kw)
    dy = rng.standard_normal(y.shape)
    ty.backward(torch.tensor(dy))
    assert rel_err(y, ty.detach().numpy()) < TOL
    assert rel_err(w, tw.detach().numpy()) < TOL
    dparams, dq, dk, dv = pullback((dy, None))
    for mine, theirs in ((dq, tq), (dk, tk), (dv, tv)):
        assert rel_err(mine, theirs.grad.numpy()) < TOL
    assert_param_grads_match(torch, module, dparams)


def test_self_attention_gradient_is_the_sum_of_the_three():
    torch = pytest.importorskip("torch")
    d_model, n_heads = 8, 4
    module = torch.nn.MultiheadAttention(d_model, n_heads, batch_first=True, dtype=torch.float64)
    perturbed_module(torch, module, seed=2)
    params = params_from_torch(module)
    x = np.random.default_rng(3).standard_normal((2, 4, d_model))
    mask = ~np.triu(np.ones((4, 4), dtype=bool), 1)
    y, pullback = refattn.vjp(multi_head_attention, params, x, x, x, n_heads=n_heads, mask=mask)
    tx = torch.tensor(x, requires_grad=True)
    ty, _ = module(tx, tx, tx, attn_mask=torch.tensor(~mask), need_weights=False)
    dy = np.random.default_rng(4).standard_normal(y.shape)
    ty.backward(torch.tensor(dy))
    dparams, dq, dk, dv = pullback(dy)
    assert rel_err(y, ty.detach().numpy()) < TOL
    assert rel_err(dq + dk + dv, tx.grad.numpy()) < TOL
    # each of the three alone is not the gradient
    assert rel_err(dq, tx.grad.numpy()) > 1e-3
    assert_param_grads_match(torch, module, dparams)


# ----------------------------------------------------------------------------- GQA / MQA


def _expand_kv_heads(params, n_heads, n_kv_heads, head_dim):
    """The MHA tree equivalent to a GQA tree: each kv head's columns repeated g times."""
    g = n_heads // n_kv_heads
    cols = np.concatenate(
        [np.arange(j * head_dim, (j + 1) * head_dim) for j in range(n_kv_heads) for _ in range(g)]
    )
    out = {k: dict(v) for k, v in params.items()}
    for key in ("key", "value"):
        out[key] = {name: a[..., cols] for name, a in params[key].items()}
    return out, cols


@pytest.mark.parametrize("n_kv_heads", [1, 2])
def test_gqa_equals_mha_with_repeated_kv_heads(xp, n_kv_heads):
    d_model, n_heads, head_dim = 8, 4, 2
    params = init_multi_head_attention(d_model, n_heads, n_kv_heads=n_kv_heads, seed=3)
    rng = np.random.default_rng(5)
    params = {
        k: {n: a + 0.2 * rng.standard_normal(a.shape) for n, a in v.items()}
        for k, v in params.items()
    }
    full, cols = _expand_kv_heads(params, n_heads, n_kv_heads, head_dim)
    to = lambda t: {k: {n: xp.asarray(a) for n, a in v.items()} for k, v in t.items()}  # noqa: E731
    q = randn(xp, (2, 3, d_model), seed=6)
    kv = randn(xp, (2, 5, d_model), seed=7)
    y, pb = refattn.vjp(
        multi_head_attention,
        to(params),
        q,
        kv,
        kv,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        is_causal=True,
    )
    y_full, pb_full = refattn.vjp(
        multi_head_attention, to(full), q, kv, kv, n_heads=n_heads, is_causal=True
    )
    assert rel_err(y, to_numpy(y_full)) < 1e-13
    dy = randn(xp, tuple(y.shape), seed=8)
    g, dq, dk, dv = pb(dy)
    g_full, dq_full, dk_full, dv_full = pb_full(dy)
    assert rel_err(dq, to_numpy(dq_full)) < 1e-13
    assert rel_err(dk + dv, to_numpy(dk_full + dv_full)) < 1e-13
    # a GQA kv weight's gradient is the sum over the query heads sharing it
    for key in ("key", "value"):
        summed = np.zeros(params[key]["weight"].shape)
        np.add.at(summed.T, cols, to_numpy(g_full[key]["weight"]).T)
        assert rel_err(g[key]["weight"], summed) < 1e-13


# ----------------------------------------------------------------------------- dtype / options


def test_float32_in_float32_out(xp):
    params64 = init_multi_head_attention(8, 2, seed=9, xp=xp)
    params32 = init_multi_head_attention(8, 2, seed=9, xp=xp, dtype="float32")
    x32 = randn(xp, (2, 3, 8), seed=10, dtype="float32")
    y32, pullback = refattn.vjp(multi_head_attention, params32, x32, x32, x32, n_heads=2)
    assert y32.dtype == xp.float32 and type(y32) is type(x32)
    dparams, dq, _, _ = pullback(xp.ones_like(y32))
    assert dparams["out"]["weight"].dtype == xp.float32 and dq.dtype == xp.float32
    x64 = xp.astype(x32, xp.float64)
    y64 = multi_head_attention(params64, x64, x64, x64, n_heads=2)
    assert rel_err(y32, to_numpy(y64)) < 1e-5


def test_unbatched_equals_batch_of_one():
    params = init_multi_head_attention(4, 2, seed=11)
    x = np.random.default_rng(12).standard_normal((3, 4))
    y = multi_head_attention(params, x, x, x, n_heads=2, is_causal=True)
    y1 = multi_head_attention(params, x[None], x[None], x[None], n_heads=2, is_causal=True)
    np.testing.assert_array_equal(y, y1[0])


# ----------------------------------------------------------------------------- errors


def test_errors_name_the_problem():
    x = np.ones((2, 3, 6))
    params = init_multi_head_attention(6, 2)
    with pytest.raises(ValueError, match=r"d_model \(6\) must be divisible by n_heads \(4\)"):
        multi_head_attention(params, x, x, x, n_heads=4)
    with pytest.raises(ValueError, match=r"n_heads \(3\) must be divisible by n_kv_heads \(2\)"):
        multi_head_attention(init_multi_head_attention(6, 3), x, x, x, n_heads=3, n_kv_heads=2)
    broken = {k: dict(v) for k, v in params.items()}
    del broken["value"]["weight"]
    with pytest.raises(ValueError, match=r"missing parameter 'value\.weight'"):
        multi_head_attention(broken, x, x, x, n_heads=2)
    with pytest.raises(ValueError, match=r"'key.weight' must have shape \(5, 6\)"):
        multi_head_attention(params, x, np.ones((2, 4, 5)), np.ones((2, 4, 6)), n_heads=2)
    with pytest.raises(ValueError, match="missing parameter 'out'"):
        multi_head_attention({k: params[k] for k in ("query", "key", "value")}, x, x, x, n_heads=2)
    with pytest.raises(ValueError, match="does not broadcast"):
        multi_head_attention(params, x, x, x, n_heads=2, mask=np.ones((4, 3), dtype=bool))
    with pytest.raises(ValueError, match="leading"):
        multi_head_attention(params, x, np.ones((3, 3, 6)), np.ones((3, 3, 6)), n_heads=2)
    with pytest.raises(TypeError, match="one dtype"):
        multi_head_attention(params, x, x, x.astype(np.float32), n_heads=2)
    with pytest.raises(ValueError, match="n_heads must be a positive int"):
        multi_head_attention(params, x, x, x, n_heads=0)
