"""Soak: 10⁶ updates keep the maintained state within 1e-10 of a fresh recompute.

Slow (about a minute on two cores): run with ``pytest -m slow tests/test_dynamic_soak.py``.
"""

from __future__ import annotations

import numpy as np
import pytest

from refattn.dynamic import DynamicAttention


def reference(Q, K, V):
    S = Q @ K.T
    S = S - S.max(axis=1, keepdims=True)
    E = np.exp(S)
    return (E @ V) / E.sum(axis=1, keepdims=True)


def row_rel_err(got, ref):
    return float((np.abs(got - ref).max(axis=1) / np.abs(ref).max(axis=1)).max())


@pytest.mark.slow
def test_soak_million_updates_adaptive():
    """10⁶ updates, batched and single, with queries, under the adaptive threshold: many
    incremental flushes (batches cover a small part of the keys), never a fallback rebuild."""
    rng = np.random.default_rng(2024)
    n_q, n_k, d, d_v = 64, 4000, 8, 8
    Q, K, V = rng.random((n_q, d)), rng.random((n_k, d)), rng.random((n_k, d_v))
    att = DynamicAttention(Q, K, V)
    K, V = K.copy(), V.copy()
    total, m, singles = 0, 50, 20
    checks = []
    while total < 1_000_000:
        rows, cols, deltas = rng.integers(0, n_k, m), rng.integers(0, d, m), rng.normal(0, 1e-2, m)
        att.update_keys(rows, cols, deltas)
        np.add.at(K, (rows, cols), deltas)
        rows, cols, deltas = rng.integers(0, n_k, m), rng.integers(0, d_v, m), rng.normal(0, 1, m)
        att.update_values(rows, cols, deltas)
        np.add.at(V, (rows, cols), deltas)
        for _ in range(singles):
            r, c, x = int(rng.integers(n_k)), int(rng.integers(d)), float(rng.normal(0, 1e-2))
            att.update_key(r, c, x)
            K[r, c] += x
            att.query(int(rng.integers(n_q)), int(rng.integers(d_v)))
        before = total
        total += 2 * m + singles
        if total // 100_000 > before // 100_000:
            checks.append(att.approximation_error())
            assert checks[-1] <= 1e-10, (total, checks[-1])
    stats = att.stats
    assert stats["updates"] == total
    assert len(checks) == 10
    assert stats["flushes"] > 1000  # incremental flushes, not full recomputes
    assert stats["columns_recomputed"] < 0.1 * stats["flushes"] * n_k
    assert row_rel_err(att.output(), reference(Q, K, V)) <= 1e-10


@pytest.mark.slow
def test_soak_flush_every_update():
    """Threshold 1: 10⁵ incremental flushes, the worst case for accumulated rounding."""
    rng = np.random.default_rng(7)
    n_q, n_k, d, d_v = 48, 40, 8, 8
    Q, K, V = rng.standard_normal((n_q, d)), rng.standard_normal((n_k, d)), rng.random((n_k, d_v))
    att = DynamicAttention(Q, K, V, threshold=1)
    K, V = K.copy(), V.copy()
    for step in range(100_000):
        r = int(rng.integers(n_k))
        x = float(rng.normal(0, 1e-2))
        if step % 2:
            c = int(rng.integers(d))
            att.update_key(r, c, x)
            K[r, c] += x
        else:
            c = int(rng.integers(d_v))
            att.update_value(r, c, x)
            V[r, c] += x
        if step % 10_000 == 9_999:
            assert att.approximation_error() <= 1e-10
    stats = att.stats
    assert stats["flushes"] == 100_000
    # the drift control had to act: about 2-3 u of bound per flush against 4096 u
    assert stats["rows_refreshed"] + stats["rebuilds"] > 0
    assert row_rel_err(att.output(), reference(Q, K, V)) <= 1e-12
