"""Sliding-window attention with global tokens: equals masked SDPA, banded cost, errors."""

from __future__ import annotations

import dataclasses
import tracemalloc

import numpy as np
import pytest
from conftest import randn, to_numpy

import refattn
from refattn import scaled_dot_product_attention as sdpa
from refattn._check_runner import compare_with_framework
from refattn.checks import all_cases, to_backend
from refattn.ops.sdpa import problem
from refattn.ops.sdpa.tiled import make_plan
from refattn.ops.window import sliding_window_attention, window_pattern

WINDOW_CASES = [c for c in all_cases() if c.op is sliding_window_attention]


def window_mask(n: int, window: int, global_tokens: int, is_causal: bool) -> np.ndarray:
    """The seed's definition, entry by entry (an independent reference)."""
    keep = np.zeros((n, n), dtype=bool)
    for i in range(n):
        keep[i, max(0, i - window) : min(n, i + window + 1)] = True
    keep[:global_tokens, :] = True
    keep[:, :global_tokens] = True
    if is_causal:
        keep &= np.tril(np.ones((n, n), dtype=bool))
    return keep


def rel_err(a, b) -> float:
    """Largest difference relative to ``max|b|``, floored at 1 (the inputs' scale).

    The floor matters where a gradient is exactly 0 in exact arithmetic (window 0: each row
    sees one key, so ``dS = 0``): both sides are then rounding noise of order 1e-17.
    """
    a, b = to_numpy(a), to_numpy(b)
    assert a.shape == b.shape and a.dtype == b.dtype
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1.0))


@pytest.mark.parametrize(
    ("q_shape", "kv_heads", "window", "global_tokens", "is_causal", "block_size"),
    [
        ((2, 3, 23, 4), None, 3, 0, False, 4),
        ((2, 3, 23, 4), None, 3, 0, True, (5, 3)),
        ((1, 2, 29, 4), None, 2, 3, False, 4),
        ((1, 4, 29, 4), 2, 4, 5, True, (3, 4)),
        ((1, 2, 17, 4), 1, 0, 0, False, 3),  # window 0: each position sees itself only
        ((1, 2, 17, 4), 1, 0, 2, True, 3),
        ((19, 4), None, 40, 0, False, 5),  # window wider than the sequence: full attention
        ((19, 4), None, 5, 19, False, 4),  # every position is global
        ((2, 1, 30, 4), None, 7, 1, True, None),  # default block size
    ],
)
def test_equals_sdpa_with_the_boolean_mask(
    xp, q_shape, kv_heads, window, global_tokens, is_causal, block_size
):
    *lead, n, d = q_shape
    kv_lead = [*lead[:-1], kv_heads if kv_heads is not None else lead[-1]] if lead else []
    q = randn(xp, q_shape, seed=1)
    k = randn(xp, (*kv_lead, n, d), seed=2)
    v = randn(xp, (*kv_lead, n, d + 1), seed=3)
    d_out = randn(xp, (*q_shape[:-1], d + 1), seed=4)
    mask = xp.asarray(window_mask(n, window, global_tokens, is_causal))
    out, pullback = refattn.vjp(
        sliding_window_attention,
        q,
        k,
        v,
        window=window,
        global_tokens=global_tokens,
        is_causal=is_causal,
        block_size=block_size,
    )
    ref_out, ref_pullback = refattn.vjp(sdpa, q, k, v, mask=mask, implementation="materialized")
    assert rel_err(out, ref_out) <= 1e-12
    for g, ref_g in zip(pullback(d_out), ref_pullback(d_out), strict=True):
        assert rel_err(g, ref_g) <= 1e-12


def test_scale_and_float32():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 15, 4)).astype(np.float32) for _ in range(3))
    out = sliding_window_attention(q, k, v, window=2, global_tokens=1, scale=0.3)
    mask = window_mask(15, 2, 1, False)
    ref = sdpa(*(x.astype(np.float64) for x in (q, k, v)), mask=mask, scale=0.3)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", WINDOW_CASES, ids=[c.name for c in WINDOW_CASES])
def test_check_case_gradcheck(xp, case):
    primals, options = case.make(np.random.default_rng(0))
    assert refattn.gradcheck(case.op, *to_backend(xp, primals), **to_backend(xp, options))


@pytest.mark.parametrize("case", WINDOW_CASES, ids=[c.name for c in WINDOW_CASES])
def test_check_case_matches_torch_autograd(case):
    pytest.importorskip("torch")
    status, err = compare_with_framework(case, "torch")
    assert status == "ok", status
    assert err <= 1e-12


def test_tiles_grow_linearly_with_n():
    # O(n w): each 64-row block is scored against its own and its two neighbouring key blocks
    for n in (2048, 4096):
        pb = problem.prepare(np.zeros((n, 2)), np.zeros((n, 2)), np.zeros((n, 2)))
        plan = make_plan(dataclasses.replace(pb, pattern=window_pattern(64)), (64, 64))
        assert plan.n_tiles == 3 * (n // 64) - 2
        # global tokens add their own row block (against every key block) and column block
        plan = make_plan(
            dataclasses.replace(pb, pattern=window_pattern(64, global_tokens=3)), (64, 64)
        )
        assert plan.n_tiles <= 3 * (n // 64) + 2 * (n // 64 + 1)


def test_memory_is_banded():
    # n = 4096: an n x n float64 matrix (or mask) would be 128 MiB (16 MiB for a bool mask)
    n, d = 4096, 8
    rng = np.random.default_rng(1)
    q, k, v, d_out = (rng.standard_normal((n, d)) for _ in range(4))
    tracemalloc.start()
    try:
        _, pullback = refattn.vjp(
            sliding_window_attention, q, k, v, window=32, global_tokens=4, is_causal=True
        )
        pullback(d_out)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < n * n / 4, f"peak {peak / 2**20:.1f} MiB"


@pytest.mark.parametrize(
    ("shapes", "options", "error", "match"),
    [
        (((2, 5, 3), (2, 6, 3)), {"window": 1}, ValueError, "self-attention"),
        (((5, 3), (5, 3)), {"window": -1}, ValueError, "window"),
        (((5, 3), (5, 3)), {"window": 1.5}, ValueError, "window"),
        (((5, 3), (5, 3)), {"window": True}, ValueError, "window"),
        (((5, 3), (5, 3)), {"window": 1, "global_tokens": 6}, ValueError, "global_tokens"),
        (((5, 3), (5, 3)), {"window": 1, "global_tokens": -1}, ValueError, "global_tokens"),
        (((5, 3), (5, 3)), {"window": 1, "is_causal": "yes"}, TypeError, "is_causal"),
        (((5, 3), (5, 3)), {"window": 1, "block_size": 0}, ValueError, "block_size"),
        (((5, 3), (5, 4)), {"window": 1}, ValueError, "d_k"),
    ],
)
def test_errors(shapes, options, error, match):
    q_shape, k_shape = shapes
    q, k = np.zeros(q_shape), np.zeros(k_shape)
    with pytest.raises(error, match=match):
        sliding_window_attention(q, k, k, **options)


def test_window_is_required():
    q = np.zeros((4, 2))
    with pytest.raises(TypeError, match="window"):
        sliding_window_attention(q, q, q)
