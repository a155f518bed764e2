"""ALiBi slopes and bias, against transformers' BLOOM and MPT implementations and the paper.

transformers computes the slopes in float32, so they are compared at float32 accuracy; the
float64 values are checked against the paper's closed form ``2^(-8k/H)`` for powers of two.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import rel_err, to_numpy

import refattn

sdpa = refattn.scaled_dot_product_attention


@pytest.mark.parametrize("n_heads", [1, 2, 3, 5, 8, 12, 16, 24, 40])
def test_bloom_slopes_match_transformers(n_heads):
    pytest.importorskip("torch")
    bloom = pytest.importorskip("transformers.models.bloom.modeling_bloom")
    want = bloom._get_alibi_slopes(n_heads, "cpu").double().numpy()
    assert rel_err(refattn.alibi_slopes(n_heads), want) <= 1e-6


@pytest.mark.parametrize("max_bias", [8.0, 16.0])
@pytest.mark.parametrize("n_heads", [1, 3, 5, 8, 12, 24])
def test_mpt_slopes_match_transformers(n_heads, max_bias):
    pytest.importorskip("torch")
    mpt = pytest.importorskip("transformers.models.mpt.modeling_mpt")
    # the last key's bias is 0 and the first's is -(n-1) m_h: the slopes are -bias[:, 0, 0]
    table = mpt.build_mpt_alibi_tensor(n_heads, 2, alibi_bias_max=max_bias).double().numpy()
    want = -table[:, 0, 0]
    got = refattn.alibi_slopes(n_heads, rule="mpt", max_bias=max_bias)
    assert rel_err(got, want) <= 1e-6


@pytest.mark.parametrize("n_heads", [1, 2, 4, 8, 16, 64])
def test_powers_of_two_are_the_paper_s_sequence(n_heads):
    paper = 2.0 ** (-8.0 * np.arange(1, n_heads + 1) / n_heads)
    for rule in ("bloom", "mpt"):
        assert np.array_equal(refattn.alibi_slopes(n_heads, rule=rule), paper)


@pytest.mark.parametrize("n_heads", [3, 5, 12, 24, 40])
def test_the_two_rules_agree_at_max_bias_8(n_heads):
    bloom, mpt = refattn.alibi_slopes(n_heads), refattn.alibi_slopes(n_heads, rule="mpt")
    assert np.array_equal(bloom, mpt)
    assert not np.array_equal(bloom, refattn.alibi_slopes(n_heads, rule="mpt", max_bias=16.0))


def test_causal_bias_equals_bloom_s_key_position_bias():
    """-m (i - j) and BLOOM's m j differ by m i, constant per row: the same attention."""
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 6, 9, 4)) for _ in range(3))
    slopes = refattn.alibi_slopes(6)
    ours = sdpa(q, k, v, bias=refattn.alibi_bias(slopes, 9, 9), is_causal=True)
    bloom = slopes[:, None, None] * np.arange(9.0)[None, None, :]
    assert (
        rel_err(ours, sdpa(q, k, v, bias=np.broadcast_to(bloom, (6, 9, 9)), is_causal=True))
        <= 1e-14
    )


def test_lower_right_decoding_step_matches_the_full_causal_row():
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((4, 10, 3)) for _ in range(3))
    slopes = refattn.alibi_slopes(4, rule="mpt")
    full = sdpa(q, k, v, bias=refattn.alibi_bias(slopes, 10, 10), is_causal=True)
    step = sdpa(
        q[:, -2:], k, v, is_causal=True, causal_alignment="lower_right",
        bias=refattn.alibi_bias(slopes, 2, 10, causal_alignment="lower_right"),
    )  # fmt: skip
    assert rel_err(step, full[:, -2:]) <= 1e-14


def test_symmetric_bias_and_backends(xp):
    slopes = refattn.alibi_slopes(3, xp=xp, dtype=xp.float32)
    bias = refattn.alibi_bias(slopes, 4, 6, symmetric=True)
    assert bias.dtype == xp.float32
    s = to_numpy(slopes).astype(np.float64)
    i, j = np.arange(4)[:, None], np.arange(6)[None, :]
    assert rel_err(to_numpy(bias), -s[:, None, None] * np.abs(i - j)) <= 1e-7


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: refattn.alibi_slopes(0), ValueError, "n_heads must be an int >= 1"),
        (lambda: refattn.alibi_slopes(4, rule="t5"), ValueError, "rule must be"),
        (lambda: refattn.alibi_slopes(4, max_bias=4.0), ValueError, "max_bias is MPT's"),
        (lambda: refattn.alibi_slopes(4, rule="mpt", max_bias=-1.0), ValueError, "max_bias"),
        (lambda: refattn.alibi_bias(np.ones((2, 2)), 3, 3), ValueError, "slopes must be a 1-D"),
        (lambda: refattn.alibi_bias(np.ones(2), 3, -1), ValueError, "n_k must be an int"),
    ],
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()
