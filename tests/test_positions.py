"""Positional encodings: sinusoidal table, learned embeddings, RoPE, Shaw relative attention.

Every backward is checked by ``refattn.gradcheck`` over the ``xp`` backends and against torch
float64 autograd (the registered check cases, whose references are the seed's definitions
written in torch). Independent NumPy implementations (explicit rotation matrices, loops over
query/key pairs, ``np.add.at``) and mathematical properties (norm preservation, relative-position
invariance, the permutation between the RoPE conventions) check the forwards.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import randn, rel_err, to_numpy

import refattn
from refattn._check_runner import compare_with_framework, run_case
from refattn.checks import all_cases, to_backend
from refattn.layers import positions as positions_module
from refattn.layers.positions import (
    add_sinusoidal_positions,
    init_learned_positions,
    learned_positions,
    relative_position_attention,
    rope,
    sinusoidal_positions,
)

_OPS = {
    "add_sinusoidal_positions",
    "learned_positions",
    "rope",
    "relative_position_attention",
}
CASES = [c for c in all_cases() if c.op.name in _OPS]


# ----------------------------------------------------------------------------- check cases


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label)
def test_case_gradcheck(case, xp):
    result = run_case(case, xp=xp, frameworks=())
    assert result.status["gradcheck"] == "ok", result.status


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label)
def test_case_matches_torch_autograd(case):
    pytest.importorskip("torch")
    status, err = compare_with_framework(case, "torch")
    assert status == "ok", status
    assert err <= 1e-10


def test_cases_cover_every_op():
    assert {c.op.name for c in CASES} == _OPS
    assert all(c.op in refattn.registered_ops().values() for c in CASES)


# ----------------------------------------------------------------------------- sinusoidal


def test_sinusoidal_matches_seed_module():
    torch = pytest.importorskip("torch")
    n, d = 50, 16
    # seed 002's SinusoidalPositionalEncoding, in float64
    pe = torch.zeros(n, d, dtype=torch.float64)
    position = torch.arange(0, n, dtype=torch.float64).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, d, 2).double() * (-math.log(10000.0) / d))
    pe[:, 0::2] = torch.sin(position * div_term)
    pe[:, 1::2] = torch.cos(position * div_term)
    assert rel_err(sinusoidal_positions(n, d), pe.numpy()) < 1e-13


def test_sinusoidal_odd_d_and_base(xp):
    n, d, base = 9, 7, 300.0
    table = sinusoidal_positions(n, d, base=base, xp=xp)
    expected = np.empty((n, d))
    for p in range(n):
        for c in range(d):
            angle = p / base ** (2 * (c // 2) / d)
            expected[p, c] = math.sin(angle) if c % 2 == 0 else math.cos(angle)
    assert type(table) is type(xp.asarray(0.0))
    assert rel_err(to_numpy(table), expected) < 1e-13
    # the last (unpaired) channel is a sine: 0 at position 0
    assert to_numpy(table)[0, -1] == 0.0


def test_sinusoidal_shift_is_a_rotation(xp):
    """PE[p + k] is a fixed linear map (a rotation per frequency) of PE[p], for every p."""
    n, d, k = 20, 8, 3
    table = to_numpy(sinusoidal_positions(n, d, xp=xp))
    for i in range(d // 2):
        w = 1.0 / 10000.0 ** (2 * i / d)
        rot = np.array([[math.cos(k * w), math.sin(k * w)], [-math.sin(k * w), math.cos(k * w)]])
        pair = table[:, 2 * i : 2 * i + 2]
        np.testing.assert_allclose(pair[k:], pair[:-k] @ rot.T, atol=1e-13)


def test_sinusoidal_float32(xp):
    t32 = sinusoidal_positions(30, 6, xp=xp, dtype="float32")
    assert t32.dtype == xp.float32
    t64 = to_numpy(sinusoidal_positions(30, 6, xp=xp))
    assert rel_err(to_numpy(t32), t64) < 1e-7  # rounded from float64 angles


def test_add_sinusoidal_positions(xp):
    x = randn(xp, (2, 5, 6), seed=1)
    table = to_numpy(sinusoidal_positions(12, 6))
    y = add_sinusoidal_positions(x)
    np.testing.assert_array_equal(to_numpy(y), to_numpy(x) + table[:5])
    # decoding from a cache: positions offset
    y_off = add_sinusoidal_positions(x, positions=xp.arange(7, 12))
    np.testing.assert_array_equal(to_numpy(y_off), to_numpy(x) + table[7:12])
    dy = randn(xp, (2, 5, 6), seed=2)
    _, pullback = refattn.vjp(add_sinusoidal_positions, x)
    np.testing.assert_array_equal(to_numpy(pullback(dy)[0]), to_numpy(dy))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"n": -1, "d": 4}, ValueError, "n must be an int >= 0"),
        ({"n": 3, "d": 0}, ValueError, "d must be a positive int"),
        ({"n": 3, "d": 4, "base": 0.0}, ValueError, "base must be finite and > 0"),
        ({"n": 3, "d": 4, "dtype": "int32"}, ValueError, "dtype must be 'float32' or 'float64'"),
    ],
)
def test_sinusoidal_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        sinusoidal_positions(**kwargs)


# ----------------------------------------------------------------------------- learned


@pytest.mark.parametrize("onehot_bytes", [None, 2 * 6 * 8], ids=["one_chunk", "chunks_of_2"])
def test_learned_positions_forward_and_scatter(xp, monkeypatch, onehot_bytes):
    """Repeated positions accumulate in the table gradient (checked against np.add.at).

    ``chunks_of_2`` shrinks the one-hot block so the scatter-add runs over 5 chunks of updates.
    """
    if onehot_bytes is not None:
        monkeypatch.setattr(positions_module, "_ONEHOT_BYTES", onehot_bytes)
    table = randn(xp, (6, 3), seed=3)
    x = randn(xp, (2, 5, 3), seed=4)
    pos = np.array([[2, 0, 2, 5, 2], [1, 1, 0, 4, 3]])
    y, pullback = refattn.vjp(learned_positions, table, x, positions=xp.asarray(pos))
    np.testing.assert_array_equal(to_numpy(y), to_numpy(x) + to_numpy(table)[pos])
    dy = randn(xp, (2, 5, 3), seed=5)
    d_table, d_x = pullback(dy)
    expected = np.zeros((6, 3))
    np.add.at(expected, pos.reshape(-1), to_numpy(dy).reshape(-1, 3))
    assert rel_err(to_numpy(d_table), expected) < 1e-15
    np.testing.assert_array_equal(to_numpy(d_x), to_numpy(dy))


def test_learned_positions_default_is_arange(xp):
    table = randn(xp, (7, 4), seed=6)
    x = randn(xp, (3, 4, 4), seed=7)
    y, pullback = refattn.vjp(learned_positions, table, x)
    y2, pullback2 = refattn.vjp(learned_positions, table, x, positions=xp.arange(4))
    np.testing.assert_array_equal(to_numpy(y), to_numpy(y2))
    dy = randn(xp, (3, 4, 4), seed=8)
    d_table = to_numpy(pullback(dy)[0])
    np.testing.assert_allclose(d_table, to_numpy(pullback2(dy)[0]), rtol=1e-14, atol=1e-15)
    np.testing.assert_array_equal(d_table[4:], 0.0)  # rows no token read


def test_learned_positions_float32(xp):
    table = randn(xp, (5, 2), seed=9, dtype="float32")
    x = randn(xp, (4, 2), seed=10, dtype="float32")
    y, pullback = refattn.vjp(learned_positions, table, x, positions=xp.asarray([4, 4, 0, 1]))
    d_table, d_x = pullback(xp.ones_like(y))
    assert y.dtype == d_table.dtype == d_x.dtype == xp.float32
    np.testing.assert_array_equal(to_numpy(d_table)[:, 0], [1.0, 1.0, 0.0, 0.0, 2.0])


def test_init_learned_positions(xp):
    a = init_learned_positions(400, 25, seed=3, xp=xp, dtype="float32")
    b = init_learned_positions(400, 25, seed=3, xp=xp, dtype="float32")
    c = init_learned_positions(400, 25, seed=4, xp=xp, dtype="float32")
    assert a.dtype == xp.float32 and tuple(a.shape) == (400, 25)
    np.testing.assert_array_equal(to_numpy(a), to_numpy(b))
    assert not np.array_equal(to_numpy(a), to_numpy(c))
    host = to_numpy(a).astype(np.float64)
    assert abs(host.mean()) < 0.03 and abs(host.std() - 1.0) < 0.03  # nn.Embedding: N(0, 1)


@pytest.mark.parametrize(
    ("table_shape", "x_shape", "positions", "error", "match"),
    [
        ((4, 3), (2, 5, 3), None, ValueError, "n=5 positions but the table only 4 rows"),
        ((4, 3), (2, 3, 3), np.array([0, 4, 1]), ValueError, r"must lie in \[0, 4\)"),
        ((4, 3), (2, 3, 3), np.array([0, -1, 1]), ValueError, r"must lie in \[0, 4\)"),
        ((4, 3), (2, 3, 3), np.array([0.0, 1.0, 2.0]), TypeError, "must have an integer dtype"),
        ((4, 3), (2, 3, 3), np.array([0, 1]), ValueError, "does not broadcast"),
        ((4, 2), (2, 3, 3), None, ValueError, "table must have shape"),
        ((4,), (2, 3, 3), None, ValueError, "table must have at least 2"),
    ],
)
def test_learned_positions_errors(xp, table_shape, x_shape, positions, error, match):
    table, x = randn(xp, table_shape, seed=0), randn(xp, x_shape, seed=1)
    pos = None if positions is None else xp.asarray(positions)
    with pytest.raises(error, match=match):
        learned_positions(table, x, positions=pos)


# ----------------------------------------------------------------------------- RoPE


def _rotation_matrix(p: float, d: int, base: float, interleaved: bool) -> np.ndarray:
    """The block-diagonal RoPE rotation, written independently of refattn's pair slicing."""
    r = np.zeros((d, d))
    for i in range(d // 2):
        theta = p * base ** (-2.0 * i / d)
        a, b = (2 * i, 2 * i + 1) if interleaved else (i, i + d // 2)
        r[a, a], r[a, b], r[b, a], r[b, b] = (
            math.cos(theta),
            -math.sin(theta),
            math.sin(theta),
            math.cos(theta),
        )
    return r


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_matches_rotation_matrices(xp, interleaved):
    n, d, base = 5, 8, 10000.0
    x = randn(xp, (2, 3, n, d), seed=11)
    pos = np.array([0, 3, 17, 4, 100])
    y, pullback = refattn.vjp(rope, x, positions=xp.asarray(pos), interleaved=interleaved)
    dy = randn(xp, (2, 3, n, d), seed=12)
    (dx,) = pullback(dy)
    mats = np.stack([_rotation_matrix(p, d, base, interleaved) for p in pos])  # (n, d, d)
    expected_y = np.einsum("tab,...tb->...ta", mats, to_numpy(x))
    expected_dx = np.einsum("tba,...tb->...ta", mats, to_numpy(dy))  # R^T dy
    assert rel_err(to_numpy(y), expected_y) < 1e-13
    assert rel_err(to_numpy(dx), expected_dx) < 1e-13


def test_rope_matches_seed_module():
    """Seed 002's RotaryPositionalEmbedding (float64 buffers), forward and autograd."""
    torch = pytest.importorskip("torch")
    b, h, n, d = 2, 2, 6, 8
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).double() / d))
    freqs = torch.outer(torch.arange(n, dtype=torch.float64), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos()[None, None], emb.sin()[None, None]

    def rotate_half(x):
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
        return torch.cat([-x2, x1], dim=-1)

    rng = np.random.default_rng(13)
    q_host, dy_host = rng.standard_normal((b, h, n, d)), rng.standard_normal((b, h, n, d))
    q = torch.tensor(q_host, requires_grad=True)
    q_rot = (q * cos) + (rotate_half(q) * sin)
    q_rot.backward(torch.tensor(dy_host))
    y, pullback = refattn.vjp(rope, q_host)
    assert rel_err(y, q_rot.detach().numpy()) < 1e-14
    assert rel_err(pullback(dy_host)[0], q.grad.numpy()) < 1e-14


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_properties(xp, interleaved):
    n, d = 7, 6
    q, k = randn(xp, (n, d), seed=14), randn(xp, (n, d), seed=15)
    rq = to_numpy(rope(q, interleaved=interleaved))
    # rotations preserve norms, and position 0 is the identity
    np.testing.assert_allclose(np.linalg.norm(rq, axis=-1), np.linalg.norm(to_numpy(q), axis=-1))
    np.testing.assert_array_equal(rq[0], to_numpy(q)[0])
    # the same vector at every position: <rope(q, m), rope(k, m')> depends only on m - m'
    q_rep = xp.broadcast_to(q[0:1, :], (n, d))
    k_rep = xp.broadcast_to(k[0:1, :], (n, d))
    scores = (
        to_numpy(rope(q_rep, interleaved=interleaved))
        @ to_numpy(rope(k_rep, interleaved=interleaved)).T
    )
    for offset in range(-n + 1, n):
        diag = np.diagonal(scores, offset)
        np.testing.assert_allclose(diag, diag[0], rtol=1e-12, atol=1e-12)
    # ... and does change with m - m' (an identity "rotation" would pass the line above)
    assert np.ptp(scores[0]) > 1e-3


def test_rope_conventions_are_a_channel_permutation(xp):
    """rope_half(x[perm])[inverse] == rope_interleaved(x): pair (2i, 2i+1) <-> (i, i + d/2)."""
    d = 10
    x = randn(xp, (2, 4, d), seed=16)
    perm = np.concatenate([np.arange(0, d, 2), np.arange(1, d, 2)])  # half[i] = inter[perm[i]]
    x_half = xp.take(x, xp.asarray(perm), axis=-1)
    y_half = to_numpy(rope(x_half, interleaved=False))
    y_inter = to_numpy(rope(x, interleaved=True))
    np.testing.assert_allclose(y_half, y_inter[..., perm], rtol=0, atol=1e-15)
    assert not np.allclose(to_numpy(rope(x)), y_inter)  # the conventions do differ


def test_rope_positions_options(xp):
    x = randn(xp, (2, 3, 4, 6), seed=17)
    # explicit arange == default; per-batch positions broadcast over heads
    np.testing.assert_array_equal(to_numpy(rope(x, positions=xp.arange(4))), to_numpy(rope(x)))
    pos = np.array([[0, 1, 2, 3], [5, 6, 7, 8]])
    y = to_numpy(rope(x, positions=xp.asarray(pos)[:, None, :]))
    np.testing.assert_array_equal(y[0], to_numpy(rope(x[0, ...])))
    np.testing.assert_array_equal(y[1], to_numpy(rope(x[1, ...], positions=xp.arange(5, 9))))
    # float positions equal integer positions of the same value
    y_f = rope(x, positions=xp.asarray([0.0, 1.0, 2.0, 3.0]))
    np.testing.assert_array_equal(to_numpy(y_f), to_numpy(rope(x)))
    # float32 in, float32 out (gradient too)
    x32 = randn(xp, (3, 4), seed=19, dtype="float32")
    y32, pullback = refattn.vjp(rope, x32, interleaved=True)
    assert y32.dtype == pullback(y32)[0].dtype == xp.float32
    assert rel_err(to_numpy(pullback(y32)[0]), to_numpy(x32)) < 1e-6  # R^T R = I


@pytest.mark.parametrize(
    ("shape", "kwargs", "error", "match"),
    [
        ((2, 4, 5), {}, ValueError, "must be even"),
        ((6,), {}, ValueError, "at least 2 dimension"),
        ((2, 4, 6), {"positions": np.array([True, False, True, True])}, TypeError, "dtype"),
        ((2, 4, 6), {"positions": np.arange(5)}, ValueError, "does not broadcast"),
        ((2, 4, 6), {"interleaved": 1}, TypeError, "interleaved must be a bool"),
        ((2, 4, 6), {"base": -1.0}, ValueError, "base must be finite and > 0"),
    ],
)
def test_rope_errors(xp, shape, kwargs, error, match):
    x = randn(xp, shape, seed=0)
    kwargs = {k: xp.asarray(v) if isinstance(v, np.ndarray) else v for k, v in kwargs.items()}
    with pytest.raises(error, match=match):
        rope(x, **kwargs)


def test_rope_integer_input_rejected(xp):
    with pytest.raises(TypeError, match="real floating"):
        rope(xp.ones((2, 4), dtype=xp.int64))


# ----------------------------------------------------------------------------- Shaw et al.


def _shaw_loops(q, k, v, rel_k, rel_v, kmax, keep, scale):
    """Relative attention by explicit loops over (batch, i, j): a NumPy-only reference."""
    lead, n_q, n_k = q.shape[:-2], q.shape[-2], k.shape[-2]
    qf, kf, vf = (a.reshape(-1, *a.shape[-2:]) for a in (q, k, v))
    keepf = np.broadcast_to(keep, (*lead, n_q, n_k)).reshape(-1, n_q, n_k)
    out = np.zeros((qf.shape[0], n_q, v.shape[-1]))
    for b in range(qf.shape[0]):
        for i in range(n_q):
            rows = [min(max(j - i, -kmax), kmax) + kmax for j in range(n_k)]
            s = np.array([scale * qf[b, i] @ (kf[b, j] + rel_k[rows[j]]) for j in range(n_k)])
            kept = keepf[b, i]
            if not kept.any():
                continue
            w = np.where(kept, np.exp(s - s[kept].max()), 0.0)
            w /= w.sum()
            vals = [vf[b, j] + (rel_v[rows[j]] if rel_v is not None else 0.0) for j in range(n_k)]
            out[b, i] = sum(w[j] * vals[j] for j in range(n_k))
    return out.reshape(*lead, n_q, v.shape[-1])


@pytest.mark.parametrize("with_rel_v", [True, False])
def test_relative_attention_matches_loops(xp, with_rel_v):
    rng = np.random.default_rng(20)
    q, k = rng.standard_normal((2, 2, 4, 3)), rng.standard_normal((2, 2, 6, 3))
    v = rng.standard_normal((2, 2, 6, 2))
    kmax = 2
    rel_k, rel_v = rng.standard_normal((5, 3)), rng.standard_normal((5, 2))
    mask = rng.random((2, 1, 4, 6)) > 0.3
    mask[1, 0, 2, :] = False  # one fully masked query row
    primals = [q, k, v, rel_k] + ([rel_v] if with_rel_v else [])
    out = relative_position_attention(
        *(xp.asarray(a) for a in primals), max_distance=kmax, mask=xp.asarray(mask), scale=0.8
    )
    expected = _shaw_loops(q, k, v, rel_k, rel_v if with_rel_v else None, kmax, mask, 0.8)
    assert rel_err(to_numpy(out), expected) < 1e-13
    np.testing.assert_array_equal(to_numpy(out)[1, :, 2], 0.0)


def test_relative_attention_gradcheck_causal_heads(xp):
    q, k, v = (randn(xp, (1, 2, 4, 2), seed=s) for s in (21, 22, 23))
    rel_k, rel_v = randn(xp, (3, 2), seed=24), randn(xp, (3, 2), seed=25)
    assert refattn.gradcheck(
        relative_position_attention, q, k, v, rel_k, rel_v, max_distance=1, is_causal=True
    )


def test_relative_attention_zero_tables_is_sdpa(xp):
    q, k, v = (
        randn(xp, (2, 3, 4), seed=26),
        randn(xp, (2, 5, 4), seed=27),
        randn(xp, (2, 5, 3), seed=28),
    )
    zeros_k, zeros_v = xp.zeros((7, 4), dtype=xp.float64), xp.zeros((7, 3), dtype=xp.float64)
    out = relative_position_attention(q, k, v, zeros_k, zeros_v, max_distance=3, is_causal=True)
    ref = refattn.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert rel_err(to_numpy(out), to_numpy(ref)) < 1e-14


def test_relative_attention_clipping_and_kmax0(xp):
    q, k, v = (
        randn(xp, (2, 4, 3), seed=29),
        randn(xp, (2, 4, 3), seed=30),
        randn(xp, (2, 4, 2), seed=31),
    )
    # K >= n - 1: every distance has its own row, so rows beyond |n - 1| are never read
    rel_k, rel_v = randn(xp, (7, 3), seed=32), randn(xp, (7, 2), seed=33)
    big_k = xp.concat([randn(xp, (2, 3), seed=34), rel_k, randn(xp, (2, 3), seed=35)], axis=0)
    big_v = xp.concat([randn(xp, (2, 2), seed=36), rel_v, randn(xp, (2, 2), seed=37)], axis=0)
    a = relative_position_attention(q, k, v, rel_k, rel_v, max_distance=3)
    b = relative_position_attention(q, k, v, big_k, big_v, max_distance=5)
    assert rel_err(to_numpy(a), to_numpy(b)) < 1e-14
    # K = 0: one shared row; the key row shifts every score of a query equally (softmax-invariant,
    # zero gradient) and the value row is added to every output
    r_k, r_v = randn(xp, (1, 3), seed=38), randn(xp, (1, 2), seed=39)
    out, pullback = refattn.vjp(relative_position_attention, q, k, v, r_k, r_v, max_distance=0)
    sdpa = to_numpy(refattn.scaled_dot_product_attention(q, k, v))
    assert rel_err(to_numpy(out), sdpa + to_numpy(r_v)) < 1e-14
    grads = pullback(randn(xp, (2, 4, 2), seed=40))
    assert np.max(np.abs(to_numpy(grads[3]))) < 1e-14
    d_out = to_numpy(randn(xp, (2, 4, 2), seed=40))
    np.testing.assert_allclose(to_numpy(grads[4])[0], d_out.sum(axis=(0, 1)), rtol=1e-13)


def test_relative_attention_float32(xp):
    q, k, v = (randn(xp, (3, 2), seed=s, dtype="float32") for s in (41, 42, 43))
    rk, rv = (
        randn(xp, (3, 2), seed=44, dtype="float32"),
        randn(xp, (3, 2), seed=45, dtype="float32"),
    )
    out, pullback = refattn.vjp(relative_position_attention, q, k, v, rk, rv, max_distance=1)
    assert out.dtype == xp.float32
    assert all(g.dtype == xp.float32 for g in pullback(out))


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"rel_k": (4, 3)}, ValueError, r"rel_k must have shape \(2 \* max_distance \+ 1, d_k\)"),
        ({"rel_v": (5, 3)}, ValueError, r"rel_v must have shape .* = \(5, 2\)"),
        ({"k": (2, 4, 2)}, ValueError, "expected q"),
        ({"v": (3, 4, 2)}, ValueError, "leading axes"),
        ({"max_distance": -1}, ValueError, "max_distance must be an int >= 0"),
        ({"max_distance": True}, ValueError, "max_distance must be an int >= 0"),
        ({"mask": np.ones((2, 4, 4), dtype=np.int64)}, TypeError, "must be boolean"),
        ({"mask": np.ones((3, 4, 4), dtype=bool)}, ValueError, "does not broadcast"),
        ({"is_causal": 1}, TypeError, "is_causal must be a bool"),
        ({"dtype": "float32"}, TypeError, "share one floating dtype"),
    ],
)
def test_relative_attention_errors(xp, change, error, match):
    shapes = {"q": (2, 4, 3), "k": (2, 4, 3), "v": (2, 4, 2), "rel_k": (5, 3), "rel_v": (5, 2)}
    shapes.update({n: s for n, s in change.items() if n in shapes})
    arrays = {n: randn(xp, s, seed=i) for i, (n, s) in enumerate(shapes.items())}
    if change.get("dtype"):
        arrays["rel_v"] = xp.astype(arrays["rel_v"], xp.float32)
    options = {"max_distance": change.get("max_distance", 2)}
    if "mask" in change:
        options["mask"] = xp.asarray(change["mask"])
    if "is_causal" in change:
        options["is_causal"] = change["is_causal"]
    with pytest.raises(error, match=match):
        relative_position_attention(*arrays.values(), **options)


def test_relative_attention_backend_of_cases(xp):
    """A registered case's output lives on the input's backend (not silently NumPy)."""
    case = next(c for c in CASES if c.op is relative_position_attention)
    primals, options = case.make(np.random.default_rng(0))
    out = case.op(*to_backend(xp, primals), **to_backend(xp, options))
    assert type(out) is type(xp.asarray(0.0))
