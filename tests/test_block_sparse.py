"""Block-sparse attention: equals SDPA under the equivalent element mask, cost follows nnz."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse
from conftest import randn, to_numpy

import refattn
from refattn import scaled_dot_product_attention as sdpa
from refattn.ops.block_sparse import block_sparse_attention, block_sparse_mask
from refattn.ops.sdpa import tiled
from refattn.ops.sparse_patterns import (
    bigbird_pattern,
    fixed_pattern,
    longformer_dilated_pattern,
    strided_pattern,
)


def element_mask(layout: np.ndarray, b: int, n: int, is_causal: bool) -> np.ndarray:
    """The definition entry by entry (independent of block_sparse_mask)."""
    heads = layout.shape[:-2]
    keep = np.zeros((*heads, n, n), dtype=bool)
    for idx in np.ndindex(*heads, n, n):
        *h, i, j = idx
        keep[idx] = layout[(*h, i // b, j // b)] and (j <= i or not is_causal)
    return keep


def rel(a, b) -> float:
    a, b = to_numpy(a), to_numpy(b)
    assert a.shape == b.shape and a.dtype == b.dtype
    finite = np.isfinite(b)
    assert np.array_equal(finite, np.isfinite(a))
    assert np.array_equal(a[~finite], b[~finite])  # -inf LSE of rows that see nothing
    diff = np.where(finite, a, 0.0) - np.where(finite, b, 0.0)
    return float(np.max(np.abs(diff)) / max(np.max(np.abs(b[finite])), 1.0))


CASES = [
    # q shape, kv heads, block, density, causal, per-head
    ((2, 2, 23, 4), 2, 5, 0.4, False, False),  # n = 23: the last block is short
    ((2, 2, 23, 4), 2, 5, 0.4, True, False),  # partial diagonal blocks
    ((1, 4, 17, 4), 2, 4, 0.5, True, True),  # GQA, one layout per query head
    ((1, 4, 16, 4), 1, 4, 0.3, False, True),  # MQA, per head, some rows see nothing
    ((12, 3), None, 3, 0.5, False, False),  # 2-D input
]


@pytest.mark.parametrize(("q_shape", "h_kv", "b", "density", "causal", "per_head"), CASES)
def test_equals_sdpa_with_the_element_mask(xp, q_shape, h_kv, b, density, causal, per_head):
    *lead, n, d = q_shape
    kv_lead = (*lead[:-1], h_kv) if lead else ()
    q = randn(xp, q_shape, seed=1)
    k = randn(xp, (*kv_lead, n, d), seed=2)
    v = randn(xp, (*kv_lead, n, d + 1), seed=3)
    d_out = randn(xp, (*q_shape[:-1], d + 1), seed=4)
    d_lse = randn(xp, tuple(q_shape[:-1]), seed=5)
    nb = -(-n // b)
    rng = np.random.default_rng(7)
    layout = rng.random((lead[-1], nb, nb) if per_head else (nb, nb)) < density
    layout[..., -1, :] = False  # the last block of rows sees nothing: the masked-row policy
    mask = element_mask(layout, b, n, causal)
    assert np.array_equal(mask, block_sparse_mask(layout, b, n, is_causal=causal))
    gqa = bool(lead) and h_kv != lead[-1]
    (out, lse), pullback = refattn.vjp(
        block_sparse_attention,
        q,
        k,
        v,
        layout=layout,
        block_size=b,
        is_causal=causal,
        enable_gqa=gqa,
        return_lse=True,
    )
    (r_out, r_lse), r_pullback = refattn.vjp(
        sdpa, q, k, v, mask=xp.asarray(mask), return_lse=True, implementation="materialized"
    )
    assert rel(out, r_out) <= 1e-13 and rel(lse, r_lse) <= 1e-13
    assert np.all(to_numpy(out)[..., n - ((n - 1) % b + 1) :, :] == 0.0)
    assert np.all(np.isneginf(to_numpy(lse)[..., n - ((n - 1) % b + 1) :]))
    grads = pullback((d_out, d_lse))
    r_grads = r_pullback((d_out, d_lse))
    for g, r in zip(grads, r_grads, strict=True):
        assert rel(g, r) <= 1e-13
    assert np.all(to_numpy(grads[0])[..., n - ((n - 1) % b + 1) :, :] == 0.0)


def test_float32_stays_float32_and_is_close(xp):
    q, k, v = (randn(xp, (1, 2, 14, 4), seed=s, dtype="float32") for s in range(3))
    layout = np.tril(np.ones((4, 4), dtype=bool))
    out = block_sparse_attention(q, k, v, layout=layout, block_size=4, is_causal=True)
    assert out.dtype == xp.float32
    q64, k64, v64 = (xp.astype(x, xp.float64) for x in (q, k, v))
    ref = sdpa(q64, k64, v64, is_causal=True)
    assert rel(xp.astype(out, xp.float64), ref) <= 1e-5


def test_scipy_sparse_layout_equals_dense():
    q, k, v = (
        randn(refattn._backend.namespace(np.empty(0)), (1, 2, 10, 3), seed=s) for s in range(3)
    )
    dense = np.eye(4, dtype=bool) | np.eye(4, k=-1, dtype=bool)
    a = block_sparse_attention(q, k, v, layout=dense, block_size=3)
    b = block_sparse_attention(q, k, v, layout=scipy.sparse.csr_array(dense), block_size=3)
    np.testing.assert_array_equal(a, b)


def test_gradcheck():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 2, 7, 3)) for _ in range(3))
    layout = np.array([[1, 0, 1], [1, 1, 0], [0, 1, 1]], dtype=bool)
    assert refattn.gradcheck(
        block_sparse_attention, q, k, v, layout=layout, block_size=3, is_causal=True
    )


def test_torch_autograd_of_the_dense_masked_formula():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    q, k, v, d_out = (rng.standard_normal((2, 2, 13, 4)) for _ in range(4))
    layout = rng.random((2, 4, 4)) < 0.6
    layout[:, :, 0] = True
    out, pullback = refattn.vjp(block_sparse_attention, q, k, v, layout=layout, block_size=4)
    grads = pullback(d_out)
    tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
    keep = torch.tensor(element_mask(layout, 4, 13, False))[None]
    s = (tq @ tk.transpose(-1, -2) / 2.0).masked_fill(~keep, -float("inf"))
    t_out = torch.softmax(s, -1) @ tv
    t_out.backward(torch.tensor(d_out))
    np.testing.assert_allclose(out, t_out.detach().numpy(), rtol=0, atol=1e-13)
    for g, t in zip(grads, (tq, tk, tv), strict=True):
        np.testing.assert_allclose(g, t.grad.numpy(), rtol=0, atol=1e-12)


def test_block_gemms_follow_nnz(monkeypatch):
    """The score GEMMs cover exactly the listed blocks (nnz * b^2 scores, forward and backward),
    one GEMM per run of adjacent listed blocks in a block row (runs are merged into one tile)."""
    calls = []
    original = tiled.matmul_scratch

    def counting(xp, a, b, name):
        calls.append((name, int(a.shape[-2]) * int(b.shape[-1])))
        return original(xp, a, b, name)

    monkeypatch.setattr(tiled, "matmul_scratch", counting)
    rng = np.random.default_rng(2)
    n, b = 256, 16
    q, k, v, d_out = (rng.standard_normal((1, 1, n, 8)) for _ in range(4))
    layout = rng.random((16, 16)) < 0.1
    layout[np.arange(16), np.arange(16)] = True
    layout[3, 4:9] = True  # a run of six blocks (3..8) in row 3
    nnz = int(layout.sum())
    padded = np.pad(layout, ((0, 0), (1, 0)))
    runs = int(np.sum(padded[:, 1:] & ~padded[:, :-1]))
    assert runs < nnz < 16 * 16

    def scores(name):
        return [area for kind, area in calls if kind == name]

    _, pullback = refattn.vjp(block_sparse_attention, q, k, v, layout=layout, block_size=b)
    assert len(scores("s")) == runs and sum(scores("s")) == nnz * b * b
    calls.clear()
    pullback(d_out)
    assert len(scores("s")) == len(scores("dp")) == runs
    assert sum(scores("s")) == sum(scores("dp")) == nnz * b * b


@pytest.mark.parametrize(
    ("layout", "block_size", "error", "match"),
    [
        (np.ones((3, 4), dtype=bool), 4, ValueError, "shape"),
        (np.ones((3, 3), dtype=np.int64), 4, TypeError, "boolean"),
        (np.ones((5, 3, 3), dtype=bool), 4, ValueError, "shape"),
        (np.ones((3, 3), dtype=bool), 3, ValueError, "shape"),
        (np.ones((3, 3), dtype=bool), 0, ValueError, "block_size"),
        (
            scipy.sparse.csr_array(
                (np.array([1.0, 0.0]), (np.array([0, 1]), np.array([0, 1]))), shape=(3, 3)
            ),
            4,
            ValueError,
            "explicitly stored zero",
        ),
    ],
)
def test_bad_layouts(layout, block_size, error, match):
    q = np.zeros((1, 2, 10, 3))
    with pytest.raises(error, match=match):
        block_sparse_attention(q, q, q, layout=layout, block_size=block_size)


@pytest.mark.parametrize(
    "layout",
    [
        strided_pattern(6, 2),
        fixed_pattern(6, 3, 1),
        bigbird_pattern(6, 1, 1, 1, seed=0),
        longformer_dilated_pattern(6, 1, [1, 2]),
    ],
    ids=["strided", "fixed", "bigbird", "longformer_per_head"],
)
def test_pattern_layouts_equal_masked_sdpa(layout):
    rng = np.random.default_rng(3)
    q, k, v, d_out = (rng.standard_normal((1, 2, 22, 3)) for _ in range(4))
    out, pullback = refattn.vjp(block_sparse_attention, q, k, v, layout=layout, block_size=4)
    mask = element_mask(layout, 4, 22, False)
    ref, ref_pullback = refattn.vjp(sdpa, q, k, v, mask=mask, implementation="materialized")
    assert rel(out, ref) <= 1e-13
    for g, r in zip(pullback(d_out), ref_pullback(d_out), strict=True):
        assert rel(g, r) <= 1e-13
