"""sparsemax and α-entmax: properties, the public ``entmax`` package, gradients for x and α.

The package comparisons skip cleanly when ``entmax`` (PyPI, torch-based) is not installed.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from conftest import randn, rel_err, to_numpy
from hypothesis import given, settings
from hypothesis import strategies as st

import refattn
from refattn.ops.entmax import normalize_backward, normalize_forward

# ----------------------------------------------------------------------------- helpers


def _alpha_array(xp, values, shape, dtype="float64"):
    dtype = getattr(xp, dtype) if isinstance(dtype, str) else dtype
    host = np.broadcast_to(np.asarray(values, dtype=np.float64), shape).copy()
    return xp.asarray(host, dtype=dtype)


def _call(xp, kind, x, **kw):
    """``p`` for a normaliser kind: sparsemax, entmax with a float α, entmax with array α."""
    if kind == "sparsemax":
        return refattn.sparsemax(x, **kw)
    if isinstance(kind, float):
        return refattn.entmax(x, kind, **kw)
    lead = (*x.shape[:-1], 1)
    return refattn.entmax(x, _alpha_array(xp, kind[0], lead, x.dtype), **kw)


KINDS = ["sparsemax", 1.5, 1.25, 1.0, 2.0, (1.7,), (1.001,)]
KIND_IDS = ["sparsemax", "a1.5", "a1.25", "a1", "a2", "array1.7", "array1.001"]


def _kkt_residual(x, p, alpha):
    """Max violation of entmax's optimality conditions, from the output alone (host float64).

    On the support ``x_j − (p_j^ε − 1)/ε`` is one constant ``c`` per slice (``x_j − log p_j`` at
    ε = 0); off it ``x_j ≤ c − 1/ε``. Returns the spread of ``c`` over the support and the
    largest excess of an off-support entry, both relative to ``1 + max|x|``.
    """
    x = np.asarray(x, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    eps = alpha - 1.0
    on = p > 0
    with np.errstate(divide="ignore"):
        c = np.where(
            on,
            x
            - (
                np.log(np.where(on, p, 1.0))
                if eps == 0
                else np.expm1(eps * np.log(np.where(on, p, 1.0))) / eps
            ),
            np.nan,
        )
    spread = np.nanmax(c, -1) - np.nanmin(c, -1)
    excess = 0.0
    if eps > 0:
        bound = np.nanmean(c, -1, keepdims=True) - 1.0 / eps
        excess = float(np.max(np.where(on, -np.inf, x - bound)))
    return float(np.max(spread)) / (1 + np.max(np.abs(x))), excess / (1 + np.max(np.abs(x)))


# ----------------------------------------------------------------------------- properties


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
def test_outputs_are_on_the_simplex_and_optimal(xp, kind, dtype):
    x = randn(xp, (6, 9), seed=1, dtype=dtype) * 3.0
    p = _call(xp, kind, x)
    assert p.dtype == x.dtype and tuple(p.shape) == (6, 9)
    assert type(p) is type(x)
    host = to_numpy(p).astype(np.float64)
    tol = 20 * np.finfo(dtype).eps
    assert np.all(host >= 0.0)
    np.testing.assert_allclose(host.sum(-1), 1.0, rtol=0, atol=tol)
    alpha = 2.0 if kind == "sparsemax" else kind if isinstance(kind, float) else kind[0]
    if alpha > 1.2:
        assert np.any(host == 0.0), "α ≥ 1.2 at this scale must give exact zeros"
    spread, excess = _kkt_residual(to_numpy(x), host, alpha)
    assert spread <= 50 * tol and excess <= tol


def test_sparsemax_zeros_are_exact_and_entries_below_threshold():
    x = np.array([[3.0, 2.5, 0.1, -1.0], [0.0, 0.0, 0.0, 0.0]])
    p = refattn.sparsemax(x)
    # τ = (3 + 2.5 − 1)/2 = 2.25: p = (0.75, 0.25, 0, 0); a constant row is uniform
    np.testing.assert_array_equal(p[0], [0.75, 0.25, 0.0, 0.0])
    np.testing.assert_array_equal(p[1], [0.25] * 4)
    # 1.5-entmax of x = (1, 0): z = (x − max)/2 = (0, −1/2), both in the support, and τ solves
    # (−τ)² + (−1/2 − τ)² = 1 → τ = (−1/2 − sqrt(7/4))/2
    p15 = refattn.entmax(np.array([1.0, 0.0]), 1.5)
    tau = (-0.5 - math.sqrt(1.75)) / 2
    np.testing.assert_allclose(p15, [tau**2, (-0.5 - tau) ** 2], rtol=1e-15)


@pytest.mark.parametrize("alpha", [2.0, 1.5])
def test_sort_based_agrees_with_bisection(xp, alpha):
    x = randn(xp, (5, 3, 40), seed=2) * 2.0
    exact = refattn.entmax(x, alpha)
    bisected = refattn.entmax(x, _alpha_array(xp, alpha, (5, 3, 1)))
    assert rel_err(bisected, exact) <= 4e-16 * 40
    assert np.array_equal(to_numpy(exact) == 0, to_numpy(bisected) == 0)
    if alpha == 2.0:
        assert rel_err(refattn.sparsemax(x), exact) == 0.0


def test_alpha_to_one_approaches_softmax(xp):
    x = randn(xp, (4, 12), seed=3)
    s = refattn.softmax(x)
    assert rel_err(refattn.entmax(x, 1.0), s) == 0.0
    assert rel_err(refattn.entmax(x, _alpha_array(xp, 1.0, (4, 1))), s) <= 1e-15
    errs = [rel_err(refattn.entmax(x, 1.0 + d), s) for d in (1e-2, 1e-3, 1e-4)]
    # first order in α − 1: each tenfold step towards 1 divides the distance by ~10
    for big, small in itertools.pairwise(errs):
        assert 8.0 < big / small < 12.0


def test_bisection_converges_to_rounding_near_one_against_mpmath():
    """α = 1.001 and 1.3 in float64 against a 40-digit solution, to a few ulps."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 40
    rng = np.random.default_rng(4)
    x = rng.standard_normal(7) * 2.0
    for alpha in (1.001, 1.3):
        ref = _mp_entmax(mpmath, x, alpha)
        got = refattn.entmax(x, alpha)
        on = ref > 0
        assert np.array_equal(got > 0, on) and np.all(got[~on] == 0.0)
        assert np.max(np.abs(got[on] - ref[on]) / ref[on]) <= 8e-16


