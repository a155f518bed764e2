"""Pattern builders against the papers' set definitions, written row by row."""

from __future__ import annotations

import numpy as np
import pytest

from refattn.ops.sparse_patterns import (
    bigbird_pattern,
    combine_patterns,
    fixed_pattern,
    longformer_dilated_pattern,
    strided_pattern,
)


def from_sets(n, sets):
    keep = np.zeros((n, n), dtype=bool)
    for i in range(n):
        for j in sets(i):
            if 0 <= j < n:
                keep[i, j] = True
    return keep


@pytest.mark.parametrize(("n", "l"), [(8, 3), (13, 4), (5, 1)])
def test_strided(n, l):
    a1 = from_sets(n, lambda i: range(max(0, i - l), i + 1))
    a2 = from_sets(n, lambda i: range(i, -1, -l))
    assert np.array_equal(strided_pattern(n, l, component="A1"), a1)
    assert np.array_equal(strided_pattern(n, l, component="A2"), a2)
    assert np.array_equal(strided_pattern(n, l), a1 | a2)


@pytest.mark.parametrize(("n", "l", "c"), [(8, 3, 1), (13, 4, 2), (9, 3, 3)])
def test_fixed(n, l, c):
    a1 = from_sets(n, lambda i: [j for j in range(i + 1) if j // l == i // l])
    a2 = from_sets(n, lambda i: [j for j in range(i + 1) if j % l in range(l - c, l)])
    assert np.array_equal(fixed_pattern(n, l, c, component="A1"), a1)
    assert np.array_equal(fixed_pattern(n, l, c, component="A2"), a2)
    assert np.array_equal(fixed_pattern(n, l, c), a1 | a2)


def test_combine():
    a, b = strided_pattern(6, 2), fixed_pattern(6, 3, 1)
    assert np.array_equal(combine_patterns([a, b]), a | b)
    assert np.array_equal(combine_patterns([a, b], how="heads"), np.stack([a, b]))


def test_bigbird():
    n, w, g, r = 12, 1, 2, 2
    keep = bigbird_pattern(n, w, g, r, seed=3)
    base = from_sets(n, lambda i: range(n) if i < g else [*range(i - w, i + w + 1), *range(g)])
    assert np.all(keep[base])
    extra = keep & ~base
    assert np.all(extra[:g] == 0) and np.all(extra[g:].sum(axis=1) == r)
    assert np.array_equal(keep, bigbird_pattern(n, w, g, r, seed=3))
    assert not np.array_equal(keep, bigbird_pattern(n, w, g, r, seed=4))


@pytest.mark.parametrize("causal", [False, True])
def test_longformer_dilated(causal):
    n, w, d, g = 14, 2, 3, 1
    ts = range(-w, 1) if causal else range(-w, w + 1)
    ref = from_sets(n, lambda i: range(n) if i < g else [*(i + d * t for t in ts), *range(g)])
    if causal:
        ref &= np.tril(np.ones((n, n), dtype=bool))
    assert np.array_equal(longformer_dilated_pattern(n, w, d, g, causal=causal), ref)
    heads = longformer_dilated_pattern(n, w, [1, d], g, causal=causal)
    assert heads.shape == (2, n, n) and np.array_equal(heads[1], ref)
