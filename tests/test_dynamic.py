"""DynamicAttention: exact to rounding after every operation, on every backend.

The reference is a fresh float64 ``softmax(scale·QKᵀ)V`` computed on the host from a mirror of
Q, K and V that receives the same operations (applied one by one, in plain NumPy). Errors are
relative per query row in the infinity norm, ``max_j |got - ref| / max_j |ref|``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse
from array_api_compat import array_namespace
from conftest import to_numpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refattn.dynamic import DynamicAttention

RTOL = 1e-12


def reference(Q, K, V, scale=1.0):
    S = scale * (Q @ K.T)
    S = S - S.max(axis=1, keepdims=True)
    E = np.exp(S)
    return (E @ V) / E.sum(axis=1, keepdims=True)


def row_rel_err(got, ref):
    got = np.asarray(to_numpy(got), dtype=np.float64)
    return float((np.abs(got - ref).max(axis=-1) / np.abs(ref).max(axis=-1)).max())


class Mirror:
    """Host float64 copies of Q, K, V that receive the same operations, one at a time."""

    def __init__(self, Q, K, V, scale=1.0, xp=None):
        self.Q, self.K, self.V = (np.array(to_numpy(a), dtype=np.float64) for a in (Q, K, V))
        self.scale = scale
        self.xp = xp if xp is not None else array_namespace(np.empty(0))

    def out(self):
        return reference(self.Q, self.K, self.V, self.scale)

    def weights(self, i):
        s = self.scale * (self.K @ self.Q[i])
        e = np.exp(s - s.max())
        return e / e.sum()


def make(xp, n_q=9, n_k=7, d=4, d_v=3, *, seed=0, dtype="float64", **kwargs):
    rng = np.random.default_rng(seed)
    Q, K, V = (rng.standard_normal(s) for s in ((n_q, d), (n_k, d), (n_k, d_v)))
    arrays = [xp.asarray(a, dtype=getattr(xp, dtype)) for a in (Q, K, V)]
    mirror = Mirror(Q, K, V, kwargs.get("scale", 1.0), xp)
    return DynamicAttention(*arrays, **kwargs), mirror, arrays


def apply(att, mir, op, rng):
    """Apply one random operation of kind ``op`` to both; return a description."""
    n_q, n_k, d, d_v = att.shape
    if op == "key":
        i, j, x = int(rng.integers(n_k)), int(rng.integers(d)), float(rng.standard_normal())
        att.update_key(i, j, x)
        mir.K[i, j] += x
    elif op == "value":
        i, j, x = int(rng.integers(n_k)), int(rng.integers(d_v)), float(rng.standard_normal())
        att.update_value(i, j, x)
        mir.V[i, j] += x
    elif op in ("keys", "values"):
        m = int(rng.integers(1, 9))
        width = d if op == "keys" else d_v
        rows = rng.integers(0, n_k, m)
        cols = rng.integers(0, width, m)
        rows[-1], cols[-1] = rows[0], cols[0]  # always a repeated pair
        deltas = rng.standard_normal(m)
        if op == "keys":
            att.update_keys(rows, cols, deltas)
            np.add.at(mir.K, (rows, cols), deltas)
        else:
            att.update_values(rows.tolist(), cols.tolist(), deltas.tolist())
            np.add.at(mir.V, (rows, cols), deltas)
    elif op == "query_update":
        i, j, x = int(rng.integers(n_q)), int(rng.integers(d)), float(rng.standard_normal())
        att.update_query(i, j, x)
        mir.Q[i, j] += x
    elif op == "append":
        k, v = rng.standard_normal(d), rng.standard_normal(d_v)
        xp = mir.xp
        att.append(xp.asarray(k, dtype=att.dtype), xp.asarray(v, dtype=att.dtype))
        mir.K = np.vstack([mir.K, k])
        mir.V = np.vstack([mir.V, v])
    elif op == "remove":
        if n_k > 2:
            r = int(rng.integers(n_k))
            att.remove(r)
            mir.K = np.delete(mir.K, r, axis=0)
            mir.V = np.delete(mir.V, r, axis=0)
    elif op == "flush":
        att.flush()
    return op


OPS = ["key", "value", "keys", "values", "query_update", "append", "remove", "flush"]
OP_WEIGHTS = np.array([6, 6, 3, 3, 1, 1, 1, 1], dtype=float)


def check_exact(att, mir, rng, *, with_output):
    ref = mir.out()
    n_q, _, _, d_v = att.shape
    for i, j in ((0, 0), (n_q - 1, d_v - 1), (int(rng.integers(n_q)), int(rng.integers(d_v)))):
        got = att.query(i, j)
        assert isinstance(got, float)
        assert abs(got - ref[i, j]) <= RTOL * np.abs(ref[i]).max(), (i, j, got, ref[i, j])
    i = int(rng.integers(n_q))
    w = att.weights(i)
    assert row_rel_err(w, mir.weights(i)) <= RTOL
    if with_output:
        assert row_rel_err(att.output(), ref) <= RTOL


# ------------------------------------------------------------------------------------------
# long random streams
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("threshold", [1, 3, 1000, None])
def test_random_stream_exact_after_every_operation(xp, threshold):
    att, mir, _ = make(xp, threshold=threshold, seed=1)
    rng = np.random.default_rng(threshold or 7)
    expected = dict.fromkeys(["key_updates", "value_updates", "query_updates", "appends"], 0)
    n_ops = 160 if "strict" not in xp.__name__ else 90
    for step in range(n_ops):
        before = att.stats
        op = apply(att, mir, rng.choice(OPS, p=OP_WEIGHTS / OP_WEIGHTS.sum()), rng)
        after = att.stats
        for name in expected:
            expected[name] += after[name] - before[name]
        if op in ("key", "value", "query_update", "append"):
            name = {"key": "key_updates", "value": "value_updates"}.get(op, f"{op}s")
            assert after[name] == before[name] + 1
        check_exact(att, mir, rng, with_output=step % 15 == 14)
        if threshold is not None:
            assert att.pending < threshold
    stats = att.stats
    assert stats["updates"] == sum(expected[n] for n in expected if n.endswith("updates"))
    assert stats["flushes"] > 0
    out = att.output()
    assert array_namespace(out) is array_namespace(xp.asarray(0.0))
    assert out.dtype == xp.float64
    assert tuple(out.shape) == (att.shape[0], att.shape[3])
    assert att.approximation_error() <= RTOL


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=st.lists(
        st.tuples(st.sampled_from(OPS), st.integers(0, 2**32 - 1)), min_size=1, max_size=40
    ),
    threshold=st.sampled_from([1, 2, 5, 64, None]),
    scale=st.sampled_from([1.0, 0.5, 3.0]),
)
def test_hypothesis_operation_sequences(ops, threshold, scale):
    xp = array_namespace(np.empty(0))
    att, mir, _ = make(xp, n_q=5, n_k=4, d=3, d_v=2, threshold=threshold, scale=scale, seed=3)
    for op, seed in ops:
        rng = np.random.default_rng(seed)
        apply(att, mir, op, rng)
        check_exact(att, mir, rng, with_output=False)
    assert row_rel_err(att.output(), mir.out()) <= RTOL


def test_query_is_exact_without_flushing(xp):
    att, mir, _ = make(xp, n_q=30, n_k=25, d=5, d_v=4, threshold=10_000, seed=2)
    rng = np.random.default_rng(2)
    for _ in range(40):
        apply(att, mir, rng.choice(["key", "value", "keys", "values"]), rng)
    pending, stats = att.pending, att.stats
    assert pending > 40
    ref = mir.out()
    for i in range(0, 30, 7):
        for j in range(4):
            assert abs(att.query(i, j) - ref[i, j]) <= RTOL * np.abs(ref[i]).max()
        assert row_rel_err(att.weights(i), mir.weights(i)) <= RTOL
    after = att.stats
    assert att.pending == pending
    assert after["flushes"] == stats["flushes"] == 0
    assert after["columns_recomputed"] == 0
    assert after["queries"] == stats["queries"] + 4 * 5 + 5


@pytest.mark.parametrize("overlap", [False, True])
def test_query_with_many_pending_terms(xp, overlap):
    """More than 64 correction terms: the array path of the query (the host path below it)."""
    att, mir, _ = make(xp, n_q=20, n_k=120, d=4, d_v=2, threshold=10**6, seed=17)
    rng = np.random.default_rng(17)
    rows = rng.permutation(120)[:90]
    cols = rng.integers(0, 4, 90)
    deltas = 0.3 * rng.standard_normal(90)
    att.update_keys(rows, cols, deltas)
    np.add.at(mir.K, (rows, cols), deltas)
    vrows = rows[:70] if overlap else rng.permutation(120)[:70]  # with or without K updates
    vdeltas = rng.standard_normal(70)
    att.update_values(vrows, np.zeros(70, dtype=np.int64), vdeltas)
    np.add.at(mir.V, (vrows, np.zeros(70, dtype=np.int64)), vdeltas)
    att.update_key(int(rows[0]), 1, 25.0)  # and a shift-raising one, so that f < 1
    mir.K[rows[0], 1] += 25.0
    ref = mir.out()
    for i in range(20):
        for j in range(2):
            assert abs(att.query(i, j) - ref[i, j]) <= RTOL * np.abs(ref[i]).max()
    assert att.pending == 161
    assert row_rel_err(att.output(), ref) <= RTOL


def test_flush_recomputes_only_touched_columns(xp):
    att, mir, _ = make(xp, n_q=12, n_k=20, d=4, d_v=3, threshold=1000)
    att.update_keys([3, 3, 7, 11, 3], [0, 1, 2, 0, 0], [0.1, 0.2, -0.3, 0.4, 0.5])
    att.update_value(5, 1, 2.0)
    assert att.pending == 6
    att.flush()
    assert att.pending == 0
    stats = att.stats
    assert stats["flushes"] == 1
    assert stats["columns_recomputed"] == 3  # rows 3, 7 and 11 of K
    assert stats["rebuilds"] == 0
    np.add.at(mir.K, ([3, 3, 7, 11, 3], [0, 1, 2, 0, 0]), [0.1, 0.2, -0.3, 0.4, 0.5])
    mir.V[5, 1] += 2.0
    assert row_rel_err(att.output(), mir.out()) <= RTOL


def test_repeated_pairs_accumulate(xp):
    att, mir, _ = make(xp, threshold=1000)
    twin, _, _ = make(xp, threshold=1000)
    att.update_keys([2, 2, 2], [1, 1, 1], [0.25, 0.5, -0.125])
    att.update_values(xp.asarray([4, 4]), xp.asarray([0, 0]), xp.asarray([1.0, 2.0]))
    twin.update_key(2, 1, 0.625)
    twin.update_value(4, 0, 3.0)
    mir.K[2, 1] += 0.625
    mir.V[4, 0] += 3.0
    ref = mir.out()
    for i in range(att.shape[0]):
        assert abs(att.query(i, 0) - ref[i, 0]) <= RTOL * np.abs(ref[i]).max()
    assert row_rel_err(att.output(), ref) <= RTOL
    assert row_rel_err(twin.output(), ref) <= RTOL


def test_fixed_threshold_flushes_at_the_threshold(xp):
    att, _, _ = make(xp, threshold=5)
    assert att.threshold == 5
    for t in range(4):
        att.update_value(t, 0, 1.0)
    assert att.pending == 4
    assert att.stats["flushes"] == 0
    att.update_key(0, 0, 1.0)
    assert att.pending == 0
    assert att.stats["flushes"] == 1
    att.update_keys([0, 1, 2, 3, 4, 5, 6], [0] * 7, [0.1] * 7)  # a batch past the threshold
    assert att.pending == 0
    assert att.stats["flushes"] == 2
    assert att.threshold == 5


def test_caller_arrays_are_not_modified(xp):
    att, mir, arrays = make(xp, threshold=2)
    before = [to_numpy(a).copy() for a in arrays]
    rng = np.random.default_rng(5)
    for _ in range(30):
        apply(att, mir, rng.choice(OPS), rng)
    att.output()
    att.rebuild()
    for a, b in zip(arrays, before, strict=True):
        np.testing.assert_array_equal(to_numpy(a), b)
    out = att.output()
    out[0, 0] = 1e9  # the returned output is the caller's, not the state
    assert abs(att.query(0, 0) - mir.out()[0, 0]) <= RTOL * np.abs(mir.out()[0]).max()


# ------------------------------------------------------------------------------------------
# streaming: append, remove, update_query
# ------------------------------------------------------------------------------------------


def test_remove_renumbers_pending_updates(xp):
    att, mir, _ = make(xp, n_k=8, threshold=1000)
    att.update_key(2, 0, 1.5)  # dropped with row 2
    att.update_key(5, 1, -0.5)  # becomes row 4
    att.update_value(7, 2, 3.0)  # becomes row 6
    mir.K[5, 1] += -0.5
    mir.V[7, 2] += 3.0
    att.remove(2)
    mir.K = np.delete(mir.K, 2, axis=0)
    mir.V = np.delete(mir.V, 2, axis=0)
    assert att.shape[1] == 7
    assert att.pending == 2
    ref = mir.out()
    for i in range(att.shape[0]):
        assert abs(att.query(i, 2) - ref[i, 2]) <= RTOL * np.abs(ref[i]).max()
    assert row_rel_err(att.output(), ref) <= RTOL


def test_append_grows_and_removing_the_dominant_key_stays_exact(xp):
    att, mir, _ = make(xp, n_q=6, n_k=3, d=2, d_v=2, threshold=3)
    rng = np.random.default_rng(11)
    for t in range(40):  # past several capacity doublings
        k, v = rng.standard_normal(2) * 3, rng.standard_normal(2)
        att.append(xp.asarray(k), [float(v[0]), float(v[1])])
        mir.K = np.vstack([mir.K, k])
        mir.V = np.vstack([mir.V, v])
        if t % 3 == 0:
            apply(att, mir, "key", rng)
        check_exact(att, mir, rng, with_output=t % 10 == 0)
    # a key that dominates row 0 by about 100 nats, then removed: D_0 shrinks by ~e^95, and
    # the drift control must recompute the row instead of trusting D - A[:, r]
    att.append(xp.asarray(100.0 * mir.Q[0] / np.dot(mir.Q[0], mir.Q[0])), [5.0, -5.0])
    mir.K = np.vstack([mir.K, 100.0 * mir.Q[0] / np.dot(mir.Q[0], mir.Q[0])])
    mir.V = np.vstack([mir.V, [5.0, -5.0]])
    check_exact(att, mir, rng, with_output=True)
    att.remove(att.shape[1] - 1)
    mir.K, mir.V = mir.K[:-1], mir.V[:-1]
    check_exact(att, mir, rng, with_output=True)
    assert att.stats["appends"] == 41
    assert att.stats["removes"] == 1


def test_update_query_changes_one_row(xp):
    att, mir, _ = make(xp, threshold=1000)
    att.update_key(1, 1, 0.7)  # pending while the query row changes
    mir.K[1, 1] += 0.7
    att.update_query(4, 2, -1.25)
    mir.Q[4, 2] += -1.25
    assert att.pending == 1
    rng = np.random.default_rng(0)
    check_exact(att, mir, rng, with_output=True)
    assert att.stats["query_updates"] == 1


# ------------------------------------------------------------------------------------------
# stability
# ------------------------------------------------------------------------------------------


def overflow_case(xp):
    """Integer Q and K, so that scores are exact integers of about ±1000."""
    rng = np.random.default_rng(4)
    Q = rng.integers(-10, 11, (8, 4)).astype(np.float64)
    Q[:, 0] = 10.0
    K = rng.integers(-5, 6, (6, 4)).astype(np.float64)
    K[:, 0] = 100.0 * rng.choice([-1.0, 1.0], 6)  # scores ≈ ±1000
    K[2, 0] = 100.0  # key 2 scores about +1000 in every row
    V = rng.standard_normal((6, 3))
    return Q, K, V


def test_scores_of_pm1000_do_not_overflow(xp):
    Q, K, V = overflow_case(xp)
    ref_scores = Q @ K.T
    assert np.abs(ref_scores).max() > 900
    att = DynamicAttention(*(xp.asarray(a) for a in (Q, K, V)), threshold=2)
    mir = Mirror(Q, K, V)
    rng = np.random.default_rng(0)
    check_exact(att, mir, rng, with_output=True)
    # move key 2's scores by +40, +400, -900, +30 (threshold 2: a flush every other update);
    # +440 takes them far above every row's shift, so the rows are rescaled
    for delta in (4.0, 40.0, -90.0, 3.0):
        att.update_key(2, 0, delta)
        mir.K[2, 0] += delta
        check_exact(att, mir, rng, with_output=False)
    att.update_key(3, 0, 1.0)  # pending; output() flushes it
    mir.K[3, 0] += 1.0
    out = to_numpy(att.output())
    assert np.all(np.isfinite(out))
    assert row_rel_err(out, mir.out()) <= RTOL
    assert att.stats["rows_rescaled"] > 0
    # the dominant keys drop by 2000: the stored entries underflow relative to the old shift
    att.update_keys([0, 1, 2, 3, 4, 5], [0] * 6, [-200.0] * 6)
    np.add.at(mir.K, ([0, 1, 2, 3, 4, 5], [0] * 6), [-200.0] * 6)
    check_exact(att, mir, rng, with_output=True)
    assert att.approximation_error() <= RTOL


def test_one_row_rescaled_with_value_updates_pending(xp):
    """A K update that lifts one query row far above its shift, while V updates are pending in
    the same rows: the query must put the pending ΔV on the rescaled (new) weights."""
    rng = np.random.default_rng(15)
    Q, K, V = rng.standard_normal((8, 4)), rng.standard_normal((6, 4)), rng.standard_normal((6, 3))
    Q[:, 3] = 0.0
    Q[0, 3] = 10.0  # only row 0 sees column 3 of K
    att = DynamicAttention(*(xp.asarray(a) for a in (Q, K, V)), threshold=100)
    mir = Mirror(Q, K, V, xp=xp)
    att.update_value(2, 1, 3.0)
    att.update_value(4, 1, -2.0)
    att.update_key(2, 3, 50.0)  # row 0's score for key 2 rises by 500
    mir.V[2, 1] += 3.0
    mir.V[4, 1] += -2.0
    mir.K[2, 3] += 50.0
    ref = mir.out()
    for i in range(8):
        for j in range(3):
            assert abs(att.query(i, j) - ref[i, j]) <= RTOL * np.abs(ref[i]).max()
    assert att.stats["rows_rescaled"] == 0  # nothing flushed yet
    att.flush()
    assert att.stats["rows_rescaled"] == 1  # row 0 alone
    check_exact(att, mir, rng, with_output=True)


def test_multiplicative_updates_lift_only_the_rows_that_need_it(xp):
    """Small single-entry K updates take the multiplicative path, A'[:, r] = A[:, r]·exp(x).
    Benign ones rescale nothing; +10 twice on the top key of row 0 lifts row 0 alone."""
    rng = np.random.default_rng(16)
    Q, K, V = rng.standard_normal((8, 4)), rng.standard_normal((6, 4)), rng.standard_normal((6, 3))
    Q[:, 3] = 0.0
    Q[0, 3] = 1.0  # only row 0 sees column 3 of K
    K[2, :3] = 3.0 * Q[0, :3]  # key 2 is row 0's top key
    att = DynamicAttention(*(xp.asarray(a) for a in (Q, K, V)), threshold=1)
    mir = Mirror(Q, K, V, xp=xp)
    for _ in range(30):
        r, c, x = int(rng.integers(6)), int(rng.integers(4)), 0.05 * float(rng.standard_normal())
        att.update_key(r, c, x)
        mir.K[r, c] += x
    assert att.stats["rows_rescaled"] == 0
    assert att._st.key_err  # some columns were updated multiplicatively
    check_exact(att, mir, rng, with_output=True)
    for _ in range(2):
        att.update_key(2, 3, 10.0)
        mir.K[2, 3] += 10.0
        check_exact(att, mir, rng, with_output=False)
    assert att.stats["rows_rescaled"] == 1
    check_exact(att, mir, rng, with_output=True)


def test_multiplicative_error_budget():
    """Repeated multiplicative updates of one column of A spend its error budget (in units of
    u, one quarter of the tolerance); the column is then recomputed fresh and the budget reset.
    The budget follows its key row when an earlier row is removed."""
    xp = array_namespace(np.empty(0))
    att, mir, _ = make(xp, n_q=6, n_k=8, d=3, d_v=2, threshold=1, seed=18)
    budget = att._st.key_budget
    spent, resets = [], 0
    for _ in range(1200):
        att.update_key(5, 1, 1e-3)
        mir.K[5, 1] += 1e-3
        spent.append(att._st.key_err.get(5, 0.0))
        if len(spent) > 1 and spent[-1] < spent[-2]:
            resets += 1
    assert max(spent) <= budget
    assert max(spent) > budget / 2
    assert resets >= 2
    att.update_key(6, 0, 1e-3)
    att.update_key(5, 0, 1e-3)
    mir.K[6, 0] += 1e-3
    mir.K[5, 0] += 1e-3
    err5, err6 = att._st.key_err[5], att._st.key_err[6]
    att.remove(2)
    mir.K = np.delete(mir.K, 2, axis=0)
    mir.V = np.delete(mir.V, 2, axis=0)
    assert att._st.key_err == {4: err5, 5: err6}
    check_exact(att, mir, np.random.default_rng(0), with_output=True)


def test_rebuild_every_counts_flushes(xp):
    att, mir, _ = make(xp, threshold=1, rebuild_every=3)
    rng = np.random.default_rng(3)
    for _ in range(7):
        apply(att, mir, "value", rng)
    assert att.stats["flushes"] == 7
    assert att.stats["rebuilds"] == 2
    att.rebuild()
    assert att.stats["rebuilds"] == 3
    check_exact(att, mir, rng, with_output=True)


def test_drift_is_bounded_by_refreshing_rows():
    xp = array_namespace(np.empty(0))
    att, mir, _ = make(xp, n_q=6, n_k=5, d=3, d_v=2, threshold=1, seed=8)
    rng = np.random.default_rng(8)
    for _ in range(3000):  # one flush per update: the drift bound grows by ~2-3 u per flush
        apply(att, mir, "key" if rng.random() < 0.5 else "value", rng)
    stats = att.stats
    assert stats["flushes"] == 3000
    assert stats["rows_refreshed"] + stats["rebuilds"] > 0
    assert att.approximation_error() <= RTOL
    assert row_rel_err(att.output(), mir.out()) <= RTOL


def test_approximation_error_measures_the_state_and_changes_nothing(xp):
    att, mir, _ = make(xp, threshold=1000)
    rng = np.random.default_rng(9)
    for _ in range(10):
        apply(att, mir, rng.choice(["key", "value", "keys"]), rng)
    pending, stats = att.pending, att.stats
    err = att.approximation_error()
    assert 0.0 <= err <= RTOL
    assert att.pending == pending
    assert att.stats == stats
    check_exact(att, mir, rng, with_output=False)
    # a corrupted denominator is seen (it would not be by a fresh recompute of Q, K, V),
    # also with a pending update that the measurement applies to its copy
    att.flush()
    att._st.D = att._st.D * (1.0 + 1e-9)
    assert 0.5e-9 < att.approximation_error() < 2e-9
    att.update_value(0, 0, 0.5)
    assert 0.5e-9 < att.approximation_error() < 2e-9
    assert att.pending == 1


def test_float32_state(xp):
    att, mir, _ = make(xp, dtype="float32", threshold=4)
    rng = np.random.default_rng(6)
    for _ in range(40):
        apply(att, mir, rng.choice(["key", "value", "keys", "append", "remove"]), rng)
    ref = mir.out()
    out = att.output()
    assert out.dtype == xp.float32
    assert att.weights(0).dtype == xp.float32
    assert row_rel_err(out, ref) <= 2e-6
    assert abs(att.query(1, 1) - ref[1, 1]) <= 2e-6 * np.abs(ref[1]).max()
    assert 0.0 < att.approximation_error() <= 2e-6  # float32 rounding, against float64


# ------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["csr", "coo", "csc"])
@pytest.mark.parametrize("which", ["Q", "K", "V", "QKV"])
def test_sparse_inputs_equal_dense(fmt, which):
    rng = np.random.default_rng(12)
    dense = {
        "Q": rng.standard_normal((10, 6)) * (rng.random((10, 6)) < 0.4),
        "K": rng.standard_normal((8, 6)) * (rng.random((8, 6)) < 0.4),
        "V": rng.standard_normal((8, 3)) * (rng.random((8, 3)) < 0.5),
    }
    to_sparse = getattr(scipy.sparse, f"{fmt}_matrix")
    given_ = {name: to_sparse(a) if name in which else a for name, a in dense.items()}
    att = DynamicAttention(given_["Q"], given_["K"], given_["V"], threshold=3)
    ref_att = DynamicAttention(dense["Q"], dense["K"], dense["V"], threshold=3)
    mir = Mirror(dense["Q"], dense["K"], dense["V"])
    for step in range(12):
        i, j, x = step % 8, step % 3, 0.3 * (step - 5)
        for a in (att, ref_att):
            a.update_value(i, j, x)
            a.update_key((3 * step) % 8, step % 6, -x)
        mir.V[i, j] += x
        mir.K[(3 * step) % 8, step % 6] += -x
        for q in range(10):
            assert att.query(q, j) == ref_att.query(q, j)
    np.testing.assert_array_equal(att.output(), ref_att.output())
    assert row_rel_err(att.output(), mir.out()) <= RTOL
    # the sparse inputs are untouched
    for name in which:
        np.testing.assert_array_equal(given_[name].toarray(), dense[name])


def test_sparse_scipy_arrays_are_accepted():
    rng = np.random.default_rng(1)
    Q, K, V = rng.random((5, 3)), rng.random((4, 3)), rng.random((4, 2))
    att = DynamicAttention(scipy.sparse.csr_array(Q), K, scipy.sparse.coo_array(V))
    assert row_rel_err(att.output(), reference(Q, K, V)) <= RTOL


def test_scale(xp):
    att, mir, _ = make(xp, scale=1 / math.sqrt(4), threshold=2)
    rng = np.random.default_rng(13)
    for _ in range(10):
        apply(att, mir, rng.choice(OPS), rng)
        check_exact(att, mir, rng, with_output=False)


# ------------------------------------------------------------------------------------------
# errors: raised before any state changes
# ------------------------------------------------------------------------------------------


def state_of(att):
    """Everything observable, plus the internal arrays (to catch half-applied calls)."""
    arrays = {
        name: to_numpy(getattr(att._st, name)).copy()
        for name in ("Q", "K", "V", "At", "AVt", "D", "c", "drift")
    }
    st = att._st
    pend = (list(st.pk.rows), list(st.pk.vals), list(st.pv.rows), list(st.pv.vals))
    return att.pending, att.stats, att.shape, att.threshold, pend, arrays


def assert_same_state(a, b):
    assert a[:5] == b[:5]
    for name in a[5]:
        np.testing.assert_array_equal(a[5][name], b[5][name], err_msg=name)


BAD_CALLS = [
    ("update_key", (7, 0, 1.0), IndexError, r"update_key: i=7 is out of range for K with 7 rows"),
    ("update_key", (0, 4, 1.0), IndexError, r"j=4 is out of range for K with 4 columns"),
    ("update_key", (-1, 0, 1.0), IndexError, r"i=-1 is out of range"),
    ("update_key", (0.0, 0, 1.0), TypeError, r"i must be an integer, got 0\.0"),
    ("update_key", (True, 0, 1.0), TypeError, r"i must be an integer"),
    ("update_key", (0, 0, float("nan")), ValueError, r"delta must be finite"),
    ("update_key", (0, 0, float("inf")), ValueError, r"delta must be finite"),
    ("update_key", (0, 0, 1j), TypeError, r"delta must be a real number"),
    ("update_key", (0, 0, "1.0"), TypeError, r"delta must be a real number"),
    ("update_key", (0, 0, np.ones(2)), TypeError, r"delta must be a real number"),
    ("update_value", (0, 3, 1.0), IndexError, r"update_value: j=3 is out of range for V"),
    ("update_value", (9, 0, 1.0), IndexError, r"i=9 is out of range for V with 7 rows"),
    ("update_keys", ([0, 1], [0, 1], [1.0]), ValueError, r"same length, got 2, 2 and 1"),
    ("update_keys", ([0, 1, 7], [0, 1, 2], [1.0, 2, 3]), IndexError, r"rows\[2\]=7 is out"),
    ("update_keys", ([0, 1], [0, 9], [1.0, 2]), IndexError, r"cols\[1\]=9 is out of range"),
    ("update_keys", ([0, 1], [0, 1], [1.0, np.nan]), ValueError, r"deltas\[1\]=nan"),
    ("update_keys", ([0.0, 1.0], [0, 1], [1.0, 2]), TypeError, r"rows must hold integers"),
    ("update_keys", ([[0, 1]], [[0, 1]], [[1.0, 2]]), ValueError, r"rows must be 1-D"),
    ("update_keys", ([0], [0], [1 + 1j]), TypeError, r"deltas must be real numbers"),
    ("update_values", ([0, 1], [0, 1], [1.0, 2, 3]), ValueError, r"same length"),
    ("update_values", ([0, 1], [0, 3], [1.0, 2]), IndexError, r"cols\[1\]=3 is out of range"),
    ("update_query", (9, 0, 1.0), IndexError, r"update_query: i=9 is out of range for Q"),
    ("update_query", (0, 0, float("-inf")), ValueError, r"delta must be finite"),
    ("query", (9, 0), IndexError, r"query: i=9 is out of range"),
    ("query", (0, 3), IndexError, r"query: j=3 is out of range"),
    ("weights", (9,), IndexError, r"weights: i=9 is out of range"),
    ("remove", (7,), IndexError, r"remove: r=7 is out of range"),
    ("append", ([1.0, 2.0], [1.0, 2.0, 3.0]), ValueError, r"k_row must have shape \(4,\)"),
    ("append", ([1.0] * 4, [1.0, 2.0]), ValueError, r"v_row must have shape \(3,\)"),
    ("append", ([1.0, 2.0, np.nan, 0.0], [1.0] * 3), ValueError, r"k_row must be finite"),
    ("append", ([1.0] * 4, [1j] * 3), TypeError, r"v_row must be a real vector"),
]


@pytest.mark.parametrize(("method", "args", "exc", "match"), BAD_CALLS)
def test_errors_leave_the_state_unchanged(xp, method, args, exc, match):
    att, _, _ = make(xp, threshold=100)
    att.update_key(1, 1, 0.5)
    att.update_value(2, 2, -0.5)
    before = state_of(att)
    with pytest.raises(exc, match=match):
        getattr(att, method)(*args)
    assert_same_state(before, state_of(att))


def test_errors_on_a_float32_state(xp):
    att, _, _ = make(xp, dtype="float32", threshold=100)
    before = state_of(att)
    with pytest.raises(ValueError, match="delta must be finite in the state's dtype"):
        att.update_key(0, 0, 1e39)  # finite in float64, inf in float32
    with pytest.raises(ValueError, match=r"deltas\[0\]=1e\+39 is not finite"):
        att.update_values([0], [0], [1e39])
    with pytest.raises(TypeError, match="k_row must have the state's dtype float32"):
        att.append(xp.asarray([1.0] * 4, dtype=xp.float64), [1.0] * 3)
    assert_same_state(before, state_of(att))


def test_remove_the_last_key_is_refused(xp):
    att, _, _ = make(xp, n_k=2)
    att.remove(0)
    before = state_of(att)
    with pytest.raises(ValueError, match="cannot remove the only key"):
        att.remove(0)
    assert_same_state(before, state_of(att))


def _arrays(xp, shapes, dtype="float64"):
    rng = np.random.default_rng(0)
    return [xp.asarray(rng.standard_normal(s), dtype=getattr(xp, dtype)) for s in shapes]


@pytest.mark.parametrize(
    ("shapes", "kwargs", "exc", "match"),
    [
        (((5, 3), (4, 2), (4, 2)), {}, ValueError, r"Q shape \(5, 3\) .* and K shape \(4, 2\)"),
        (((5, 3), (4, 3), (6, 2)), {}, ValueError, r"same number of rows .* got 4 and 6"),
        (((5,), (4, 3), (4, 2)), {}, ValueError, r"Q must be 2-D, got shape \(5,\)"),
        (((5, 3), (0, 3), (0, 2)), {}, ValueError, r"must be non-empty"),
        (((5, 3), (4, 3), (4, 2)), {"threshold": 0}, ValueError, r"threshold must be None"),
        (((5, 3), (4, 3), (4, 2)), {"threshold": 2.5}, TypeError, r"threshold must be None"),
        (((5, 3), (4, 3), (4, 2)), {"rebuild_every": 0}, ValueError, r"rebuild_every must"),
        (((5, 3), (4, 3), (4, 2)), {"scale": float("nan")}, ValueError, r"scale must be finite"),
        (((5, 3), (4, 3), (4, 2)), {"scale": "1"}, TypeError, r"scale must be a real number"),
    ],
)
def test_constructor_errors(xp, shapes, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        DynamicAttention(*_arrays(xp, shapes), **kwargs)


def test_constructor_dtype_errors(xp):
    Q, K, V = _arrays(xp, ((5, 3), (4, 3), (4, 2)))
    with pytest.raises(TypeError, match="K must have a real floating dtype"):
        DynamicAttention(Q, xp.asarray(np.ones((4, 3), dtype=np.int64)), V)
    with pytest.raises(TypeError, match="inputs must share one floating dtype"):
        DynamicAttention(Q, K, xp.astype(V, xp.float32))
    bad = to_numpy(V).copy()
    bad[1, 1] = np.nan
    with pytest.raises(ValueError, match="V must be finite"):
        DynamicAttention(Q, K, xp.asarray(bad))


def test_constructor_complex_dtype():
    Q = np.ones((3, 2), dtype=np.complex128)
    with pytest.raises(TypeError, match="Q must have a real floating dtype"):
        DynamicAttention(Q, np.ones((2, 2)), np.ones((2, 2)))


# ------------------------------------------------------------------------------------------
# the adaptive threshold
# ------------------------------------------------------------------------------------------


def test_adaptive_threshold_follows_the_mix():
    xp = array_namespace(np.empty(0))
    att, mir, _ = make(xp, n_q=64, n_k=64, d=8, d_v=8, seed=10)
    rng = np.random.default_rng(10)
    # update-heavy: no queries at all, so batching as far as allowed is best
    for _ in range(300):
        apply(att, mir, "key", rng)
    update_heavy = att.threshold
    # query-heavy: 20 queries per K update, each of which would pay for the pending rows
    for _ in range(30):
        apply(att, mir, "key", rng)
        for _ in range(20):
            att.query(int(rng.integers(64)), int(rng.integers(8)))
    query_heavy = att.threshold
    # back to updates only
    for _ in range(300):
        apply(att, mir, "value", rng)
    value_heavy = att.threshold
    assert update_heavy >= 64
    assert query_heavy == 1
    assert value_heavy >= 64
    assert row_rel_err(att.output(), mir.out()) <= RTOL


def test_adaptive_threshold_in_between_for_a_mixed_stream():
    xp = array_namespace(np.empty(0))
    att, mir, _ = make(xp, n_q=512, n_k=512, d=16, d_v=16, seed=14)
    rng = np.random.default_rng(14)
    for _ in range(200):  # one query per update
        apply(att, mir, "key" if rng.random() < 0.5 else "value", rng)
        att.query(int(rng.integers(512)), int(rng.integers(16)))
    assert 1 < att.threshold < 1024


# ------------------------------------------------------------------------------------------
# the `refattn dynamic` demo
# ------------------------------------------------------------------------------------------


def _demo(argv):
    import argparse

    from refattn._dynamic_cli import add_arguments, run

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return run(parser.parse_args(argv))


def test_cli_demo_prints_exact_queries(capsys):
    n, d, rounds, seed = 40, 6, 120, 3
    assert _demo(["--n", str(n), "--d", str(d), "--rounds", str(rounds), "--seed", str(seed)]) == 0
    out, err = capsys.readouterr()
    # the same data and updates, replayed with plain NumPy
    rng = np.random.default_rng(seed)
    Q, K, V = (rng.random((n, d)) for _ in range(3))
    for _ in range(rounds):
        rows, cols, deltas = rng.integers(0, n, 10), rng.integers(0, d, 10), rng.normal(0, 0.1, 10)
        np.add.at(K, (rows, cols), deltas)
        rows, cols, deltas = rng.integers(0, n, 10), rng.integers(0, d, 10), rng.normal(0, 0.1, 10)
        np.add.at(V, (rows, cols), deltas)
    ref = reference(Q, K, V)
    lines = dict(line.split(" = ") for line in out.splitlines() if line.startswith("query("))
    assert set(lines) == {"query(0, 0)", f"query({n - 1}, {d - 1})"}  # (500, 25) clipped
    assert abs(float(lines["query(0, 0)"]) - ref[0, 0]) <= RTOL * np.abs(ref[0]).max()
    got = float(lines[f"query({n - 1}, {d - 1})"])
    assert abs(got - ref[n - 1, d - 1]) <= RTOL * np.abs(ref[n - 1]).max()
    assert "time per round (20 updates): lazy" in out
    assert "flushes:" in out and "rebuilds:" in out
    assert "approximation error:" in out and "(ok: limit 1e-10)" in out
    assert f"round {rounds}/{rounds}" in err  # progress on stderr


def test_cli_demo_rejects_bad_arguments(capsys):
    assert _demo(["--n", "0"]) == 2
    assert _demo(["--threshold", "0"]) == 2
    assert "refattn dynamic:" in capsys.readouterr().err


def test_cli_demo_fixed_threshold(capsys):
    assert _demo(["--n", "30", "--d", "4", "--rounds", "5", "--threshold", "7"]) == 0
    out = capsys.readouterr().out
    assert "threshold=7" in out
    assert "threshold now: 7" in out