def _mp_entmax(mpmath, x, alpha):
    eps = mpmath.mpf(alpha) - 1
    xs = [mpmath.mpf(float(v)) for v in x]
    m = max(xs)

    def total(s):
        return sum(max(1 + eps * (v - m - s), 0) ** (1 / eps) for v in xs) - 1

    s = mpmath.findroot(total, (mpmath.mpf(0), mpmath.log(len(xs)) * 2), solver="anderson")
    return np.array([float(max(1 + eps * (v - m - s), 0) ** (1 / eps)) for v in xs])


# ----------------------------------------------------------------------------- masks


@pytest.mark.parametrize("kind", ["sparsemax", 1.5, 1.3, 1.0, (1.6,), (1.0,)], ids=str)
def test_masked_entries_are_zero_and_match_the_kept_subvector(xp, kind):
    x = randn(xp, (4, 10), seed=5)
    keep = np.ones((4, 10), dtype=bool)
    keep[:, 6:] = False
    keep[2, :] = False  # a fully masked row
    mask = xp.asarray(keep)
    p = _call(xp, kind, x, mask=mask)
    host = to_numpy(p)
    assert np.all(host[~keep] == 0.0) and np.all(host[2] == 0.0)
    sub = to_numpy(_call(xp, kind, x[:, :6]))
    np.testing.assert_allclose(host[[0, 1, 3], :6], sub[[0, 1, 3]], rtol=1e-14, atol=1e-17)
    # -inf entries are masked too
    minus_inf = xp.where(mask, x, -math.inf)
    np.testing.assert_array_equal(to_numpy(_call(xp, kind, minus_inf))[[0, 1, 3]], host[[0, 1, 3]])
    # gradients: 0 at masked entries and for the fully masked row, no NaN
    op, primals = _op_and_primals(xp, kind, x)
    _, pullback = refattn.vjp(op, *primals, mask=mask)
    grads = pullback(randn(xp, (4, 10), seed=6))
    dx = to_numpy(grads[0])
    assert np.all(np.isfinite(dx)) and np.all(dx[~keep] == 0.0) and np.all(dx[2] == 0.0)
    if len(grads) == 2:
        assert np.isfinite(to_numpy(grads[1])).all() and to_numpy(grads[1])[2, 0] == 0.0


