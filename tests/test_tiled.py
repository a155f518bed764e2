"""Tiled (flash-style) SDPA: agreement with the materialized kernels, tile skipping, memory."""

from __future__ import annotations

import dataclasses
import math
import threading
import tracemalloc

import numpy as np
import pytest
from conftest import to_numpy
from hypothesis import given, settings
from hypothesis import strategies as st

import refattn
from refattn import scaled_dot_product_attention as sdpa
from refattn._check_runner import compare_with_framework
from refattn.checks import all_cases, to_backend
from refattn.ops.sdpa import plan as sdpa_plan
from refattn.ops.sdpa import problem, scores, tiled
from refattn.ops.sdpa.plan import Pattern
from refattn.ops.sdpa.tiled import TiledResiduals, make_plan

TILED_CASES = [c for c in all_cases() if "tiled" in c.tags]


def rel_err(actual, desired) -> float:
    """``max|a - d| / max|d|`` over finite entries; the non-finite entries must be identical."""
    a, d = to_numpy(actual), to_numpy(desired)
    assert a.shape == d.shape and a.dtype == d.dtype
    finite = np.isfinite(d)
    np.testing.assert_array_equal(a[~finite], d[~finite])
    if not finite.any():
        return 0.0
    return float(np.max(np.abs(a[finite] - d[finite])) / max(np.max(np.abs(d[finite])), 1e-300))


def make_inputs(rng, q_shape, *, kv_heads=None, n_k=None, d_v=None, logit_scale=1.0):
    *lead, n_q, d = q_shape
    kv_lead = [*lead[:-1], kv_heads if kv_heads is not None else lead[-1]] if lead else []
    nk = n_q if n_k is None else n_k
    q = rng.standard_normal(q_shape) * logit_scale
    k = rng.standard_normal((*kv_lead, nk, d))
    v = rng.standard_normal((*kv_lead, nk, d if d_v is None else d_v))
    return q, k, v


def run_both(xp, primals, options, *, block_size, seed=0, cotangent_mask=None):
    """Forward + backward with both implementations on ``xp``: ``(tiled, materialized)``.

    Each is ``(outputs tuple, grads tuple)``, same random cotangents (0 where not finite).
    """
    primals = to_backend(xp, primals)
    options = to_backend(xp, options)
    results = []
    for implementation in ("tiled", "materialized"):
        extra = {"block_size": block_size} if implementation == "tiled" else {}
        out, pullback = refattn.vjp(
            sdpa, *primals, implementation=implementation, **extra, **options
        )
        outs = out if isinstance(out, tuple) else (out,)
        rng = np.random.default_rng(seed)
        cts = []
        for i, o in enumerate(outs):
            host = to_numpy(o)
            ct = np.where(np.isfinite(host), rng.standard_normal(host.shape), 0.0)
            keep_ct = cotangent_mask is None or cotangent_mask[i]
            cts.append(xp.asarray(ct) if keep_ct else None)
        grads = pullback(tuple(cts) if isinstance(out, tuple) else cts[0])
        results.append((outs, grads))
    return results


def assert_agree(tiled_result, materialized_result, tol=1e-12):
    (t_outs, t_grads), (m_outs, m_grads) = tiled_result, materialized_result
    for name, a, b in [
        *((f"output {i}", a, b) for i, (a, b) in enumerate(zip(t_outs, m_outs, strict=True))),
        *((f"grad {i}", a, b) for i, (a, b) in enumerate(zip(t_grads, m_grads, strict=True))),
    ]:
        err = rel_err(a, b)
        assert err <= tol, f"{name}: tiled differs from materialized by {err:.3g} relative"


# ----------------------------------------------------------------------------- agreement


def _mask_rows(shape, rows, rng, density=0.7):
    mask = rng.random(shape) < density
    mask[..., rows, :] = False
    return mask


