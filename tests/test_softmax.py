"""softmax / log_softmax: semantics, properties, gradients, errors, on every backend."""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
from conftest import randn, to_numpy
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import refattn

# the module (refattn.ops.softmax is the op, which the package re-exports under that name)
softmax_module = importlib.import_module("refattn.ops.softmax")

FLOATS = st.floats(-50.0, 50.0, allow_nan=False, width=64)


def _np_softmax(x, mask=None, axis=-1):
    """Independent NumPy reference (float64, explicit loops over the masked entries)."""
    x = np.asarray(x, dtype=np.float64)
    keep = np.ones_like(x, dtype=bool) if mask is None else np.broadcast_to(mask, x.shape)
    masked = np.where(keep, x, -np.inf)
    m = np.max(masked, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.where(keep, np.exp(masked - m), 0.0)
    s = e.sum(axis=axis, keepdims=True)
    return np.divide(e, s, out=np.zeros_like(e), where=s > 0)


@settings(max_examples=40, deadline=None)
@given(
    hnp.arrays(np.float64, hnp.array_shapes(min_dims=1, max_dims=3, max_side=6), elements=FLOATS)
)
def test_rows_sum_to_one_and_shift_invariance(x):
    y = refattn.softmax(x)
    np.testing.assert_allclose(y.sum(-1), 1.0, rtol=1e-13)
    shift = np.linspace(-3e3, 3e3, int(np.prod(x.shape[:-1])) or 1).reshape(*x.shape[:-1], 1)
    np.testing.assert_allclose(refattn.softmax(x + shift), y, rtol=1e-9, atol=1e-14)


@settings(max_examples=40, deadline=None)
@given(
    hnp.arrays(np.float64, (3, 5), elements=FLOATS),
    hnp.arrays(np.bool_, (3, 5)),
)
def test_masked_entries_are_exactly_zero(x, mask):
    y = refattn.softmax(x, mask=mask)
    assert np.all(y[~mask] == 0.0)
    rows_with_kept = mask.any(-1)
    np.testing.assert_allclose(y.sum(-1)[rows_with_kept], 1.0, rtol=1e-13)
    assert np.all(y[~rows_with_kept] == 0.0)
    np.testing.assert_allclose(y, _np_softmax(x, mask), rtol=1e-13, atol=1e-300)


@settings(max_examples=30, deadline=None)
@given(hnp.arrays(np.float64, (4, 6), elements=FLOATS), st.floats(-5, 5))
def test_vjp_of_constant_cotangent_is_zero(x, c):
    # softmax rows sum to 1, so d/dx <c * 1, y> = 0.
    _, pullback = refattn.vjp(refattn.softmax, x)
    (dx,) = pullback(np.full_like(x, c))
    np.testing.assert_allclose(dx, 0.0, atol=1e-14 * max(1.0, abs(c)))


def test_fully_masked_slice_gives_zero_and_zero_gradient(xp):
    x = randn(xp, (3, 4), seed=1)
    mask = xp.asarray(np.array([[True, False, True, True], [False] * 4, [True] * 4]))
    y, pullback = refattn.vjp(refattn.softmax, x, mask=mask)
    (dx,) = pullback(randn(xp, (3, 4), seed=2))
    assert np.all(to_numpy(y)[1] == 0.0)
    assert np.all(to_numpy(dx)[1] == 0.0)
    assert np.all(np.isfinite(to_numpy(dx)))
    ly, lpull = refattn.vjp(refattn.log_softmax, x, mask=mask)
    (ldx,) = lpull(randn(xp, (3, 4), seed=3))
    assert np.all(np.isneginf(to_numpy(ly)[1]))
    assert np.all(np.isneginf(to_numpy(ly)[0, 1]))
    assert np.all(to_numpy(ldx)[1] == 0.0) and to_numpy(ldx)[0, 1] == 0.0
    assert np.all(np.isfinite(to_numpy(ldx)))


@pytest.mark.parametrize("op", [refattn.softmax, refattn.log_softmax])
@pytest.mark.parametrize(("shape", "axis"), [((3, 0), -1), ((2, 0, 4), 1), ((0, 3), -1)])
def test_empty_axis_or_batch_gives_an_empty_result(xp, op, shape, axis):
    # as torch and JAX do; NumPy's max over an empty axis raised here before
    x = xp.zeros(shape, dtype=xp.float32)
    y, pullback = refattn.vjp(op, x, axis=axis, mask=xp.ones(shape, dtype=xp.bool))
    (dx,) = pullback(xp.ones(shape, dtype=xp.float32))
    for a in (y, dx):
        assert tuple(a.shape) == shape and a.dtype == xp.float32


@pytest.mark.parametrize("op", [refattn.softmax, refattn.log_softmax])
@pytest.mark.parametrize(
    ("shape", "axis", "mask_shape"),
    [
        ((6, 5, 7), -1, (6, 5, 7)),  # split along axis 0
        ((6, 5, 7), 0, (5, 1)),  # split along axis 1; the mask broadcasts along it
        ((1, 9, 4), 2, (9, 4)),  # axis 0 has size 1: split along axis 1
        ((9, 4), 1, (1, 4)),  # a mask row shared by every block
    ],
)
def test_blocks_on_the_thread_pool_give_the_unblocked_result(
    monkeypatch, op, shape, axis, mask_shape
):
    # Large inputs are cut into blocks along another axis and run on the thread pool; each
    # slice along `axis` is computed the same way in a block, so forward and backward must
    # equal the one-piece result exactly, whatever the mask's broadcasting.
    rng = np.random.default_rng(7)
    x = rng.standard_normal(shape)
    mask = rng.random(mask_shape) < 0.7
    dy = rng.standard_normal(shape)
    whole, pullback = refattn.vjp(op, x, axis=axis, mask=mask)
    (dx_whole,) = pullback(dy)
    blocks = []
    parallel_map = softmax_module.parallel_map

    def recorded(xp, fn, items):
        items = list(items)
        blocks.append(len(items))
        return parallel_map(xp, fn, items)

    monkeypatch.setattr(softmax_module, "_BLOCK_BYTES", 64)
    monkeypatch.setattr(softmax_module, "n_threads", lambda: 2)
    monkeypatch.setattr(softmax_module, "parallel_map", recorded)
    blocked, pullback = refattn.vjp(op, x, axis=axis, mask=mask)
    (dx_blocked,) = pullback(dy)
    assert len(blocks) == 2 and min(blocks) >= 2  # forward and backward both cut
    np.testing.assert_array_equal(blocked, whole)
    np.testing.assert_array_equal(dx_blocked, dx_whole)


@pytest.mark.parametrize("magnitude", [1e4, 1e6, 1e300])
def test_large_logits_do_not_overflow(magnitude):
    x = np.array([[magnitude, magnitude - 1.0, -magnitude], [-magnitude, -magnitude, 0.0]])
    y = refattn.softmax(x)
    ly = refattn.log_softmax(x)
    assert np.all(np.isfinite(y))
    expected0 = 1.0 / (1.0 + math.exp(-1.0)) if magnitude < 1e16 else 0.5
    assert y[0, 0] == pytest.approx(expected0, rel=1e-12)
    assert y[0, 2] == 0.0
    assert y[1, 2] == pytest.approx(1.0)
    np.testing.assert_allclose(ly[0, 0], math.log(expected0), rtol=1e-12)
    _, pull = refattn.vjp(refattn.softmax, x)
    assert np.all(np.isfinite(pull(np.ones_like(x))[0]))


def test_log_softmax_matches_log_of_softmax(xp):
    x = randn(xp, (2, 3, 7), seed=4) * 3.0
    mask = xp.asarray(np.random.default_rng(5).random((3, 7)) > 0.3)
    y = to_numpy(refattn.softmax(x, mask=mask))
    ly = to_numpy(refattn.log_softmax(x, mask=mask))
    keep = y > 0
    np.testing.assert_allclose(ly[keep], np.log(y[keep]), rtol=1e-13, atol=1e-13)
    assert np.all(np.isneginf(ly[~np.broadcast_to(to_numpy(mask), ly.shape)]))


@pytest.mark.parametrize("op", [refattn.softmax, refattn.log_softmax], ids=lambda o: o.name)
@pytest.mark.parametrize("axis", [-1, 0, 1])
def test_gradcheck_every_backend(xp, op, axis):
    x = randn(xp, (3, 4, 2), seed=6)
    mask = xp.asarray(np.random.default_rng(7).random((3, 4, 2)) > 0.25)
    assert refattn.gradcheck(op, x, axis=axis)
    assert refattn.gradcheck(op, x, axis=axis, mask=mask)


@pytest.mark.parametrize("op", [refattn.softmax, refattn.log_softmax], ids=lambda o: o.name)
def test_float32_in_float32_out_on_backend(xp, op):
    x = randn(xp, (4, 5), seed=8, dtype="float32")
    y, pull = refattn.vjp(op, x)
    (dx,) = pull(xp.ones_like(y))
    assert y.dtype == xp.float32 and dx.dtype == xp.float32
    assert type(y) is type(x) and type(dx) is type(x)
    ref = _np_softmax(to_numpy(x).astype(np.float64))
    if op is refattn.log_softmax:
        ref = np.log(ref)
    np.testing.assert_allclose(to_numpy(y), ref, rtol=2e-6, atol=2e-6)


def test_errors_name_the_argument(xp):
    x = randn(xp, (3, 4), seed=9)
    with pytest.raises(TypeError, match="x must have a real floating dtype"):
        refattn.softmax(xp.asarray(np.arange(4)))
    with pytest.raises(TypeError, match="mask must be boolean"):
        refattn.softmax(x, mask=xp.ones((3, 4)))
    with pytest.raises(ValueError, match=r"mask of shape \(2, 4\) does not broadcast to \(3, 4\)"):
        refattn.softmax(x, mask=xp.ones((2, 4), dtype=xp.bool))
    with pytest.raises(ValueError, match="axis 2 is out of range"):
        refattn.log_softmax(x, axis=2)
    _, pull = refattn.vjp(refattn.softmax, x)
    with pytest.raises(ValueError, match=r"cotangent must have the output's shape \(3, 4\)"):
        pull(xp.ones((4, 3)))
    with pytest.raises(TypeError, match="cotangent must have the output's dtype"):
        pull(xp.ones((3, 4), dtype=xp.float32))


def test_complex_input_is_rejected():
    with pytest.raises(TypeError, match="real floating"):
        refattn.softmax(np.ones(3, dtype=np.complex128))