def _op_and_primals(xp, kind, x):
    if kind == "sparsemax":
        return refattn.sparsemax, (x,)
    if isinstance(kind, float):
        return _Bound(kind), (x,)
    return refattn.entmax, (x, _alpha_array(xp, kind[0], (*x.shape[:-1], 1)))


def _Bound(alpha):  # an Op with α bound as an option
    return refattn.Op(
        lambda x, **kw: refattn.entmax.forward(x, alpha=alpha, **kw),
        lambda res, dy, **kw: refattn.entmax.backward(res, dy, alpha=alpha, **kw),
        name=f"entmax_{alpha}",
    )


def test_empty_axis():
    x = np.zeros((3, 0))
    assert refattn.entmax(x, 1.3).shape == (3, 0)
    assert refattn.sparsemax(x).shape == (3, 0)


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("alpha", [1.0, 1.25, 1.5, 1.8, 2.0])
def test_gradcheck_x(alpha):
    x = np.random.default_rng(7).standard_normal((3, 8)) * 2.0
    assert refattn.gradcheck(refattn.entmax, x, alpha=alpha)
    mask = np.random.default_rng(8).random((3, 8)) > 0.3
    mask[1] = False
    assert refattn.gradcheck(refattn.entmax, x, alpha=alpha, mask=mask)


def test_gradcheck_sparsemax_axis0_and_mask():
    x = np.random.default_rng(9).standard_normal((7, 4))
    assert refattn.gradcheck(refattn.sparsemax, x, axis=0)
    assert refattn.gradcheck(refattn.sparsemax, x, mask=x > -0.5)


def test_gradcheck_x_and_alpha_per_head():
    """One α per head, (H, 1, 1) against (B, H, n_q, n_k), near both ends of [1, 2]."""
    rng = np.random.default_rng(10)
    x = rng.standard_normal((2, 4, 3, 6)) * 2.0
    alpha = np.array([1.00001, 1.2, 1.6, 1.9999]).reshape(4, 1, 1)
    assert refattn.gradcheck(refattn.entmax, x, alpha)
    alpha_per_row = 1.1 + 0.8 * rng.random((2, 4, 3, 1))
    assert refattn.gradcheck(refattn.entmax, x, alpha_per_row, axis=-1)
    assert refattn.gradcheck(refattn.entmax, x, np.asarray(1.4), axis=1)