CONFIGS = {
    # name: (q_shape, kv_heads, n_k, options builder, block_size)
    "ragged_cross": ((2, 3, 37, 8), None, 29, lambda r, s: {}, (8, 6)),
    "causal_upper_left_nq_lt_nk": (
        (1, 2, 13, 4),
        None,
        21,
        lambda r, s: {"is_causal": True},
        (4, 5),
    ),
    "causal_upper_left_nq_gt_nk": (
        (1, 2, 21, 4),
        None,
        13,
        lambda r, s: {"is_causal": True},
        (5, 4),
    ),
    "causal_lower_right_nq_lt_nk": (
        (1, 2, 13, 4),
        None,
        21,
        lambda r, s: {"is_causal": True, "causal_alignment": "lower_right"},
        (4, 5),
    ),
    "causal_lower_right_nq_gt_nk": (  # the first 8 rows see no key at all
        (1, 2, 21, 4),
        None,
        13,
        lambda r, s: {"is_causal": True, "causal_alignment": "lower_right"},
        (4, 3),
    ),
    "causal_square_one_block": ((2, 16, 4), None, None, lambda r, s: {"is_causal": True}, 16),
    "gqa_causal_lower_right": (
        (2, 6, 11, 4),
        2,
        9,
        lambda r, s: {"is_causal": True, "causal_alignment": "lower_right"},
        (3, 4),
    ),
    "mqa": ((1, 4, 10, 4), 1, 12, lambda r, s: {}, (3, 5)),
    "mask_broadcast": ((2, 2, 12, 4), None, 10, lambda r, s: {"mask": r.random(s[-2:]) < 0.6}, 4),
    "mask_per_head": ((2, 2, 12, 4), None, 10, lambda r, s: {"mask": r.random(s) < 0.6}, (5, 3)),
    "padding_mask": (
        (3, 2, 9, 4),
        None,
        11,
        lambda r, s: {"mask": (np.arange(11) < np.array([11, 6, 1])[:, None])[:, None, None, :]},
        (4, 4),
    ),
    "bias_per_head_row": (
        (2, 3, 9, 4),
        None,
        10,
        lambda r, s: {"bias": r.standard_normal((3, 1, 10))},
        (4, 3),
    ),
    "bias_full_and_mask_causal": (
        (2, 2, 14, 4),
        None,
        14,
        lambda r, s: {
            "bias": 3.0 * r.standard_normal(s),
            "mask": r.random(s) < 0.8,
            "is_causal": True,
        },
        (4, 4),
    ),
    "dropout_bool": (
        (2, 2, 9, 4),
        None,
        11,
        lambda r, s: {"dropout_mask": r.random(s) < 0.7, "dropout_p": 0.3},
        (4, 3),
    ),
    "dropout_float_broadcast": (
        (1, 2, 9, 4),
        None,
        11,
        lambda r, s: {"dropout_mask": (r.random(s[-2:]) < 0.5) * 1.0, "dropout_p": 0.5},
        (2, 5),
    ),
    "fully_masked_rows_and_row_block": (  # rows 8..15 are a whole block of fully masked rows
        (2, 2, 21, 4),
        None,
        13,
        lambda r, s: {"mask": _mask_rows(s, [3, *range(8, 16)], r)},
        (8, 4),
    ),
    "fully_masked_key_block": (  # keys 4..7 (a whole key block) are hidden from everyone
        (1, 2, 10, 4),
        None,
        12,
        lambda r, s: {"mask": np.arange(12) // 4 != 1},
        (3, 4),
    ),
    "everything_masked": ((1, 2, 5, 4), None, 6, lambda r, s: {"mask": np.zeros(s, bool)}, 2),
    "weights": (
        (2, 2, 9, 4),
        None,
        10,
        lambda r, s: {"mask": r.random(s) < 0.7, "return_weights": True, "is_causal": True},
        (4, 3),
    ),
    "two_d": ((17, 5), None, 19, lambda r, s: {"is_causal": True, "scale": 0.3}, (6, 4)),
    "batch_dims": ((2, 2, 3, 9, 4), None, 7, lambda r, s: {"mask": r.random(s) < 0.8}, 4),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_tiled_equals_materialized(xp, name, bounded_form):
    q_shape, kv_heads, n_k, options_of, block = CONFIGS[name]
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    q, k, v = make_inputs(rng, q_shape, kv_heads=kv_heads, n_k=n_k, d_v=3)
    scores_shape = (*q.shape[:-1], k.shape[-2])
    options = {"return_lse": True, **options_of(rng, scores_shape)}
    assert_agree(*run_both(xp, (q, k, v), options, block_size=block))


def test_large_logits_rescaling(xp):
    # logits of a few hundred: the running max changes from block to block by far more than
    # exp can absorb, so a missing rescale (alpha) would be visible immediately
    rng = np.random.default_rng(1)
    q, k, v = make_inputs(rng, (2, 2, 23, 4), n_k=31, logit_scale=100.0)
    k[..., 20:, :] *= 3.0  # the row maximum lives in a late key block
    options = {"return_lse": True, "is_causal": True, "causal_alignment": "lower_right"}
    assert_agree(*run_both(xp, (q, k, v), options, block_size=(5, 4)))


@pytest.mark.parametrize(
    "mask",
    [(False, True), (False, False, True), (False, True, False)],
    ids=["lse_only", "lse_only_with_weights", "weights_only"],
)
def test_partial_cotangents(mask):
    # cotangents for only some outputs (None for the others) take other code paths
    rng = np.random.default_rng(2)
    q, k, v = make_inputs(rng, (1, 2, 11, 4), n_k=9)
    options = {"return_lse": True, "mask": rng.random((11, 9)) < 0.7, "is_causal": True}
    if len(mask) == 3:
        options["return_weights"] = True
    xp = refattn._backend.default_namespace()
    assert_agree(*run_both(xp, (q, k, v), options, block_size=(3, 4), cotangent_mask=mask))


def test_threads_lanes_and_head_chunks(monkeypatch):
    # force threads on a small problem, three lanes for two workers, and one head per unit
    monkeypatch.setattr(sdpa_plan, "SERIAL_BYTES", 0)
    monkeypatch.setattr(tiled, "n_threads", lambda: 3)
    monkeypatch.setattr(sdpa_plan, "TILE_BYTES", 1)
    rng = np.random.default_rng(3)
    q, k, v = make_inputs(rng, (2, 6, 19, 4), kv_heads=3, n_k=23)
    options = {"return_lse": True, "is_causal": True, "mask": rng.random((2, 6, 19, 23)) < 0.8}
    pb = problem.prepare(q, k, v)
    assert len(make_plan(pb, (4, 4)).heads) == 6  # (B, Hkv) = (2, 3) chunks
    xp = refattn._backend.default_namespace()
    assert_agree(*run_both(xp, (q, k, v), options, block_size=(4, 5)))


def _online_units(monkeypatch) -> list[tuple]:
    """Record the units the online-softmax forward computes (those the bounded path declined).

    Appended to a list (atomic under the GIL): units may run on several threads.
    """
    units = []
    online = tiled._forward_unit

    def recorded(pb, tiles, hc, r0, r1, weights):
        units.append((hc, r0))
        return online(pb, tiles, hc, r0, r1, weights)

    monkeypatch.setattr(tiled, "_forward_unit", recorded)
    return units


@pytest.fixture(params=["augmented", "plain"])
def bounded_form(request, monkeypatch) -> str:
    """Runs a test with each form of the bounded forward's tiles, whatever the row count."""
    monkeypatch.setattr(tiled, "_AUGMENT_ROWS", -1 if request.param == "augmented" else 2**62)
    return request.param


@pytest.mark.parametrize(
    ("n_q", "kv_heads", "augmented"),
    [(2048, None, False), (2049, None, True), (1024, 1, False), (1025, 1, True)],
)
def test_bounded_forward_augments_keys_that_meet_many_rows(monkeypatch, n_q, kv_heads, augmented):
    # the keys are augmented when g * n_q > 2048 (two query heads share one kv head in the
    # GQA cases); both forms give what the materialized op gives
    forms = []
    unit = tiled._BoundedCall.unit

    def recorded(self, hc, ri, keys):
        forms.append(keys is not None)
        return unit(self, hc, ri, keys)

    monkeypatch.setattr(tiled._BoundedCall, "unit", recorded)
    rng = np.random.default_rng(17)
    q, k, v = make_inputs(rng, (1, 2, n_q, 4), kv_heads=kv_heads, n_k=12)
    out = sdpa(q, k, v, implementation="tiled")
    assert forms and set(forms) == {augmented}
    assert rel_err(out, sdpa(q, k, v, implementation="materialized")) <= 1e-13


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_bounded_forward_taken_on_ordinary_inputs(monkeypatch, dtype, bounded_form):
    # unit-variance inputs: every unit takes the single-pass bounded-shift forward, and it
    # gives what the materialized softmax gives
    online = _online_units(monkeypatch)
    rng = np.random.default_rng(11)
    q, k, v = (x.astype(dtype) for x in make_inputs(rng, (2, 3, 40, 8), n_k=37))
    mask = rng.random((40, 37)) < 0.9
    out, lse = sdpa(q, k, v, mask=mask, return_lse=True, implementation="tiled", block_size=16)
    assert len(online) == 0
    q64, k64, v64 = (x.astype(np.float64) for x in (q, k, v))
    ref, ref_lse = sdpa(q64, k64, v64, mask=mask, return_lse=True, implementation="materialized")
    tol = 1e-13 if dtype == np.float64 else 2e-6
    assert rel_err(out.astype(np.float64), ref) <= tol
    assert rel_err(lse.astype(np.float64), ref_lse) <= tol


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_bounded_forward_declines_wide_gaps(monkeypatch, dtype, bounded_form):
    # Each query is long and orthogonal to the longest key: the Cauchy-Schwarz bound
    # scale |q| max|k| sits far above every actual score, so exp(S - bound) would underflow
    # and the unit must go to the online softmax.
    online = _online_units(monkeypatch)
    rng = np.random.default_rng(12)
    d, n = 4, 24
    q = np.zeros((1, 1, n, d))
    q[..., 0] = 40.0
    q[..., 1:3] = rng.standard_normal((n, 2))
    k = rng.standard_normal((1, 1, n, d))
    k[..., 0] = 0.1 * rng.standard_normal(n)
    k[..., 0, :] = [0.0, 0.0, 0.0, 4000.0]  # the longest key, orthogonal to the queries
    v = rng.standard_normal((1, 1, n, 3))
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    out, lse = sdpa(q, k, v, return_lse=True, implementation="tiled", block_size=8)
    assert len(online) == 3  # every row block
    ref, ref_lse = sdpa(q, k, v, return_lse=True, implementation="materialized")
    tol = 1e-13 if dtype == np.float64 else 1e-5
    assert rel_err(out, ref) <= tol and rel_err(lse, ref_lse) <= tol


@pytest.mark.parametrize("threaded", [False, True])
def test_bounded_forward_declines_tiny_values(monkeypatch, threaded):
    # max|V| below smallest_normal^(3/4): weights as small as exp(-G) times V would be
    # subnormal, so the online softmax computes it, to full float32 relative accuracy. With
    # threads, the units learn it only after their first GEMM (the bounds are a work item).
    if threaded:
        monkeypatch.setattr(sdpa_plan, "SERIAL_BYTES", 0)
        monkeypatch.setattr(tiled, "n_threads", lambda: 3)
    online = _online_units(monkeypatch)
    rng = np.random.default_rng(13)
    q, k, v = make_inputs(rng, (1, 2, 20, 8))
    v32 = (v * 1e-30).astype(np.float32)
    out, lse = sdpa(
        q.astype(np.float32),
        k.astype(np.float32),
        v32,
        return_lse=True,
        implementation="tiled",
        block_size=8,
    )
    assert len(online) == 3  # every unit: 3 row blocks (both heads in one chunk)
    ref, ref_lse = sdpa(
        q, k, v32.astype(np.float64), return_lse=True, implementation="materialized"
    )
    assert rel_err(out.astype(np.float64), ref) <= 1e-6
    assert rel_err(lse.astype(np.float64), ref_lse) <= 1e-6


def test_once_hands_its_value_and_its_error_to_every_waiter():
    # the bounded forward's bounds: computed by one work item, awaited by the others (daemon
    # waiters, so that a broken hand-over fails the test instead of hanging the run)
    def waiters(once):
        results = []

        def wait():
            try:
                results.append(once.get())
            except ValueError as error:
                results.append(str(error))

        threads = [threading.Thread(target=wait, daemon=True) for _ in range(2)]
        for thread in threads:
            thread.start()
        return threads, results

    def fail():
        raise ValueError("no bounds")

    for fn, expected in ((lambda: 42, 42), (fail, "no bounds")):
        once = tiled._Once(fn)
        threads, results = waiters(once)
        if expected == 42:
            once.compute()
        else:
            with pytest.raises(ValueError, match="no bounds"):
                once.compute()
        for thread in threads:
            thread.join(timeout=10)
        assert results == [expected, expected]


def _record_shifts(monkeypatch) -> list[bool]:
    """Record, per unit of the bounded forward, whether its scores were shifted."""
    shifted = []
    row_shift = tiled._BoundedCall._row_shift

    def recorded(*args):
        shift = row_shift(*args)
        shifted.append(shift is not None)
        return shift

    monkeypatch.setattr(tiled._BoundedCall, "_row_shift", recorded)
    return shifted


@pytest.mark.parametrize(
    ("case", "shifted"),
    [
        ("ordinary", False),  # bounds ~ 10, limit ~ 80: no shift needed
        ("long queries", True),  # bounds ~ 100 would overflow exp in float32
        ("large values", True),  # bounds ~ 10, but n_k e^10 max|V| would overflow E V
    ],
)
def test_bounded_forward_shifts_only_rows_that_could_overflow(monkeypatch, case, shifted):
    # The plain form skips the shift when scale |q_i| max|k| (>= every score) is small enough
    # that no weight, row sum or E V can overflow; long queries or large values are shifted.
    # Both give what the float64 materialized op gives, with no inf anywhere.
    monkeypatch.setattr(tiled, "_AUGMENT_ROWS", 2**62)
    online = _online_units(monkeypatch)
    shifts = _record_shifts(monkeypatch)
    rng = np.random.default_rng(18)
    q, k, v = make_inputs(rng, (1, 2, 48, 16), n_k=40)
    if case == "long queries":  # along the longest key, so that the bound is nearly reached
        k[..., 0, :] = 0.0
        k[..., 0, 0] = 10.0
        q[..., 0] = 40.0
    elif case == "large values":
        v = v * 1e35
    q, k, v = (x.astype(np.float32) for x in (q, k, v))
    out, lse = sdpa(q, k, v, return_lse=True, implementation="tiled", block_size=16)
    assert len(online) == 0 and shifts and set(shifts) == {shifted}
    q, k, v = (x.astype(np.float64) for x in (q, k, v))
    ref, ref_lse = sdpa(q, k, v, return_lse=True, implementation="materialized")
    assert rel_err(out.astype(np.float64), ref) <= 1e-5
    assert rel_err(lse.astype(np.float64), ref_lse) <= 1e-5


def test_bounded_forward_checks_all_values_when_the_first_key_is_zero(monkeypatch, bounded_form):
    # all-zero values of the first key do not make V look too small to the value check
    # (ordinary values: the bounded forward is taken)
    online = _online_units(monkeypatch)
    rng = np.random.default_rng(15)
    q, k, v = (x.astype(np.float32) for x in make_inputs(rng, (1, 2, 20, 8)))
    v[..., 0, :] = 0.0
    out = sdpa(q, k, v, implementation="tiled", block_size=8)
    assert len(online) == 0
    ref = sdpa(*(x.astype(np.float64) for x in (q, k, v)), implementation="materialized")
    assert rel_err(out.astype(np.float64), ref) <= 2e-6


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_bounded_forward_non_finite_values(bad, bounded_form):
    # a NaN in V declines the bounded forward, an inf makes every unit shift; either way the
    # outputs that use it are NaN or inf exactly where the materialized op has them, and the
    # others agree
    rng = np.random.default_rng(16)
    q, k, v = make_inputs(rng, (1, 2, 20, 8))
    v[0, 1, 7, 3] = bad
    out = sdpa(q, k, v, implementation="tiled", block_size=8)
    ref = sdpa(q, k, v, implementation="materialized")
    assert np.array_equal(np.isfinite(out), np.isfinite(ref))
    assert not np.all(np.isfinite(out))
    assert rel_err(out, ref) <= 1e-13


def test_bounded_forward_rows_without_keys(bounded_form):
    # a fully masked row has l = 0: the unit is declined and the row gives 0 and lse = -inf
    rng = np.random.default_rng(14)
    q, k, v = make_inputs(rng, (1, 1, 12, 4), n_k=10)
    mask = np.ones((12, 10), dtype=bool)
    mask[3] = False
    out, lse = sdpa(q, k, v, mask=mask, return_lse=True, implementation="tiled", block_size=4)
    ref, ref_lse = sdpa(q, k, v, mask=mask, return_lse=True, implementation="materialized")
    assert np.all(out[..., 3, :] == 0) and np.all(lse[..., 3] == -np.inf)
    assert rel_err(out, ref) <= 1e-13 and rel_err(lse, ref_lse) <= 1e-13


def test_float32_stays_float32():
    rng = np.random.default_rng(4)
    q, k, v = make_inputs(rng, (2, 2, 20, 8), n_k=17)
    out64, lse64 = sdpa(q, k, v, is_causal=True, return_lse=True, implementation="tiled")
    f32 = [x.astype(np.float32) for x in (q, k, v)]
    out32, lse32 = sdpa(
        *f32, is_causal=True, return_lse=True, implementation="tiled", block_size=(6, 5)
    )
    assert out32.dtype == np.float32 and lse32.dtype == np.float32
    np.testing.assert_allclose(out32, out64, rtol=0, atol=1e-5)
    np.testing.assert_allclose(lse32, lse64, rtol=0, atol=1e-5)
    _, pullback = refattn.vjp(sdpa, *f32, implementation="tiled", block_size=7)
    grads = pullback(np.ones(out32.shape, np.float32))
    assert all(g.dtype == np.float32 for g in grads)


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("case", TILED_CASES, ids=[c.name for c in TILED_CASES])
def test_check_case_gradcheck(xp, case):
    primals, options = case.make(np.random.default_rng(0))
    assert refattn.gradcheck(case.op, *to_backend(xp, primals), **to_backend(xp, options))


@pytest.mark.parametrize("case", TILED_CASES, ids=[c.name for c in TILED_CASES])
def test_check_case_matches_torch_autograd(case):
    pytest.importorskip("torch")
    status, err = compare_with_framework(case, "torch")
    assert status == "ok", status
    assert err <= 1e-12


def test_matches_torch_sdpa_causal_lower_right():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    q, k, v = make_inputs(rng, (2, 3, 17, 8), n_k=17)
    out, pullback = refattn.vjp(
        sdpa, q, k, v, is_causal=True, implementation="tiled", block_size=(5, 3)
    )
    d_out = rng.standard_normal(out.shape)
    grads = pullback(d_out)
    tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
    t_out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True)
    t_grads = torch.autograd.grad(t_out, (tq, tk, tv), torch.tensor(d_out))
    assert rel_err(out, t_out.detach().numpy()) <= 1e-12
    for g, t in zip(grads, t_grads, strict=True):
        assert rel_err(g, t.numpy()) <= 1e-12


# ----------------------------------------------------------------------------- tile skipping


def _keep_reference(pattern: Pattern, n_q: int, n_k: int) -> np.ndarray:
    i = np.arange(n_q)[:, None]
    j = np.arange(n_k)[None, :]
    band = np.ones((n_q, n_k), bool)
    if pattern.left is not None:
        band &= i - j <= pattern.left
    if pattern.right is not None:
        band &= j - i <= pattern.right
    keep = band | (i < pattern.n_global) | (j < pattern.n_global)
    if pattern.causal is not None:
        keep &= j - i <= pattern.causal
    return keep


OPTIONAL = st.one_of(st.none(), st.integers(0, 7))


@settings(max_examples=150, deadline=None)
@given(
    n_q=st.integers(0, 30),
    n_k=st.integers(0, 30),
    block_q=st.integers(1, 8),
    block_k=st.integers(1, 8),
    causal=st.one_of(st.none(), st.integers(-12, 12)),
    left=OPTIONAL,
    right=OPTIONAL,
    n_global=st.integers(0, 5),
)
def test_plan_covers_exactly_the_visible_entries(
    n_q, n_k, block_q, block_k, causal, left, right, n_global
):
    pattern = Pattern(causal=causal, left=left, right=right, n_global=n_global)
    keep = _keep_reference(pattern, n_q, n_k)
    pb = problem.prepare(np.zeros((n_q, 2)), np.zeros((n_k, 2)), np.zeros((n_k, 2)))
    plan = make_plan(dataclasses.replace(pb, pattern=pattern), (block_q, block_k))
    covered = np.zeros_like(keep)
    xp = refattn._backend.default_namespace()
    assert [r0 for r0, _ in plan.rows] == sorted({r0 for r0, _ in plan.rows})
    for (r0, r1), tiles in zip(plan.rows, plan.visible, strict=True):
        assert r1 - r0 <= block_q
        for c0, c1, full in tiles:
            assert c1 - c0 <= block_k
            tile = keep[r0:r1, c0:c1]
            assert tile.any() or not full
            if full:
                assert tile.all()
            np.testing.assert_array_equal(
                scores.pattern_keep(pattern, xp, r0, r1, c0, c1, None), tile
            )
            covered[r0:r1, c0:c1] = True
    # every visible entry is in a computed tile: skipped tiles are entirely hidden
    assert not (keep & ~covered).any()


def test_causal_computes_about_half_the_tiles():
    n, block = 1024, 128
    pb = problem.prepare(np.zeros((n, 4)), np.zeros((n, 4)), np.zeros((n, 4)))
    full = make_plan(pb, (block, block))
    causal_pb = dataclasses.replace(pb, pattern=sdpa_plan.causal_pattern(True, "upper_left", n, n))
    causal = make_plan(causal_pb, (block, block))
    blocks = n // block
    assert full.n_tiles == blocks**2
    assert causal.n_tiles == blocks * (blocks + 1) // 2
    # only the diagonal tiles need a mask
    assert sum(not f for tiles in causal.visible for *_, f in tiles) == blocks


def test_no_n_by_n_allocation():
    # n = 2048: one float64 n x n matrix is 32 MiB; the tiled forward + backward allocate
    # (besides inputs and outputs) only a few 128 x 128 tiles
    n, d = 2048, 16
    rng = np.random.default_rng(6)
    q, k, v = make_inputs(rng, (1, n, d))
    mask = np.ones((n, n), bool)  # a caller's full mask is only ever sliced, not copied
    d_out = rng.standard_normal((1, n, d))
    tracemalloc.start()
    try:
        _, pullback = refattn.vjp(
            sdpa, q, k, v, mask=mask, is_causal=True, implementation="tiled", block_size=128
        )
        pullback(d_out)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < n * n * 8 / 8, f"peak {peak / 2**20:.1f} MiB"


# ----------------------------------------------------------------------------- dispatch


def _residuals(q, k, v, **options):
    _, residuals = sdpa.forward(q, k, v, **options)
    return residuals


def test_auto_picks_by_memory_budget():
    rng = np.random.default_rng(7)
    q, k, v = make_inputs(rng, (2, 3, 8, 4), n_k=5)
    size = 2 * 3 * 8 * 5 * 8  # batch * heads * n_q * n_k * itemsize
    assert isinstance(_residuals(q, k, v, memory_budget=size - 1), TiledResiduals)
    assert not isinstance(_residuals(q, k, v, memory_budget=size), TiledResiduals)
    assert not isinstance(_residuals(q, k, v), TiledResiduals)  # default budget: 1 GiB
    f32 = [x.astype(np.float32) for x in (q, k, v)]
    assert not isinstance(_residuals(*f32, memory_budget=size // 2), TiledResiduals)
    assert isinstance(_residuals(*f32, memory_budget=size // 2 - 1), TiledResiduals)
    # weights requested: "auto" keeps the materialized kernel, "tiled" is honoured
    weights_auto = _residuals(q, k, v, memory_budget=0, return_weights=True)
    assert not isinstance(weights_auto, TiledResiduals)
    weights_tiled = _residuals(q, k, v, implementation="tiled", return_weights=True)
    assert isinstance(weights_tiled, TiledResiduals)
    assert problem.choose_implementation("auto", n_scores=size // 8, elem_bytes=8) == "materialized"
    assert problem.DEFAULT_MEMORY_BUDGET == 4 * 2**20


def test_auto_results_equal_explicit_choice():
    rng = np.random.default_rng(8)
    q, k, v = make_inputs(rng, (1, 2, 9, 4))
    tiled_out = sdpa(q, k, v, is_causal=True, implementation="tiled")
    auto_out = sdpa(q, k, v, is_causal=True, memory_budget=0)
    np.testing.assert_array_equal(auto_out, tiled_out)


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"implementation": "flash"}, ValueError, "implementation must be one of"),
        ({"implementation": None}, ValueError, "implementation must be one of"),
        ({"implementation": "tiled", "block_size": 0}, ValueError, "block_size"),
        ({"implementation": "tiled", "block_size": (4,)}, ValueError, "block_size"),
        ({"implementation": "tiled", "block_size": 2.5}, ValueError, "block_size"),
        ({"implementation": "tiled", "block_size": True}, ValueError, "block_size"),
        ({"block_size": (4, -1)}, ValueError, "block_size"),
        ({"memory_budget": -1}, ValueError, "memory_budget"),
        ({"memory_budget": "1GB"}, TypeError, "memory_budget"),
        ({"implementation": "tiled", "is_causal": 1}, TypeError, "is_causal"),
        ({"implementation": "tiled", "causal_alignment": "x"}, ValueError, "causal_alignment"),
        ({"implementation": "tiled", "mask": np.ones((3, 3))}, TypeError, "boolean"),
        ({"implementation": "tiled", "dropout_p": 0.5}, ValueError, "dropout_mask"),
    ],
)
def test_errors(options, error, match):
    q = np.zeros((2, 4, 3))
    with pytest.raises(error, match=match):
        sdpa(q, q, q, **options)


def test_shape_errors_same_as_materialized():
    q, k = np.zeros((2, 4, 3)), np.zeros((2, 5, 2))
    for implementation in ("tiled", "materialized"):
        with pytest.raises(ValueError, match="d_k"):
            sdpa(q, k, k, implementation=implementation)


def test_lse_of_rows_without_keys_is_minus_inf():
    rng = np.random.default_rng(9)
    q, k, v = make_inputs(rng, (1, 9, 4), n_k=4)
    out, lse = sdpa(
        q,
        k,
        v,
        is_causal=True,
        causal_alignment="lower_right",
        return_lse=True,
        implementation="tiled",
        block_size=2,
    )
    assert np.all(lse[:, :5] == -math.inf) and np.all(np.isfinite(lse[:, 5:]))
    assert np.all(out[:, :5] == 0.0)
