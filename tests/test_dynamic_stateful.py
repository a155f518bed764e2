"""DynamicAttention under Hypothesis' stateful testing (issue 23).

A ``RuleBasedStateMachine`` interleaves key, value and query updates (single and batched, with
duplicate indices), appends, removals, queries and calls that must be rejected; a plain NumPy
model ``(Q, K, V)`` follows the accepted ones. After every step the structure's answer equals a
fresh float64 recompute of ``softmax(scale Q Kᵀ) V``, and a rejected call changes nothing.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import refattn

TOL = 1e-11
DELTA = st.floats(-2.0, 2.0, allow_nan=False)


def _reference(Q: np.ndarray, K: np.ndarray, V: np.ndarray, scale: float) -> np.ndarray:
    s = scale * (Q @ K.T)
    p = np.exp(s - s.max(axis=1, keepdims=True))
    return (p / p.sum(axis=1, keepdims=True)) @ V


class DynamicMachine(RuleBasedStateMachine):
    @initialize(
        seed=st.integers(0, 2**16),
        n_q=st.integers(1, 5),
        n_k=st.integers(1, 6),
        threshold=st.sampled_from([None, 1, 3, 50]),
    )
    def start(self, seed: int, n_q: int, n_k: int, threshold: int | None) -> None:
        rng = np.random.default_rng(seed)
        self.scale = 0.5
        self.Q, self.K = rng.standard_normal((n_q, 4)), rng.standard_normal((n_k, 4))
        self.V = rng.standard_normal((n_k, 3))
        self.att = refattn.DynamicAttention(
            self.Q, self.K, self.V, scale=self.scale, threshold=threshold
        )

    # ---- accepted calls, mirrored in the model
    @rule(data=st.data(), delta=DELTA)
    def update_key(self, data: st.DataObject, delta: float) -> None:
        i = data.draw(st.integers(0, self.K.shape[0] - 1))
        j = data.draw(st.integers(0, 3))
        self.att.update_key(i, j, delta)
        self.K[i, j] += delta

    @rule(data=st.data())
    def update_keys(self, data: st.DataObject) -> None:
        m = data.draw(st.integers(1, 4))
        rows = np.array(
            data.draw(st.lists(st.integers(0, self.K.shape[0] - 1), min_size=m, max_size=m))
        )
        cols = np.array(data.draw(st.lists(st.integers(0, 3), min_size=m, max_size=m)))
        deltas = np.array(data.draw(st.lists(DELTA, min_size=m, max_size=m)))
        self.att.update_keys(rows, cols, deltas)
        np.add.at(self.K, (rows, cols), deltas)  # duplicates add up

    @rule(data=st.data(), delta=DELTA)
    def update_value(self, data: st.DataObject, delta: float) -> None:
        i = data.draw(st.integers(0, self.V.shape[0] - 1))
        j = data.draw(st.integers(0, 2))
        self.att.update_value(i, j, delta)
        self.V[i, j] += delta

    @rule(data=st.data())
    def update_values(self, data: st.DataObject) -> None:
        m = data.draw(st.integers(1, 4))
        rows = np.array(
            data.draw(st.lists(st.integers(0, self.V.shape[0] - 1), min_size=m, max_size=m))
        )
        cols = np.array(data.draw(st.lists(st.integers(0, 2), min_size=m, max_size=m)))
        deltas = np.array(data.draw(st.lists(DELTA, min_size=m, max_size=m)))
        self.att.update_values(rows, cols, deltas)
        np.add.at(self.V, (rows, cols), deltas)

    @rule(data=st.data(), delta=DELTA)
    def update_query(self, data: st.DataObject, delta: float) -> None:
        i = data.draw(st.integers(0, self.Q.shape[0] - 1))
        j = data.draw(st.integers(0, 3))
        self.att.update_query(i, j, delta)
        self.Q[i, j] += delta

    @rule(k=st.lists(DELTA, min_size=4, max_size=4), v=st.lists(DELTA, min_size=3, max_size=3))
    def append(self, k: list[float], v: list[float]) -> None:
        self.att.append(np.array(k), np.array(v))
        self.K = np.vstack([self.K, k])
        self.V = np.vstack([self.V, v])

    @precondition(lambda self: self.K.shape[0] > 1)
    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        r = data.draw(st.integers(0, self.K.shape[0] - 1))
        self.att.remove(r)
        self.K = np.delete(self.K, r, axis=0)
        self.V = np.delete(self.V, r, axis=0)

    @rule(data=st.data())
    def query(self, data: st.DataObject) -> None:
        i = data.draw(st.integers(0, self.Q.shape[0] - 1))
        j = data.draw(st.integers(0, 2))
        want = _reference(self.Q, self.K, self.V, self.scale)[i, j]
        assert abs(self.att.query(i, j) - want) <= TOL * max(1.0, abs(want))

    @rule()
    def output(self) -> None:
        """The flushed full output (the invariant reads the lazy one)."""
        want = _reference(self.Q, self.K, self.V, self.scale)
        got = np.asarray(self.att.output())
        assert got.shape == want.shape
        assert np.max(np.abs(got - want)) <= TOL * max(1.0, float(np.max(np.abs(want))))
        assert self.att.pending == 0

    # ---- rejected calls: a clear error and no change
    @rule(
        call=st.sampled_from(
            [
                lambda a, n: a.update_key(n, 0, 1.0),  # one past the last key
                lambda a, n: a.update_value(0, 3, 1.0),  # d_v = 3
                lambda a, n: a.update_key(0, 0, float("nan")),
                lambda a, n: a.update_query(0, 0, 1.7e308),  # scores would overflow
                lambda a, n: a.update_keys(np.array([0, n]), np.array([0, 0]), np.ones(2)),
                lambda a, n: a.append(np.ones(4), np.full(3, np.inf)),
                lambda a, n: a.append([True] * 4, np.ones(3)),
                lambda a, n: a.remove(n),
            ]
        )
    )
    def rejected(self, call) -> None:
        before = (self.att.shape, self.att.pending, self._lazy())
        with pytest.raises((ValueError, TypeError, IndexError)):
            call(self.att, self.K.shape[0])
        assert (self.att.shape, self.att.pending, self._lazy()) == before

    def _lazy(self) -> list[float]:
        """Every output entry through ``query``, which reads pending updates without flushing."""
        return [self.att.query(i, j) for i in range(self.Q.shape[0]) for j in range(3)]

    @invariant()
    def exact(self) -> None:
        if not hasattr(self, "att"):
            return
        want = _reference(self.Q, self.K, self.V, self.scale).ravel()
        got = np.array(self._lazy())
        assert np.max(np.abs(got - want)) <= TOL * max(1.0, float(np.max(np.abs(want))))


DynamicMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=30, deadline=None)
test_dynamic_attention_stateful = DynamicMachine.TestCase


@pytest.mark.slow
def test_dynamic_attention_stateful_long() -> None:
    """The same machine, longer runs (``pytest -m slow``)."""
    from hypothesis.stateful import run_state_machine_as_test

    run_state_machine_as_test(
        DynamicMachine, settings=settings(max_examples=300, stateful_step_count=60, deadline=None)
    )