def test_alpha_gradient_at_one_is_the_softmax_limit():
    """∂p/∂α at α = 1 is −½ p (L² − Σ p L²), L = log p; compare with a one-sided difference."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((3, 5))
    dp = rng.standard_normal((3, 5))
    _, pullback = refattn.vjp(refattn.entmax, x, np.ones((3, 1)))
    _, dalpha = pullback(dp)
    p = refattn.softmax(x)
    L = np.log(p)
    limit = np.sum(dp * (-0.5 * p * (L**2 - np.sum(p * L**2, -1, keepdims=True))), -1)
    np.testing.assert_allclose(dalpha[:, 0], limit, rtol=1e-13)
    h = 1e-5
    f = [np.sum(dp * refattn.entmax(x, np.full((3, 1), 1.0 + k * h)), -1) for k in range(3)]
    np.testing.assert_allclose(dalpha[:, 0], (-3 * f[0] + 4 * f[1] - f[2]) / (2 * h), rtol=1e-7)


def test_alpha_gradient_against_mpmath_near_one():
    """At α = 1.001 the α gradient is accurate to rounding (the package's loses ~1e-10)."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 40
    rng = np.random.default_rng(12)
    x = rng.standard_normal(6)
    dp = rng.standard_normal(6)
    alpha = 1.001
    _, pullback = refattn.vjp(refattn.entmax, x, np.asarray(alpha))
    _, dalpha = pullback(dp)

    def loss(a):
        eps = a - 1
        xs = [mpmath.mpf(float(v)) for v in x]
        m = max(xs)

        def total(s):
            return sum(max(1 + eps * (v - m - s), 0) ** (1 / eps) for v in xs) - 1

        s = mpmath.findroot(total, mpmath.mpf("0.5"))
        return sum(
            float(d) * max(1 + eps * (v - m - s), 0) ** (1 / eps)
            for d, v in zip(dp, xs, strict=True)
        )

    ref = float(mpmath.diff(loss, mpmath.mpf(alpha)))
    assert abs(float(dalpha) - ref) <= 1e-14 * abs(ref)


def test_gradients_on_every_backend(xp):
    x = randn(xp, (3, 7), seed=13)
    alpha = _alpha_array(xp, [[1.3], [1.6], [2.0]], (3, 1))
    dp = randn(xp, (3, 7), seed=14)
    _, pullback = refattn.vjp(refattn.entmax, x, alpha)
    dx, da = pullback(dp)
    _, pb_np = refattn.vjp(refattn.entmax, to_numpy(x), to_numpy(alpha))
    dx_np, da_np = pb_np(to_numpy(dp))
    assert type(dx) is type(x) and type(da) is type(x) and tuple(da.shape) == (3, 1)
    assert rel_err(dx, dx_np) <= 1e-15 and rel_err(da, da_np) <= 1e-15
    # invariances: a constant cotangent has no effect (outputs sum to 1)
    ones = xp.ones_like(dp)
    dx1, da1 = pullback(ones)
    assert float(xp.max(xp.abs(dx1))) <= 1e-15 and float(xp.max(xp.abs(da1))) <= 1e-14


def test_float32_in_float32_out_gradients(xp):
    x = randn(xp, (4, 9), seed=15, dtype="float32")
    alpha = _alpha_array(xp, 1.4, (4, 1), "float32")
    out, pullback = refattn.vjp(refattn.entmax, x, alpha)
    dx, da = pullback(randn(xp, (4, 9), seed=16, dtype="float32"))
    assert out.dtype == dx.dtype == da.dtype == xp.float32
    out64, pb64 = refattn.vjp(
        refattn.entmax, xp.astype(x, xp.float64), xp.astype(alpha, xp.float64)
    )
    dx64, da64 = pb64(xp.astype(randn(xp, (4, 9), seed=16, dtype="float32"), xp.float64))
    assert rel_err(out, out64) <= 1e-5 and rel_err(dx, dx64) <= 1e-4 and rel_err(da, da64) <= 1e-4


# ----------------------------------------------------------------------------- the entmax package


def _pkg():
    entmax_pkg = pytest.importorskip("entmax")
    torch = pytest.importorskip("torch")
    return entmax_pkg, torch


def _pkg_fn(entmax_pkg, kind, torch):
    if kind == "sparsemax":
        return lambda t, dim: entmax_pkg.sparsemax(t, dim=dim)
    if kind == "entmax15":
        return lambda t, dim: entmax_pkg.entmax15(t, dim=dim)
    return lambda t, dim: entmax_pkg.entmax_bisect(t, kind, dim=dim, n_iter=100)


@pytest.mark.parametrize("kind", ["sparsemax", "entmax15", 1.25, 1.5, 1.75, 2.0], ids=str)
@pytest.mark.parametrize("axis", [-1, 0])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_entmax_package(kind, axis, masked):
    entmax_pkg, torch = _pkg()
    rng = np.random.default_rng(17)
    x = rng.standard_normal((6, 8, 5)) * 2.0
    keep = rng.random(x.shape) > 0.25 if masked else np.ones(x.shape, dtype=bool)
    keep[(slice(None),) * (axis % 3) + (0,)] = True  # the package has no fully masked rows
    dp = rng.standard_normal(x.shape)
    tx = torch.from_numpy(x).requires_grad_(True)
    y = _pkg_fn(entmax_pkg, kind, torch)(torch.where(torch.from_numpy(keep), tx, -math.inf), axis)
    (gx,) = torch.autograd.grad(y, tx, torch.from_numpy(dp))
    alpha = {"sparsemax": 2.0, "entmax15": 1.5}.get(kind, kind)
    op = refattn.sparsemax if kind == "sparsemax" else _Bound(alpha)
    out, pullback = refattn.vjp(op, x, axis=axis, mask=keep if masked else None)
    (dx,) = pullback(dp)
    assert rel_err(out, y.detach().numpy()) <= 1e-12
    assert rel_err(dx, gx.numpy()) <= 1e-12
    assert np.array_equal(out == 0, y.detach().numpy() == 0)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 24),
    scale=st.sampled_from([0.01, 1.0, 30.0, 1e3]),
    seed=st.integers(0, 2**32 - 1),
)
def test_ties_and_scales_match_entmax_package(n, scale, seed):
    """Inputs on an integer grid (many ties, ties at the threshold) over six decades of scale."""
    entmax_pkg, torch = _pkg()
    x = np.random.default_rng(seed).integers(-3, 4, size=(4, n)) * scale
    t = torch.from_numpy(x)
    for mine, theirs in (
        (refattn.sparsemax(x), entmax_pkg.sparsemax(t, dim=-1)),
        (refattn.entmax(x, 1.5), entmax_pkg.entmax15(t, dim=-1)),
        (refattn.entmax(x, 1.3), entmax_pkg.entmax_bisect(t, 1.3, dim=-1, n_iter=200)),
    ):
        np.testing.assert_allclose(mine.sum(-1), 1.0, rtol=0, atol=1e-14)
        np.testing.assert_allclose(mine, theirs.numpy(), rtol=0, atol=1e-14)


