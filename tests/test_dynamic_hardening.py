"""DynamicAttention rejects every call whose *result* would leave the float range, before any
state changes (the cases of the bad-input campaign in issue 23), and one dtype policy with the
ops: float32/float64 only, floating rows only."""

from __future__ import annotations

import numpy as np
import pytest

import refattn

BIG = 1.7e308  # twice is inf in float64


def _make(dtype=np.float64, **kw):
    rng = np.random.default_rng(0)
    Q, K, V = (rng.standard_normal(s).astype(dtype) for s in ((5, 4), (6, 4), (6, 3)))
    return refattn.DynamicAttention(Q, K, V, **kw), (Q, K, V)


def _state(att):
    """Everything a user can observe, without changing the state."""
    return (
        att.shape,
        att.pending,
        {k: v for k, v in att.stats.items() if k != "queries"},
        [[att.query(i, j) for j in range(att.shape[3])] for i in range(att.shape[0])],
    )


CASES = [
    ("update_key", lambda a: a.update_key(1, 2, BIG), "delta"),
    (
        "update_keys duplicates",
        lambda a: a.update_keys(np.array([0, 0]), np.array([1, 1]), np.array([1e308, 1e308])),
        "deltas",
    ),
    ("update_value", lambda a: a.update_value(2, 0, BIG), "delta"),
    (
        "update_values duplicates",
        lambda a: a.update_values(np.array([3, 3]), np.array([2, 2]), np.array([BIG, BIG])),
        "deltas",
    ),
    ("update_query", lambda a: a.update_query(0, 3, BIG), "delta"),
    ("append huge key", lambda a: a.append(np.full(4, 1e160), np.ones(3)), "k_row"),
    ("append huge value", lambda a: a.append(np.ones(4), np.full(3, 1e306)), "v_row"),
]


@pytest.mark.parametrize(("name", "call", "argument"), CASES, ids=[c[0] for c in CASES])
def test_overflowing_updates_are_rejected_and_change_nothing(name, call, argument):
    att, _ = _make()
    before = _state(att)
    with pytest.raises(ValueError, match=argument) as info:
        call(att)
    assert "nothing was changed" in str(info.value)
    assert _state(att) == before
    out = att.output()
    assert np.all(np.isfinite(out)) and att.approximation_error() <= 1e-12


def test_the_second_of_two_updates_is_the_one_rejected():
    att, (Q, _, _) = _make()
    # sqrt(float64 max) bounds the scores; each delta alone keeps them at 0.6 of that
    delta = 0.6 * np.sqrt(np.finfo(np.float64).max) / np.abs(Q[:, 2]).max()
    att.update_key(1, 2, delta)
    before = _state(att)
    with pytest.raises(ValueError, match="delta would let the scores"):
        att.update_key(1, 2, delta)  # K[1, 2] = 2 delta: scores up to 1.2 sqrt(max)
    assert _state(att) == before


def test_large_but_representable_updates_stay_exact():
    att, (Q, K, V) = _make()
    att.update_key(1, 2, 1e3)
    att.update_value(2, 0, -1e100)
    att.update_query(0, 3, 50.0)
    K, V, Q = K.copy(), V.copy(), Q.copy()
    K[1, 2] += 1e3
    V[2, 0] -= 1e100
    Q[0, 3] += 50.0
    S = Q @ K.T
    W = np.exp(S - S.max(axis=1, keepdims=True))
    ref = (W / W.sum(axis=1, keepdims=True)) @ V
    got = att.output()
    assert np.max(np.abs(got - ref) / np.max(np.abs(ref), axis=1, keepdims=True)) <= 1e-12


@pytest.mark.parametrize(
    ("kwargs", "scale_q"),
    [({"scale": 1e300}, 1.0), ({}, 1e200), ({"scale": 1e-300}, 1e200)],
    ids=["scale 1e300", "Q and K of 1e200", "Q K^T of 1e400 before a tiny scale"],
)
def test_construction_whose_scores_overflow_is_rejected(kwargs, scale_q):
    rng = np.random.default_rng(1)
    Q, K, V = (rng.standard_normal(s) for s in ((3, 2), (4, 2), (4, 2)))
    with pytest.raises(ValueError, match="scores") as info:
        refattn.DynamicAttention(Q * scale_q, K * scale_q, V, **kwargs)
    assert "nothing was changed" in str(info.value)


def test_construction_with_large_finite_scores_is_exact():
    rng = np.random.default_rng(2)
    Q, K, V = (rng.standard_normal(s) for s in ((3, 2), (4, 2), (4, 2)))
    att = refattn.DynamicAttention(Q * 1e60, K * 1e60, V, scale=1e-110)  # scores near 1e10
    S = 1e-110 * ((Q * 1e60) @ (K * 1e60).T)
    W = np.exp(S - S.max(axis=1, keepdims=True))
    ref = (W / W.sum(axis=1, keepdims=True)) @ V
    assert np.max(np.abs(att.output() - ref)) <= 1e-12 * np.max(np.abs(V))


@pytest.mark.parametrize("dtype", [np.float16, np.int64, np.bool_])
def test_only_float32_and_float64_states(dtype):
    Q = np.ones((3, 2), dtype=dtype)
    with pytest.raises(TypeError, match="float32 or float64"):
        refattn.DynamicAttention(Q, Q, Q)


@pytest.mark.parametrize(
    ("k_row", "message"),
    [
        ([True, False, True, True], "must hold floating-point numbers, got a sequence of bools"),
        ([1, 2, 3, 4], "must hold floating-point numbers, got a sequence of integers"),
        (np.array([1, 2, 3, 4]), r"must be real floating \(float64\)"),
        (np.array([True, False, True, True]), r"must be real floating \(float64\)"),
    ],
)
def test_rows_must_be_floating(k_row, message):
    att, _ = _make()
    before = _state(att)
    with pytest.raises(TypeError, match=f"k_row {message}"):
        att.append(k_row, [1.0, 2.0, 3.0])
    assert _state(att) == before


def test_float32_state_checks_against_float32_range():
    att, _ = _make(np.float32)
    with pytest.raises(ValueError, match="delta"):
        att.update_value(0, 0, 1e37)  # 6 rows * e^16 * 1e37 > float32 max
    att.update_value(0, 0, 10.0)
    assert np.all(np.isfinite(att.output()))
