"""gradcheck, Op and vjp: the checker must catch subtly wrong backwards and report them well."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import randn

import refattn

_SDPA = refattn.scaled_dot_product_attention
_sdpa_fwd = _SDPA.forward
_sdpa_bwd = _SDPA.apply_backward


def _scaled_backward(factor):
    def backward(res, ct, **options):
        return tuple(g * factor for g in _sdpa_bwd(res, ct, **options))

    return backward


def _qkv(seed=0):
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((2, 3, 2)),
        rng.standard_normal((2, 4, 2)),
        rng.standard_normal((2, 4, 3)),
    )


@pytest.mark.parametrize("relative_error", [1e-3, 1e-5])
@pytest.mark.parametrize("fast", [False, True])
def test_catches_a_backward_wrong_by_a_small_relative_amount(relative_error, fast):
    wrong = refattn.Op(_sdpa_fwd, _scaled_backward(1.0 + relative_error), name="sdpa_scaled")
    with pytest.raises(refattn.GradcheckError) as info:
        refattn.gradcheck(wrong, *_qkv(), fast=fast)
    err = info.value
    assert err.op == "sdpa_scaled"
    assert err.input in ("q", "k", "v")
    assert err.analytical == pytest.approx(err.numerical * (1.0 + relative_error), rel=1e-4)
    # The correct backward passes at the same point with the same defaults.
    right = refattn.Op(_sdpa_fwd, _SDPA.backward, name="sdpa")
    assert refattn.gradcheck(right, *_qkv(), fast=fast)


def test_catches_a_single_wrong_entry_and_names_it():
    def backward(res, ct, **options):
        dq, dk, dv = _sdpa_bwd(res, ct, **options)
        dk = dk.copy()
        dk[1, 2, 0] += 1e-4 * np.abs(dk).max()
        return dq, dk, dv

    wrong = refattn.Op(_sdpa_fwd, backward, name="one_entry")
    with pytest.raises(refattn.GradcheckError) as info:
        refattn.gradcheck(wrong, *_qkv())
    assert info.value.input == "k"
    assert info.value.index == (1, 2, 0)
    message = str(info.value)
    for piece in ("one_entry", "/ d k[1, 2, 0]", "numerical", "analytical"):
        assert piece in message


def test_seed_appendix_formula_fails_while_refattn_passes():
    """Errata: seed 002's dQ uses only the Jacobian's diagonal, A o (1 - A)."""

    def seed_backward(res, ct, **options):
        pb, blocks, o = res.pb, res.blocks, res.o
        q, k, v = pb.q[:, :, 0], pb.k, pb.v  # one query head per kv head here
        p = blocks[0].weights()[:, :, 0]
        d_a = ct[None] @ np.swapaxes(v, -1, -2) if ct.ndim == 2 else ct @ np.swapaxes(v, -1, -2)
        d_a = d_a.reshape(p.shape)
        d_s = d_a * p * (1.0 - p) * pb.scale
        d_q = (d_s @ k).reshape(pb.q_shape)
        # The appendix writes dK = Q^T (dA o A o (1-A)) / sqrt(d): shape (d, n_k), not K's.
        d_k_appendix = np.swapaxes(q, -1, -2) @ d_s
        assert d_k_appendix.shape[-2:] != pb.k.shape[-2:]
        d_k = np.swapaxes(d_s, -1, -2) @ q  # shape-corrected, still diagonal-only
        d_v = np.swapaxes(p, -1, -2) @ ct.reshape(o.shape[:2] + o.shape[3:])
        return d_q, d_k.reshape(pb.k_shape), d_v.reshape(pb.v_shape)

    q, k, v = _qkv(1)
    seed_op = refattn.Op(_sdpa_fwd, seed_backward, name="seed_appendix")
    with pytest.raises(refattn.GradcheckError, match="seed_appendix"):
        refattn.gradcheck(seed_op, q, k, v)
    assert refattn.gradcheck(refattn.scaled_dot_product_attention, q, k, v)


def test_user_op_registration_call_vjp_and_gradcheck(xp):
    def cube_fwd(x, /, *, offset=0.0):
        """y = (x + offset)^3."""
        return (x + offset) ** 3, (x + offset,)

    def cube_bwd(res, dy, /, *, offset=0.0):
        (shifted,) = res
        return (3.0 * shifted**2 * dy,)

    cube = refattn.Op(cube_fwd, cube_bwd, name="cube")
    x = randn(xp, (3, 2), seed=5)
    assert cube.name == "cube" and cube.__doc__ == cube_fwd.__doc__
    out, pull = refattn.vjp(cube, x, offset=0.5)
    (dx,) = pull(xp.ones_like(out))
    np.testing.assert_allclose(np.asarray(dx), 3.0 * (np.asarray(x) + 0.5) ** 2, rtol=1e-14)
    assert refattn.gradcheck(cube, x, offset=0.5)
    assert refattn.gradcheck(cube, x, offset=0.5, fast=True)


def test_parameter_trees_are_checked_leaf_by_leaf():
    def affine_fwd(params, x, /):
        return x @ params["w"] + params["b"], (params, x)

    def affine_bwd(res, dy, /):
        params, x = res
        return {"w": x.T @ dy, "b": dy.sum(0) * 1.001}, dy @ params["w"].T

    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((3, 2)), "b": rng.standard_normal(2)}
    op = refattn.Op(affine_fwd, affine_bwd, name="affine")
    with pytest.raises(refattn.GradcheckError) as info:
        refattn.gradcheck(op, params, rng.standard_normal((4, 3)))
    assert info.value.input == "params.b"


def test_driver_rejects_wrong_number_or_shape_of_gradients():
    bad_count = refattn.Op(lambda x, y: (x + y, None), lambda r, c: (c,), name="bad_count")
    _, pull = refattn.vjp(bad_count, np.ones(2), np.ones(2))
    with pytest.raises(RuntimeError, match="tuple of 2 gradients"):
        pull(np.ones(2))
    bad_shape = refattn.Op(lambda x: (x.sum(), None), lambda r, c: (np.ones(3),), name="bad_shape")
    _, pull = refattn.vjp(bad_shape, np.ones(2))
    with pytest.raises(RuntimeError, match=r"shape \(3,\), its primal \(2,\)"):
        pull(np.asarray(1.0))


def test_gradcheck_input_validation():
    with pytest.raises(TypeError, match=r"must be a refattn\.Op"):
        refattn.gradcheck(lambda x: x, np.ones(2))
    with pytest.raises(TypeError, match="real floating"):
        refattn.gradcheck(refattn.softmax, np.arange(3))


def test_float32_primals_are_checked_in_float64():
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    assert refattn.gradcheck(refattn.softmax, x)


def test_optional_primal_given_as_none():
    def fwd(x, scale_by=None, /):
        y = x * x if scale_by is None else x * x * scale_by
        return y, (x, scale_by)

    def bwd(res, dy, /):
        x, scale_by = res
        if scale_by is None:
            return 2.0 * x * dy, None
        return 2.0 * x * scale_by * dy, x * x * dy

    op = refattn.Op(fwd, bwd, name="optional")
    x = np.linspace(-1.0, 1.0, 4)
    assert refattn.gradcheck(op, x, None)
    assert refattn.gradcheck(op, x, np.full(4, 3.0))
    _, pull = refattn.vjp(op, x, None)
    assert pull(np.ones(4))[1] is None
    liar = refattn.Op(fwd, lambda res, dy: (dy, dy), name="liar")
    _, pull = refattn.vjp(liar, x, None)
    with pytest.raises(RuntimeError, match="None exactly where its primal is None"):
        pull(np.ones(4))


def test_op_options_that_clash_with_gradcheck_keywords():
    rng = np.random.default_rng(3)
    params = {"weight": rng.standard_normal(4), "bias": rng.standard_normal(4)}
    x = rng.standard_normal((2, 4)) * 0.01  # tiny variance: the op's eps matters
    assert refattn.gradcheck(refattn.layer_norm, params, x, op_options={"eps": 1e-2})
    y_default = refattn.layer_norm(params, x)
    y_big_eps = refattn.layer_norm(params, x, eps=1e-2)
    assert not np.allclose(y_default, y_big_eps)