@pytest.mark.parametrize("alpha_shape", [(6, 1, 1), (1, 8, 1), ()], ids=str)
def test_alpha_gradient_matches_entmax_bisect(alpha_shape):
    entmax_pkg, torch = _pkg()
    rng = np.random.default_rng(18)
    x = rng.standard_normal((6, 8, 5)) * 2.0
    alpha = 1.15 + 0.8 * rng.random(alpha_shape)
    dp = rng.standard_normal(x.shape)
    tx = torch.from_numpy(x).requires_grad_(True)
    ta = torch.from_numpy(np.array(alpha)).requires_grad_(True)
    y = entmax_pkg.entmax_bisect(tx, ta, dim=-1, n_iter=100)
    gx, ga = torch.autograd.grad(y, (tx, ta), torch.from_numpy(dp))
    out, pullback = refattn.vjp(refattn.entmax, x, np.asarray(alpha))
    dx, dalpha = pullback(dp)
    assert dalpha.shape == alpha_shape
    assert rel_err(out, y.detach().numpy()) <= 1e-12
    assert rel_err(dx, gx.numpy()) <= 1e-12
    assert rel_err(dalpha, ga.numpy()) <= 1e-12


def test_float32_error_within_twice_the_package():
    """The project's low-precision rule: float32 error vs float64 ≤ 2× the package's float32."""
    entmax_pkg, torch = _pkg()
    x64 = np.random.default_rng(19).standard_normal((64, 50)) * 3.0
    x32 = x64.astype(np.float32)
    ref = refattn.entmax(x32.astype(np.float64), 1.3)
    pkg = entmax_pkg.entmax_bisect(torch.from_numpy(x32), 1.3, dim=-1).numpy()
    ours = refattn.entmax(x32, 1.3)
    assert ours.dtype == np.float32
    assert np.max(np.abs(ours - ref)) <= 2 * np.max(np.abs(pkg - ref))
    for kind, alpha in (("sparsemax", 2.0), ("entmax15", 1.5)):
        pkg = _pkg_fn(entmax_pkg, kind, torch)(torch.from_numpy(x32), -1).numpy()
        ref = refattn.entmax(x32.astype(np.float64), alpha)
        err = np.max(np.abs(refattn.entmax(x32, alpha) - ref))
        assert err <= 2 * max(np.max(np.abs(pkg - ref)), np.finfo(np.float32).eps)


