"""Bahdanau (additive) and Luong (multiplicative) attention.

Backwards are checked by ``refattn.gradcheck`` over the ``xp`` backends and against torch
float64 autograd through the seed's own ``BahdanauAttention`` and ``LuongAttention`` modules
(copied below as PyTorch code, float64), comparing outputs, input gradients and every parameter
gradient to 1e-10 relative.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import randn, rel_err, to_numpy

import refattn
from refattn._check_runner import compare_with_framework, run_case
from refattn.checks import all_cases
from refattn.layers.additive import (
    additive_attention,
    init_additive_attention,
    init_multiplicative_attention,
    multiplicative_attention,
)

CASES = [c for c in all_cases() if c.op.name in {"additive_attention", "multiplicative_attention"}]


def _tree_to(xp, tree):
    if isinstance(tree, dict):
        return {k: _tree_to(xp, v) for k, v in tree.items()}
    return xp.asarray(tree)


# ----------------------------------------------------------------------------- check cases


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label)
def test_case_gradcheck(case, xp):
    result = run_case(case, xp=xp, frameworks=())
    assert result.status["gradcheck"] == "ok", result.status


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label)
def test_case_matches_torch_autograd(case):
    pytest.importorskip("torch")
    status, err = compare_with_framework(case, "torch")
    assert status == "ok", status
    assert err <= 1e-10


# ----------------------------------------------------------------------------- seed modules


def _seed_modules(torch):
    """Seed 002's BahdanauAttention and LuongAttention, verbatim apart from formatting and an
    unused variable renamed ``_batch_size`` for the linter."""
    nn, F = torch.nn, torch.nn.functional

    class BahdanauAttention(nn.Module):
        def __init__(self, hidden_dim, query_dim):
            super().__init__()
            self.W_h = nn.Linear(hidden_dim, hidden_dim, bias=False)
            self.W_s = nn.Linear(query_dim, hidden_dim, bias=False)
            self.v = nn.Linear(hidden_dim, 1, bias=False)

        def forward(self, hidden_states, query):
            query = query.unsqueeze(1)
            energy = self.v(torch.tanh(self.W_h(hidden_states) + self.W_s(query)))
            attention = F.softmax(energy.squeeze(-1), dim=1)
            context = torch.bmm(attention.unsqueeze(1), hidden_states)
            context = context.squeeze(1)
            return context, attention

    class LuongAttention(nn.Module):
        def __init__(self, hidden_dim, method="general"):
            super().__init__()
            self.method = method
            if method == "general":
                self.W = nn.Linear(hidden_dim, hidden_dim, bias=False)
            elif method == "concat":
                self.W = nn.Linear(2 * hidden_dim, hidden_dim)
                self.v = nn.Linear(hidden_dim, 1, bias=False)

        def forward(self, hidden_states, query):
            if self.method == "dot":
                energy = torch.bmm(hidden_states, query.unsqueeze(2))
                energy = energy.squeeze(-1)
            elif self.method == "general":
                query_transformed = self.W(query)
                energy = torch.bmm(hidden_states, query_transformed.unsqueeze(2))
                energy = energy.squeeze(-1)
            elif self.method == "concat":
                _batch_size, seq_len, _ = hidden_states.size()
                query_expanded = query.unsqueeze(1).expand(-1, seq_len, -1)
                concat = torch.cat([hidden_states, query_expanded], dim=2)
                energy = self.v(torch.tanh(self.W(concat))).squeeze(-1)
            attention = F.softmax(energy, dim=1)
            context = torch.bmm(attention.unsqueeze(1), hidden_states)
            context = context.squeeze(1)
            return context, attention

    return BahdanauAttention, LuongAttention


def _module_params(module) -> dict:
    """A module's parameters in refattn's layout: ``{"W": {"weight": (in, out), "bias"}}``."""
    params: dict = {}
    for name, p in module.named_parameters():
        layer, kind = name.split(".")
        value = p.detach().numpy().copy()
        params.setdefault(layer, {})[kind] = value.T if kind == "weight" else value
    return params


def _compare_with_module(op, module, params, options, batch, n, d_h, d_q):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    keys, query = rng.standard_normal((batch, n, d_h)), rng.standard_normal((batch, d_q))
    d_c, d_w = rng.standard_normal((batch, d_h)), rng.standard_normal((batch, n))
    t_keys = torch.tensor(keys, requires_grad=True)
    t_query = torch.tensor(query, requires_grad=True)
    context, attention = module(t_keys, t_query)
    (context * torch.tensor(d_c)).sum().add((attention * torch.tensor(d_w)).sum()).backward()

    (ctx, weights), pullback = refattn.vjp(op, params, query, keys, **options)
    d_params, d_query, d_keys = pullback((d_c, d_w))
    assert rel_err(ctx, context.detach().numpy()) <= 1e-10
    assert rel_err(weights, attention.detach().numpy()) <= 1e-10
    assert rel_err(d_query, t_query.grad.numpy()) <= 1e-10
    assert rel_err(d_keys, t_keys.grad.numpy()) <= 1e-10
    n_checked = 0
    for name, p in module.named_parameters():
        layer, kind = name.split(".")
        mine = d_params[layer][kind]
        assert rel_err(mine.T if kind == "weight" else mine, p.grad.numpy()) <= 1e-10, name
        n_checked += 1
    assert n_checked == sum(len(v) for v in params.values())


def test_bahdanau_matches_seed_module():
    torch = pytest.importorskip("torch")
    bahdanau_cls, _ = _seed_modules(torch)
    torch.manual_seed(0)
    module = bahdanau_cls(hidden_dim=5, query_dim=3).double()
    _compare_with_module(
        additive_attention, module, _module_params(module), {}, batch=2, n=6, d_h=5, d_q=3
    )


@pytest.mark.parametrize("method", ["dot", "general", "concat"])
def test_luong_matches_seed_module(method):
    torch = pytest.importorskip("torch")
    _, luong_cls = _seed_modules(torch)
    torch.manual_seed(1)
    module = luong_cls(hidden_dim=4, method=method).double()
    params = _module_params(module)
    _compare_with_module(
        multiplicative_attention, module, params, {"method": method}, batch=3, n=5, d_h=4, d_q=4
    )


# ----------------------------------------------------------------------------- masks and cotangents


def _setup(xp, kind, *, bias=False, seed=0, batch=3, n=5, d_h=4, d_q=3):
    if kind == "additive":
        params = init_additive_attention(d_h, d_q, 6, bias=bias, seed=seed, xp=xp)
        return (
            params,
            {},
            randn(xp, (batch, d_q), seed=seed + 1),
            randn(xp, (batch, n, d_h), seed=2),
        )
    d_q = d_h if kind == "dot" else d_q
    params = init_multiplicative_attention(d_h, d_q, method=kind, bias=bias, seed=seed, xp=xp)
    query = randn(xp, (batch, d_q), seed=seed + 1)
    return params, {"method": kind}, query, randn(xp, (batch, n, d_h), seed=seed + 2)


@pytest.mark.parametrize("kind", ["additive", "dot", "general", "concat"])
def test_masking(xp, kind):
    params, options, query, keys = _setup(xp, kind, bias=True)
    op = additive_attention if kind == "additive" else multiplicative_attention
    host_mask = np.array(
        [[True, False, True, True, False], [False] * 5, [True, True, True, True, True]]
    )
    mask = xp.asarray(host_mask)
    (ctx, w), pullback = refattn.vjp(op, params, query, keys, mask=mask, **options)
    ctx, w = to_numpy(ctx), to_numpy(w)
    np.testing.assert_array_equal(w[~host_mask], 0.0)  # masked keys get exactly 0
    np.testing.assert_array_equal(ctx[1], 0.0)  # fully masked row: zero context
    np.testing.assert_allclose(w[[0, 2]].sum(axis=-1), 1.0, rtol=1e-14)
    # the masked-out keys do not matter: change them and nothing moves
    moved = to_numpy(keys).copy()
    moved[~host_mask] += 10.0
    ctx2, w2 = op(params, query, xp.asarray(moved), mask=mask, **options)
    np.testing.assert_allclose(to_numpy(ctx2), ctx, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(to_numpy(w2), w, rtol=1e-14, atol=1e-15)
    # gradients of the fully masked row are 0, and masked keys get no gradient at all
    dc, dw = randn(xp, tuple(ctx.shape), seed=9), randn(xp, tuple(w.shape), seed=10)
    _, d_query, d_keys = pullback((dc, dw))
    np.testing.assert_array_equal(to_numpy(d_query)[1], 0.0)
    np.testing.assert_array_equal(to_numpy(d_keys)[~host_mask], 0.0)
    # an all-True mask is the same as no mask
    full = xp.ones((3, 5), dtype=xp.bool)
    a = op(params, query, keys, mask=full, **options)
    b = op(params, query, keys, **options)
    np.testing.assert_array_equal(to_numpy(a[0]), to_numpy(b[0]))


@pytest.mark.parametrize("kind", ["additive", "concat"])
def test_none_cotangent_equals_zero_cotangent(xp, kind):
    params, options, query, keys = _setup(xp, kind)
    op = additive_attention if kind == "additive" else multiplicative_attention
    (ctx, w), pullback = refattn.vjp(op, params, query, keys, **options)
    dc, dw = randn(xp, tuple(ctx.shape), seed=3), randn(xp, tuple(w.shape), seed=4)
    for ct, ct0 in (((dc, None), (dc, xp.zeros_like(w))), ((None, dw), (xp.zeros_like(ctx), dw))):
        got, want = pullback(ct), pullback(ct0)
        for g, h in zip(refattn._tree.leaves(got), refattn._tree.leaves(want), strict=True):
            np.testing.assert_allclose(to_numpy(g), to_numpy(h), rtol=1e-15, atol=1e-16)


@pytest.mark.parametrize("kind", ["additive", "dot", "general", "concat"])
def test_float32_in_float32_out(xp, kind):
    d_q = 4 if kind == "dot" else 3
    query, keys = (
        randn(xp, (2, d_q), seed=1, dtype="float32"),
        randn(xp, (2, 3, 4), seed=2, dtype="float32"),
    )
    if kind == "additive":
        params = init_additive_attention(4, 3, xp=xp, dtype="float32")
        op, options = additive_attention, {}
    else:
        params = init_multiplicative_attention(4, d_q, method=kind, xp=xp, dtype="float32")
        op, options = multiplicative_attention, {"method": kind}
    (ctx, w), pullback = refattn.vjp(op, params, query, keys, **options)
    grads = refattn._tree.leaves(pullback((ctx, w)))
    assert ctx.dtype == w.dtype == xp.float32
    assert all(g.dtype == xp.float32 for g in grads)
    # and it agrees with the float64 computation to float32 accuracy
    params64 = refattn._tree.map_leaves(lambda a: xp.astype(a, xp.float64), params)
    ctx64, _ = op(params64, xp.astype(query, xp.float64), xp.astype(keys, xp.float64), **options)
    assert rel_err(to_numpy(ctx), to_numpy(ctx64)) < 1e-5


# ----------------------------------------------------------------------------- init


def test_init_additive_attention(xp):
    params = init_additive_attention(6, 4, 8, bias=True, seed=3, xp=xp, dtype="float32")
    again = init_additive_attention(6, 4, 8, bias=True, seed=3, xp=xp, dtype="float32")
    other = init_additive_attention(6, 4, 8, bias=True, seed=4, xp=xp, dtype="float32")
    shapes = {
        ("W_h", "weight"): (6, 8),
        ("W_h", "bias"): (8,),
        ("W_s", "weight"): (4, 8),
        ("W_s", "bias"): (8,),
        ("v", "weight"): (8, 1),
    }
    d_in = {"W_h": 6, "W_s": 4, "v": 8}
    for (layer, kind), shape in shapes.items():
        a = params[layer][kind]
        assert tuple(a.shape) == shape and a.dtype == xp.float32
        np.testing.assert_array_equal(to_numpy(a), to_numpy(again[layer][kind]))
        assert not np.array_equal(to_numpy(a), to_numpy(other[layer][kind]))
        assert np.max(np.abs(to_numpy(a))) <= 1.0 / math.sqrt(d_in[layer])  # nn.Linear bound
    assert "bias" not in params["v"]
    assert "bias" not in init_additive_attention(3)["W_h"]  # the seed module has no biases


def test_init_multiplicative_attention(xp):
    assert init_multiplicative_attention(4, method="dot", xp=xp) == {}
    general = init_multiplicative_attention(4, 3, method="general", xp=xp)
    assert tuple(general["W"]["weight"].shape) == (3, 4) and "bias" not in general["W"]
    concat = init_multiplicative_attention(4, 3, method="concat", d_attn=5, seed=2, xp=xp)
    assert tuple(concat["W"]["weight"].shape) == (7, 5)
    assert tuple(concat["W"]["bias"].shape) == (5,)  # nn.Linear(2 * hidden, hidden): bias
    assert tuple(concat["v"]["weight"].shape) == (5, 1) and "bias" not in concat["v"]
    bound = 1.0 / math.sqrt(7)
    weight = to_numpy(concat["W"]["weight"])
    assert np.max(np.abs(weight)) <= bound and np.max(np.abs(weight)) > 0.5 * bound
    forced = init_multiplicative_attention(4, method="general", bias=True, xp=xp)
    assert "bias" in forced["W"]


# ----------------------------------------------------------------------------- errors


def test_bad_method(xp):
    params, _, query, keys = _setup(xp, "general")
    with pytest.raises(ValueError, match=r"method must be one of \['dot', 'general', 'concat'\]"):
        multiplicative_attention(params, query, keys, method="bilinear")
    with pytest.raises(ValueError, match="method must be one of"):
        init_multiplicative_attention(4, method="additive")


@pytest.mark.parametrize(
    ("kind", "edit", "error", "match"),
    [
        ("additive", lambda p: p.pop("W_s"), ValueError, "missing parameter 'W_s'"),
        (
            "additive",
            lambda p: p["W_h"].pop("weight"),
            ValueError,
            "missing parameter 'W_h.weight'",
        ),
        ("additive", lambda p: p["v"].pop("weight"), ValueError, "missing parameter 'v.weight'"),
        (
            "additive",
            lambda p: p.update(extra={}),
            ValueError,
            r"unexpected parameter\(s\) \['extra'\]",
        ),
        ("general", lambda p: p.pop("W"), ValueError, "missing parameter 'W'"),
        ("concat", lambda p: p.pop("v"), ValueError, "missing parameter 'v'"),
        ("dot", lambda p: p.update(W={}), ValueError, "method='dot' .*no parameters"),
    ],
)
def test_missing_or_extra_params(xp, kind, edit, error, match):
    params, options, query, keys = _setup(xp, kind)
    edit(params)
    op = additive_attention if kind == "additive" else multiplicative_attention
    with pytest.raises(error, match=match):
        op(params, query, keys, **options)


def test_misshaped_params(xp):
    params, _, query, keys = _setup(xp, "additive")
    params["W_s"]["weight"] = randn(xp, (5, 6), seed=0)  # d_q is 3
    with pytest.raises(ValueError, match=r"'W_s.weight' must have shape \(3, 6\)"):
        additive_attention(params, query, keys)
    params, _, query, keys = _setup(xp, "additive")
    params["v"]["bias"] = randn(xp, (1,), seed=0)
    with pytest.raises(ValueError, match=r"'v\.bias' is not allowed"):
        additive_attention(params, query, keys)
    params, options, query, keys = _setup(xp, "concat")
    params["W"]["weight"] = randn(xp, (4, 4), seed=0)  # needs d_h + d_q = 7 rows
    with pytest.raises(ValueError, match=r"'W.weight' must have shape \(7, ·\)"):
        multiplicative_attention(params, query, keys, **options)
    params, options, query, keys = _setup(xp, "general")
    params["W"]["weight"] = xp.astype(params["W"]["weight"], xp.float32)
    with pytest.raises(TypeError, match=r"'W\.weight' must have the inputs' dtype"):
        multiplicative_attention(params, query, keys, **options)


@pytest.mark.parametrize(
    ("query_shape", "keys_shape", "mask", "error", "match"),
    [
        ((2, 3), (3, 5, 4), None, ValueError, "the same batch"),
        ((2, 3, 1), (2, 5, 4), None, ValueError, r"expected query \(batch, d_q\)"),
        ((2, 3), (2, 4), None, ValueError, r"keys \(batch, n, d_h\)"),
        ((2, 3), (2, 5, 4), np.ones((2, 5), dtype=np.int64), TypeError, "must be boolean"),
        ((2, 3), (2, 5, 4), np.ones((2, 4), dtype=bool), ValueError, "does not broadcast"),
    ],
)
def test_bad_input_shapes(xp, query_shape, keys_shape, mask, error, match):
    params = init_additive_attention(4, 3, xp=xp)
    query, keys = randn(xp, query_shape, seed=0), randn(xp, keys_shape, seed=1)
    with pytest.raises(error, match=match):
        additive_attention(params, query, keys, mask=None if mask is None else xp.asarray(mask))


def test_dot_needs_equal_widths(xp):
    query, keys = randn(xp, (2, 3), seed=0), randn(xp, (2, 5, 4), seed=1)
    with pytest.raises(ValueError, match="method='dot' needs d_q == d_h"):
        multiplicative_attention({}, query, keys, method="dot")


# ----------------------------------------------------------------------------- Luong local


def _local_setup(xp, method="general", local="m", n=11, batch=3, seed=5):
    d_q = 4 if method == "dot" else 3
    params = init_multiplicative_attention(4, d_q, method=method, local=local, seed=seed, xp=xp)
    query = randn(xp, (batch, d_q), seed=seed + 1)
    return params, query, randn(xp, (batch, n, 4), seed=seed + 2)


@pytest.mark.parametrize("method", ["dot", "general", "concat"])
def test_local_m_is_global_attention_under_the_window_mask(xp, method):
    """local-m is the global softmax restricted to |j - p| <= D: the same as masking by hand,
    for outputs and every gradient, and a window wider than the sequence changes nothing."""
    params, query, keys = _local_setup(xp, method, "m")
    position, window = np.array([0, 5, 13]), 2  # the last window lies partly past the end
    by_hand = xp.asarray(np.abs(np.arange(11) - position[:, None]) <= window)
    options = {"method": method}
    cot = (randn(xp, (3, 4), seed=20), randn(xp, (3, 11), seed=21))
    out_l, pb_l = refattn.vjp(
        multiplicative_attention, params, query, keys, local="m", window=window,
        position=xp.asarray(position), **options,
    )  # fmt: skip
    out_g, pb_g = refattn.vjp(
        multiplicative_attention, params, query, keys, mask=by_hand, **options
    )
    for a, b in zip(
        refattn._tree.leaves((out_l, pb_l(cot))),
        refattn._tree.leaves((out_g, pb_g(cot))),
        strict=True,
    ):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b))
    assert np.all(to_numpy(out_l[1])[~to_numpy(by_hand)] == 0.0)
    wide = multiplicative_attention(
        params, query, keys, local="m", window=11, position=5, **options
    )
    plain = multiplicative_attention(params, query, keys, **options)
    np.testing.assert_allclose(to_numpy(wide[1]), to_numpy(plain[1]), rtol=1e-15, atol=0)


def test_local_p_weights_are_window_softmax_times_gaussian(xp):
    """The weights over the window, divided by the Gaussian, are a softmax of the scores (sum 1,
    ratios exp(e_i - e_j)); outside the window they are exactly 0; the Gaussian is centred on
    p = S sigmoid(v_p^T tanh(W_p s)) computed here from the parameters in NumPy."""
    params, query, keys = _local_setup(xp, "dot", "p")
    window, lengths = 3, np.array([11, 7, 4])
    _, weights = multiplicative_attention(
        params, query, keys, local="p", window=window, source_length=xp.asarray(lengths)
    )
    w, s, h = to_numpy(weights), to_numpy(query), to_numpy(keys)
    wp, vp = to_numpy(params["W_p"]["weight"]), to_numpy(params["v_p"]["weight"])
    p = lengths / (1.0 + np.exp(-(np.tanh(s @ wp) @ vp)[:, 0]))
    j = np.arange(11)
    inside = np.abs(j - p[:, None]) <= window
    gauss = np.exp(-((j - p[:, None]) ** 2) / (2 * (window / 2) ** 2))
    e = np.einsum("bnd,bd->bn", h, s)
    assert np.all(w[~inside] == 0.0) and np.all(inside.any(axis=1))
    for b in range(3):
        a = w[b, inside[b]] / gauss[b, inside[b]]
        want = np.exp(e[b, inside[b]] - e[b, inside[b]].max())
        np.testing.assert_allclose(a, want / want.sum(), rtol=1e-13)


def test_local_empty_window_is_a_fully_masked_row(xp):
    """A window that misses the sequence (or meets only masked keys) keeps nothing: zero
    weights, zero context and zero gradients for that row, the others untouched."""
    params, query, keys = _local_setup(xp, "general", "m")
    position = xp.asarray(np.array([3, -9, 5]))
    (ctx, w), pullback = refattn.vjp(
        multiplicative_attention, params, query, keys, method="general", local="m", window=2,
        position=position,
    )  # fmt: skip
    assert np.all(to_numpy(w)[1] == 0.0) and np.all(to_numpy(ctx)[1] == 0.0)
    _, d_query, d_keys = pullback((xp.ones_like(ctx), xp.ones_like(w)))
    assert np.all(to_numpy(d_query)[1] == 0.0) and np.all(to_numpy(d_keys)[1] == 0.0)
    assert np.all(to_numpy(d_query)[[0, 2]] != 0.0)


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"local": "q", "window": 2}, ValueError, "local must be None, 'm' or 'p'"),
        ({"local": "m", "position": 1}, ValueError, "needs window D"),
        ({"local": "m", "window": -1, "position": 1}, ValueError, "an int >= 0"),
        ({"local": "p", "window": 0}, ValueError, "an int >= 1"),
        ({"local": "m", "window": 2}, ValueError, "local='m' needs position"),
        ({"local": "m", "window": 2, "position": 1.5}, TypeError, "position must be an int"),
        ({"local": "m", "window": 2, "position": np.arange(4)}, ValueError, "position of shape"),
        ({"local": "p", "window": 2, "position": 3}, ValueError, "position must be None"),
        ({"local": "p", "window": 2, "source_length": 0}, ValueError, "source_length must be"),
        ({"window": 2}, ValueError, "window is given but local is None"),
        ({"local": "m", "window": 2, "position": 1, "source_length": 4}, ValueError, "not 'p'"),
    ],
)
def test_local_bad_options(options, error, match):
    params, query, keys = _local_setup(np, "general", "p")
    if options.get("local") != "p":
        params = {"W": params["W"]}
    with pytest.raises(error, match=match):
        multiplicative_attention(params, query, keys, method="general", **options)


def test_local_p_parameters_are_required_and_checked():
    params, query, keys = _local_setup(np, "general", "p")
    with pytest.raises(ValueError, match="'v_p' is missing"):
        multiplicative_attention(
            {"W": params["W"], "W_p": params["W_p"]}, query, keys, method="general",
            local="p", window=2,
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"unexpected parameter\(s\) \['W_p', 'v_p'\]"):
        multiplicative_attention(params, query, keys, method="general")
    bad = dict(params, v_p={"weight": np.ones((4, 2))})
    with pytest.raises(ValueError, match=r"v_p\.weight"):
        multiplicative_attention(bad, query, keys, method="general", local="p", window=2)