# ----------------------------------------------------------------------------- SDPA interface


@pytest.mark.parametrize("normalizer", ["softmax", "sparsemax", "entmax15", "entmax_per_head"])
def test_attention_from_the_normaliser_interface_matches_torch(normalizer):
    """weights = normalizer(scale·QKᵀ, causal mask), out = weights·V, backward chained by hand."""
    entmax_pkg, torch = _pkg()
    rng = np.random.default_rng(20)
    b, h, n, d = 2, 3, 6, 4
    q, k, v = (rng.standard_normal((b, h, n, d)) * 1.5 for _ in range(3))
    d_out = rng.standard_normal((b, h, n, d))
    scale = 1.0 / math.sqrt(d)
    causal = np.tril(np.ones((n, n), dtype=bool))
    name, alpha = {
        "softmax": ("softmax", None),
        "sparsemax": ("sparsemax", None),
        "entmax15": ("entmax", 1.5),
        "entmax_per_head": ("entmax", np.array([1.2, 1.5, 1.8]).reshape(h, 1, 1)),
    }[normalizer]

    scores = scale * (q @ np.swapaxes(k, -1, -2))
    weights, res = normalize_forward(scores, normalizer=name, alpha=alpha, mask=causal)
    out = weights @ v
    d_weights = d_out @ np.swapaxes(v, -1, -2)
    dv = np.swapaxes(weights, -1, -2) @ d_out
    d_scores, dalpha = normalize_backward(res, d_weights)
    dq = scale * (d_scores @ k)
    dk = scale * (np.swapaxes(d_scores, -1, -2) @ q)

    tq, tk, tv = (torch.from_numpy(a).requires_grad_(True) for a in (q, k, v))
    t_scores = torch.where(torch.from_numpy(causal), scale * tq @ tk.transpose(-1, -2), -math.inf)
    leaves = [tq, tk, tv]
    if normalizer == "softmax":
        t_w = torch.softmax(t_scores, -1)
    elif normalizer == "sparsemax":
        t_w = entmax_pkg.sparsemax(t_scores, dim=-1)
    elif normalizer == "entmax15":
        t_w = entmax_pkg.entmax15(t_scores, dim=-1)
    else:
        ta = torch.from_numpy(alpha.copy()).requires_grad_(True)
        leaves.append(ta)
        t_w = entmax_pkg.entmax_bisect(t_scores, ta, dim=-1, n_iter=100)
    t_out = t_w @ tv
    grads = torch.autograd.grad(t_out, leaves, torch.from_numpy(d_out))
    assert rel_err(out, t_out.detach().numpy()) <= 1e-12
    for mine, theirs in zip((dq, dk, dv), grads[:3], strict=True):
        assert rel_err(mine, theirs.numpy()) <= 1e-12
    if normalizer == "entmax_per_head":
        assert dalpha.shape == (h, 1, 1) and rel_err(dalpha, grads[3].numpy()) <= 1e-12
    else:
        assert dalpha is None
    if normalizer == "softmax":  # and the interface's softmax is refattn's SDPA's
        ref = refattn.scaled_dot_product_attention(q, k, v, is_causal=True)
        assert rel_err(out, ref) <= 1e-14


def test_normaliser_interface_fully_masked_rows_and_errors():
    scores = np.random.default_rng(21).standard_normal((2, 4, 5))
    mask = np.ones((4, 5), dtype=bool)
    mask[1] = False
    for name, alpha in (("softmax", None), ("sparsemax", None), ("entmax", 1.3)):
        w, res = normalize_forward(scores, normalizer=name, alpha=alpha, mask=mask)
        ds, _ = normalize_backward(res, np.ones_like(w))
        assert np.all(w[:, 1] == 0.0) and np.all(ds[:, 1] == 0.0)
        np.testing.assert_allclose(w[:, [0, 2, 3]].sum(-1), 1.0, rtol=1e-15)
    with pytest.raises(ValueError, match="normalizer must be one of"):
        normalize_forward(scores, normalizer="relu")
    with pytest.raises(ValueError, match="alpha is for normalizer='entmax' only"):
        normalize_forward(scores, normalizer="softmax", alpha=1.5)


# ----------------------------------------------------------------------------- bad input


def test_bad_input_errors(xp):
    x = randn(xp, (3, 4), seed=22)
    with pytest.raises(ValueError, match=r"alpha must lie in \[1, 2\], got 2.5"):
        refattn.entmax(x, 2.5)
    with pytest.raises(ValueError, match=r"alpha must lie in \[1, 2\], got 0.5"):
        refattn.entmax(x, alpha=0.5)
    with pytest.raises(ValueError, match=r"every alpha must lie in \[1, 2\]"):
        refattn.entmax(x, _alpha_array(xp, [[1.5], [0.9], [1.2]], (3, 1)))
    with pytest.raises(ValueError, match=r"alpha \(size 1 along axis\) of shape \(3, 4\)"):
        refattn.entmax(x, _alpha_array(xp, 1.5, (3, 4)))
    with pytest.raises(ValueError, match="more dimensions than x"):
        refattn.entmax(x, _alpha_array(xp, 1.5, (2, 3, 1)))
    with pytest.raises(TypeError, match="alpha must have a real floating dtype"):
        refattn.entmax(x, xp.asarray([[1], [2], [1]]))
    with pytest.raises(TypeError, match="alpha must be a float or a real floating array"):
        refattn.entmax(x, "1.5")
    with pytest.raises(TypeError, match="x must have a real floating dtype"):
        refattn.sparsemax(xp.asarray([[1, 2, 3]]))
    with pytest.raises(TypeError, match="x must have a real floating dtype"):
        refattn.entmax(xp.asarray([[1, 2, 3]]), 1.5)
    for axis in (2, -3, 1.0, True):
        with pytest.raises(ValueError, match=r"axis .* is out of range"):
            refattn.entmax(x, 1.5, axis=axis)
        with pytest.raises(ValueError, match=r"axis .* is out of range"):
            refattn.sparsemax(x, axis=axis)
    with pytest.raises(TypeError, match="must be boolean"):
        refattn.sparsemax(x, mask=x)
    with pytest.raises(ValueError, match="does not broadcast"):
        refattn.entmax(x, 1.3, mask=xp.ones((4, 4), dtype=xp.bool))


def test_positional_float_alpha_has_no_gradient():
    x = np.random.default_rng(23).standard_normal((2, 5))
    assert np.array_equal(refattn.entmax(x, 1.3), refattn.entmax(x, alpha=1.3))
    _, pullback = refattn.vjp(refattn.entmax, x, 1.3)
    with pytest.raises(TypeError, match="alpha was passed positionally as a Python float"):
        pullback(np.ones((2, 5)))
    # as a keyword, or left at its default, α is an option: one gradient
    for kwargs in ({"alpha": 1.3}, {}):
        _, pullback = refattn.vjp(refattn.entmax, x, **kwargs)
        assert len(pullback(np.ones((2, 5)))) == 1
