"""XCA, Linformer and Reformer LSH attention (issue 19).

Each op is compared with torch autograd of a direct formula (float64 <= 1e-12 relative, float32
by the FlashAttention rule of :mod:`refattn.testing`) and with the public implementation users
know where it imports (timm's XCA, the ``linformer`` package, ``reformer_pytorch``), with the
same parameters and rotations.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import rel_err, to_numpy

import refattn
from refattn.testing import assert_attention_close

TOL64 = 1e-12


def _torch_vjp(fn, primals, ct, dtype="float64"):
    """Outputs and gradients of ``fn(*tensors)`` by torch autograd, as host NumPy arrays."""
    torch = pytest.importorskip("torch")
    dt = getattr(torch, dtype)
    ts = [torch.tensor(np.asarray(p), dtype=dt, requires_grad=True) for p in primals]
    out = fn(torch, *ts)
    grads = torch.autograd.grad(out, ts, torch.tensor(ct, dtype=dt))
    return out.detach().numpy(), [g.numpy() for g in grads]


def _refattn_vjp(op, primals, ct, xp=None, **options):
    if xp is not None:
        primals = [xp.asarray(p) for p in primals]
        ct = xp.asarray(ct)
    out, pullback = refattn.vjp(op, *primals, **options)
    return out, pullback(ct)


def _assert_all_close(ours, theirs, tol=TOL64):
    (o, gs), (o_ref, gs_ref) = ours, theirs
    assert rel_err(o, o_ref) <= tol, rel_err(o, o_ref)
    for i, (g, g_ref) in enumerate(zip(gs, gs_ref, strict=True)):
        assert rel_err(g, g_ref) <= tol, (i, rel_err(g, g_ref))


def _assert_float32_rule(op, primals64, ct64, torch_fn, **options):
    """refattn in float32 against refattn in float64 on the same rounded inputs, with torch's
    plain float32 evaluation of the direct formula as the baseline."""
    p32 = [np.asarray(p, dtype=np.float32) for p in primals64]
    ct32 = np.asarray(ct64, dtype=np.float32)
    p_r = [p.astype(np.float64) for p in p32]
    opt32 = {
        k: (v.astype(np.float32) if isinstance(v, np.ndarray) else v) for k, v in options.items()
    }
    opt64 = {
        k: (v.astype(np.float32).astype(np.float64) if isinstance(v, np.ndarray) else v)
        for k, v in options.items()
    }
    o32, g32 = _refattn_vjp(op, p32, ct32, **opt32)
    o64, g64 = _refattn_vjp(op, p_r, ct32.astype(np.float64), **opt64)
    b32, gb32 = _torch_vjp(torch_fn, p32, ct32, dtype="float32")
    assert o32.dtype == np.float32 and all(g.dtype == np.float32 for g in g32)
    assert_attention_close(o32, o64, b32, name="output")
    for i, (g, r, b) in enumerate(zip(g32, g64, gb32, strict=True)):
        assert_attention_close(g, r, b, name=f"gradient {i}")


# ============================================================================ XCA


def _xca_torch(torch, q, k, v, tau):
    qh = q / q.norm(dim=-2, keepdim=True)
    kh = k / k.norm(dim=-2, keepdim=True)
    a = torch.softmax((qh.transpose(-2, -1) @ kh) * tau[:, None, None], dim=-1)
    return v @ a.transpose(-2, -1)


def _xca_inputs(shape=(2, 3, 7, 4), seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal(shape) for _ in range(3))
    tau = rng.uniform(0.5, 2.0, size=(shape[-3],))
    return [q, k, v, tau], rng.standard_normal(shape)


def test_xca_matches_torch_formula(xp):
    primals, ct = _xca_inputs()
    ours = _refattn_vjp(refattn.cross_covariance_attention, primals, ct, xp)
    _assert_all_close(ours, _torch_vjp(_xca_torch, primals, ct))


def test_xca_float32_rule():
    primals, ct = _xca_inputs(seed=1)
    _assert_float32_rule(refattn.cross_covariance_attention, primals, ct, _xca_torch)


def test_xca_gradcheck(xp):
    primals, _ = _xca_inputs((1, 2, 5, 3), seed=2)
    assert refattn.gradcheck(refattn.cross_covariance_attention, *[xp.asarray(p) for p in primals])


def test_xca_is_invariant_to_column_scaling():
    """Q and K enter only through their token-normalised columns: scaling a channel of q by a
    positive factor changes nothing (a bug normalising along the channels would break it)."""
    (q, k, v, tau), _ = _xca_inputs(seed=3)
    s = np.array([0.5, 3.0, 1.0, 7.0])
    out = refattn.cross_covariance_attention(q, k, v, tau)
    assert rel_err(refattn.cross_covariance_attention(q * s, k / s, v, tau), out) <= TOL64
    # and it does depend on scaling a token (row)
    q2 = q.copy()
    q2[..., 0, :] *= 3.0
    assert rel_err(refattn.cross_covariance_attention(q2, k, v, tau), out) > 1e-3


def test_xca_bad_input():
    (q, k, v, tau), _ = _xca_inputs()
    with pytest.raises(ValueError, match=r"temperature must have shape \(H,\) = \(3,\)"):
        refattn.cross_covariance_attention(q, k, v, tau[:2])
    with pytest.raises(ValueError, match="temperature"):
        refattn.cross_covariance_attention(q, k, v, tau.reshape(3, 1, 1))
    with pytest.raises(ValueError, match="same shape"):
        refattn.cross_covariance_attention(q, k, v[..., :3], tau)
    with pytest.raises(ValueError, match="head axis"):
        refattn.cross_covariance_attention(q[0, 0], k[0, 0], v[0, 0], tau)
    q0 = q.copy()
    q0[0, 1, :, 2] = 0.0
    with pytest.raises(ValueError, match="q has a channel that is zero"):
        refattn.cross_covariance_attention(q0, k, v, tau)


def _xca_layer_torch(torch, x, w_qkv, b_qkv, w_proj, b_proj, tau, heads):
    b, n, c = x.shape
    y = x @ w_qkv + b_qkv
    q, k, v = y.reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)
    o = _xca_torch(torch, q, k, v, tau).transpose(1, 2).reshape(b, n, c)
    return o @ w_proj + b_proj


def test_xca_layer_gradcheck_and_formula(xp):
    params = refattn.init_cross_covariance_attention_layer(6, 2, qkv_bias=True, seed=0, xp=xp)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 5, 6))
    params["temperature"] = xp.asarray(np.array([0.7, 1.6]))
    assert refattn.gradcheck(
        refattn.cross_covariance_attention_layer, params, xp.asarray(x), num_heads=2
    )
    ct = rng.standard_normal((2, 5, 6))
    out, pullback = refattn.vjp(
        refattn.cross_covariance_attention_layer, params, xp.asarray(x), num_heads=2
    )
    d_params, d_x = pullback(xp.asarray(ct))
    host = [
        to_numpy(a)
        for a in (
            params["qkv"]["weight"],
            params["qkv"]["bias"],
            params["proj"]["weight"],
            params["proj"]["bias"],
            params["temperature"],
        )
    ]
    ref = _torch_vjp(lambda t, *a: _xca_layer_torch(t, *a, 2), [x, *host], ct)
    ours = (
        out,
        [
            d_x,
            d_params["qkv"]["weight"],
            d_params["qkv"]["bias"],
            d_params["proj"]["weight"],
            d_params["proj"]["bias"],
            d_params["temperature"],
        ],
    )
    _assert_all_close(ours, ref)


def test_xca_layer_matches_timm():
    torch = pytest.importorskip("torch")
    # timm's package __init__ imports torchvision; without it timm.models.xcit cannot import
    xcit = pytest.importorskip("timm.models.xcit", exc_type=ImportError)
    torch.manual_seed(0)
    dim, heads = 8, 2
    m = xcit.XCA(dim, num_heads=heads, qkv_bias=True).double()
    with torch.no_grad():
        m.temperature.copy_(torch.tensor([0.6, 1.8]).reshape(heads, 1, 1))
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 6, dim))
    ct = rng.standard_normal((2, 6, dim))
    tx = torch.tensor(x, requires_grad=True)
    out = m(tx)
    out.backward(torch.tensor(ct))
    params = {
        "qkv": {
            "weight": m.qkv.weight.detach().numpy().T.copy(),
            "bias": m.qkv.bias.detach().numpy().copy(),
        },
        "proj": {
            "weight": m.proj.weight.detach().numpy().T.copy(),
            "bias": m.proj.bias.detach().numpy().copy(),
        },
        "temperature": m.temperature.detach().numpy().reshape(heads).copy(),
    }
    o, pullback = refattn.vjp(refattn.cross_covariance_attention_layer, params, x, num_heads=heads)
    d_params, d_x = pullback(ct)
    ours = (
        o,
        [d_x, d_params["qkv"]["weight"].T, d_params["proj"]["weight"].T, d_params["temperature"]],
    )
    theirs = (
        out.detach().numpy(),
        [
            tx.grad.numpy(),
            m.qkv.weight.grad.numpy(),
            m.proj.weight.grad.numpy(),
            m.temperature.grad.numpy().reshape(heads),
        ],
    )
    _assert_all_close(ours, theirs)


# ============================================================================ Linformer


def _linformer_torch(torch, q, k, v, e, f):
    kp = e.transpose(-2, -1) @ k
    vp = f.transpose(-2, -1) @ v
    g = q.shape[-3] // kp.shape[-3]
    kp, vp = kp.repeat_interleave(g, dim=-3), vp.repeat_interleave(g, dim=-3)
    s = (q @ kp.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    return torch.softmax(s, dim=-1) @ vp


def _linformer_inputs(hq=4, hkv=2, n_q=5, n=9, p=4, per_head=False, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((2, hq, n_q, 3))
    k = rng.standard_normal((2, hkv, n, 3))
    v = rng.standard_normal((2, hkv, n, 2))
    shape = (hkv, n, p) if per_head else (n, p)
    e, f = rng.standard_normal(shape) / 3.0, rng.standard_normal(shape) / 3.0
    return [q, k, v, e, f], rng.standard_normal((2, hq, n_q, 2))


@pytest.mark.parametrize("per_head", [False, True], ids=["shared", "per_head"])
def test_linformer_matches_torch_formula(xp, per_head):
    primals, ct = _linformer_inputs(per_head=per_head)
    ours = _refattn_vjp(refattn.linformer_attention, primals, ct, xp)
    _assert_all_close(ours, _torch_vjp(_linformer_torch, primals, ct))


def test_linformer_float32_rule():
    primals, ct = _linformer_inputs(per_head=True, seed=1)
    _assert_float32_rule(refattn.linformer_attention, primals, ct, _linformer_torch)


def test_linformer_gradcheck(xp):
    primals, _ = _linformer_inputs(hq=2, hkv=1, n_q=3, n=5, p=2, per_head=True, seed=2)
    assert refattn.gradcheck(refattn.linformer_attention, *[xp.asarray(p) for p in primals])


def test_linformer_identity_projection_is_full_attention():
    """E = F = I (p = n) gives back softmax attention over the original keys."""
    (q, k, v, _, _), _ = _linformer_inputs(hq=2, hkv=2, n_q=4, n=6, seed=3)
    eye = np.eye(6)
    full = refattn.scaled_dot_product_attention(q, k, v)
    assert rel_err(refattn.linformer_attention(q, k, v, eye, eye), full) <= TOL64


def test_linformer_projected_mask():
    """A keep-mask over the projected positions acts like SDPA's on (E^T K, F^T V)."""
    (q, k, v, e, f), _ = _linformer_inputs(seed=4)
    mask = np.random.default_rng(0).random((5, 4)) < 0.6
    mask[:, 0] = True
    ref = refattn.scaled_dot_product_attention(q, e.T @ k, f.T @ v, mask=mask)
    assert rel_err(refattn.linformer_attention(q, k, v, e, f, mask=mask), ref) <= TOL64


def test_linformer_bad_input():
    (q, k, v, e, f), _ = _linformer_inputs()
    with pytest.raises(ValueError, match=r"is_causal must be False.*not defined"):
        refattn.linformer_attention(q, k, v, e, f, is_causal=True)
    with pytest.raises(ValueError, match=r"e must be \(n, p\) = \(9, p\)"):
        refattn.linformer_attention(q, k, v, e[:8], f)
    with pytest.raises(ValueError, match="f must be"):
        refattn.linformer_attention(q, k, v, e, np.ones((3, 9, 4)))
    with pytest.raises(TypeError, match="e must have k's dtype"):
        refattn.linformer_attention(q, k, v, e.astype(np.float32), f)


@pytest.mark.parametrize(
    ("one_kv_head", "share_kv", "n"),
    [(False, False, 8), (True, True, 6)],
    ids=["heads", "one_kv_head_share_kv_short"],
)
def test_linformer_matches_package(one_kv_head, share_kv, n):
    """linformer's LinformerSelfAttention (projections, attention, output map) with its weights;
    ``n`` below ``seq_len`` uses the first ``n`` rows of the projections, as the package does."""
    torch = pytest.importorskip("torch")
    linformer = pytest.importorskip("linformer")
    dim, heads, seq_len, p = 8, 2, 8, 3
    torch.manual_seed(0)
    m = linformer.LinformerSelfAttention(
        dim, seq_len, k=p, heads=heads, one_kv_head=one_kv_head, share_kv=share_kv
    ).double()
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, n, dim))
    ct = rng.standard_normal((2, n, dim))
    tx = torch.tensor(x, requires_grad=True)
    out = m(tx)
    out.backward(torch.tensor(ct))

    def w(lin):
        return {"weight": lin.weight.detach().numpy().T.copy()}

    e_full = m.proj_k.detach().numpy()
    f_full = e_full if share_kv else m.proj_v.detach().numpy()
    dh = dim // heads
    hkv = 1 if one_kv_head else heads

    def split(y, h):  # (b, n, h dh) -> (b, h, n, dh)
        return np.ascontiguousarray(y.reshape(2, n, h, dh).transpose(0, 2, 1, 3))

    q_y, q_pull = refattn.vjp(refattn.linear, w(m.to_q), x)
    k_y, k_pull = refattn.vjp(refattn.linear, w(m.to_k), x)
    if share_kv:
        v_y, v_pull = k_y, None
    else:
        v_y, v_pull = refattn.vjp(refattn.linear, w(m.to_v), x)
    e, f = e_full[:n], f_full[:n]
    o, att_pull = refattn.vjp(
        refattn.linformer_attention, split(q_y, heads), split(k_y, hkv), split(v_y, hkv), e, f
    )
    merged = o.transpose(0, 2, 1, 3).reshape(2, n, dim)
    to_out = {
        "weight": m.to_out.weight.detach().numpy().T.copy(),
        "bias": m.to_out.bias.detach().numpy().copy(),
    }
    y, out_pull = refattn.vjp(refattn.linear, to_out, merged)
    d_out_params, d_merged = out_pull(ct)
    d_q, d_k, d_v, d_e, d_f = att_pull(d_merged.reshape(2, n, heads, dh).transpose(0, 2, 1, 3))

    def merge(g, h):
        return g.transpose(0, 2, 1, 3).reshape(2, n, h * dh)

    dq_p, dx = q_pull(merge(d_q, heads))
    dk_y, dv_y = merge(d_k, hkv), merge(d_v, hkv)
    if share_kv:
        dk_p, dx_k = k_pull(dk_y + dv_y)
        d_e = d_e + d_f
        dx = dx + dx_k
    else:
        dk_p, dx_k = k_pull(dk_y)
        dv_p, dx_v = v_pull(dv_y)
        dx = dx + dx_k + dx_v
        assert rel_err(dv_p["weight"].T, m.to_v.weight.grad.numpy()) <= TOL64
        assert rel_err(d_f, m.proj_v.grad.numpy()[:n]) <= TOL64
    assert rel_err(y, out.detach().numpy()) <= TOL64
    assert rel_err(dx, tx.grad.numpy()) <= TOL64
    assert rel_err(d_e, m.proj_k.grad.numpy()[:n]) <= TOL64
    assert rel_err(dq_p["weight"].T, m.to_q.weight.grad.numpy()) <= TOL64
    assert rel_err(dk_p["weight"].T, m.to_k.weight.grad.numpy()) <= TOL64
    assert rel_err(d_out_params["weight"].T, m.to_out.weight.grad.numpy()) <= TOL64
    if n < seq_len:  # the unused rows of the projection get no gradient
        assert not np.any(m.proj_k.grad.numpy()[n:])


# ============================================================================ LSH


def _lsh_inputs(b=2, n=16, d=4, n_hashes=3, n_buckets=4, seed=0, dv=None):
    rng = np.random.default_rng(seed)
    qk = rng.standard_normal((b, n, d))
    v = rng.standard_normal((b, n, d if dv is None else dv))
    rot = rng.standard_normal((d, n_hashes, n_buckets // 2))
    return qk, v, rot, rng.standard_normal(v.shape)


def _dense_lsh_torch(multiplicity, scale, self_logit=-5e4):
    """``softmax(s + log M) v`` with ``s_ij = scale q_i . q_j/|q_j|`` and ``s_ii = self_logit``."""

    def fn(torch, qk, v):
        kh = qk / qk.norm(dim=-1, keepdim=True)
        s = (qk @ kh.transpose(-2, -1)) * scale
        n = qk.shape[-2]
        s = torch.where(torch.eye(n, dtype=torch.bool), self_logit, s)
        m = torch.tensor(multiplicity, dtype=qk.dtype)
        s = torch.where(m > 0, s + torch.log(m.clamp(min=1)), -math.inf)
        return torch.softmax(s, dim=-1) @ v

    return fn


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_lsh_equals_dense_attention_under_its_mask(xp, causal):
    qk, v, rot, ct = _lsh_inputs(seed=1)
    opts = {"chunk_size": 4, "is_causal": causal}
    m = refattn.lsh_attention_mask(xp.asarray(qk), rotations=xp.asarray(rot), **opts)
    m = to_numpy(m)
    assert m.shape == (2, 3, 16, 16) and m.dtype == np.int64
    if not causal:  # each query sees 2c window slots per round
        assert np.all(m.sum(-1) == 8)
    ours = _refattn_vjp(refattn.lsh_attention, [qk, v], ct, xp, rotations=xp.asarray(rot), **opts)
    dense = _dense_lsh_torch(m.sum(1), 0.5)
    _assert_all_close(ours, _torch_vjp(dense, [qk, v], ct))


def test_lsh_mask_has_the_bucket_structure():
    """Positions sharing a bucket and a chunk see each other; windows are chunk + previous one."""
    qk, _, rot, _ = _lsh_inputs(b=1, n=12, n_hashes=1, n_buckets=6, seed=2)
    buckets = refattn.lsh_buckets(qk, rotations=rot)[0, 0]
    r = qk[0] @ rot[:, 0, :]
    assert np.array_equal(buckets, np.argmax(np.concatenate([r, -r], axis=-1), axis=-1))
    order = np.lexsort((np.arange(12), buckets))  # by bucket, then position
    m = refattn.lsh_attention_mask(qk, rotations=rot, chunk_size=3)[0, 0]
    expected = np.zeros((12, 12), dtype=np.int64)
    for c in range(4):
        for i in order[3 * c : 3 * c + 3]:
            expected[i, order[3 * c : 3 * c + 3]] += 1
            expected[i, order[3 * ((c - 1) % 4) : 3 * ((c - 1) % 4) + 3]] += 1
    assert np.array_equal(m, expected)


@pytest.mark.parametrize("n_hashes", [1, 2])
def test_lsh_one_chunk_is_full_attention(n_hashes):
    """A chunk covering the sequence sees every key (each one twice, uniformly): full shared-QK
    attention with the self pair excluded."""
    qk, v, rot, _ = _lsh_inputs(n=8, n_hashes=n_hashes, seed=3)
    kh = qk / np.linalg.norm(qk, axis=-1, keepdims=True)
    full = refattn.scaled_dot_product_attention(qk, kh, v, mask=~np.eye(8, dtype=bool))
    out = refattn.lsh_attention(qk, v, rotations=rot, chunk_size=8)
    assert rel_err(out, full) <= TOL64


def test_lsh_first_causal_position_attends_itself():
    qk, v, rot, _ = _lsh_inputs(seed=4)
    out = refattn.lsh_attention(qk, v, rotations=rot, chunk_size=4, is_causal=True)
    assert rel_err(out[:, 0], v[:, 0]) <= TOL64


def test_lsh_gradcheck(xp):
    qk, v, rot, _ = _lsh_inputs(b=1, n=8, d=3, n_hashes=2, seed=5, dv=2)
    args = [xp.asarray(qk), xp.asarray(v)]
    for causal in (False, True):
        assert refattn.gradcheck(
            refattn.lsh_attention,
            *args,
            rotations=xp.asarray(rot),
            chunk_size=2,
            is_causal=causal,
        )


def test_lsh_float32_rule():
    qk, v, rot, ct = _lsh_inputs(seed=6)
    m = refattn.lsh_attention_mask(
        qk.astype(np.float32).astype(np.float64),
        rotations=rot.astype(np.float32).astype(np.float64),
        chunk_size=4,
    )
    m32 = refattn.lsh_attention_mask(
        qk.astype(np.float32), rotations=rot.astype(np.float32), chunk_size=4
    )
    assert np.array_equal(m, m32)  # same buckets in both precisions for these inputs
    _assert_float32_rule(
        refattn.lsh_attention,
        [qk, v],
        ct,
        _dense_lsh_torch(m.sum(1), 0.5),
        rotations=rot,
        chunk_size=4,
    )


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_lsh_matches_reformer_pytorch(causal):
    """reformer_pytorch's LSHAttention, its rotations reproduced by seeding torch's RNG the same
    way it draws them (shape (1, d, n_hashes, n_buckets/2)); n_buckets = n / bucket_size."""
    torch = pytest.importorskip("torch")
    rp = pytest.importorskip("reformer_pytorch.reformer_pytorch")
    b, n, d, n_hashes, c = 2, 16, 4, 3, 4
    rng = np.random.default_rng(7)
    qk, v = rng.standard_normal((b, n, d)), rng.standard_normal((b, n, d))
    ct = rng.standard_normal((b, n, d))
    torch.manual_seed(0)
    rot = torch.randn((1, d, n_hashes, n // c // 2), dtype=torch.float64)[0].numpy()
    lsh = rp.LSHAttention(bucket_size=c, n_hashes=n_hashes, causal=causal).eval()
    tq = torch.tensor(qk, requires_grad=True)
    tv = torch.tensor(v, requires_grad=True)
    torch.manual_seed(0)
    out, _, buckets = lsh(tq, tv)
    out.backward(torch.tensor(ct))
    ours_buckets = refattn.lsh_buckets(qk, rotations=rot) + (n // c) * np.arange(n_hashes)[:, None]
    assert np.array_equal(ours_buckets.reshape(b, -1), buckets.numpy())
    ours = _refattn_vjp(
        refattn.lsh_attention, [qk, v], ct, rotations=rot, chunk_size=c, is_causal=causal
    )
    _assert_all_close(ours, (out.detach().numpy(), [tq.grad.numpy(), tv.grad.numpy()]))


def test_lsh_bad_input():
    qk, v, rot, _ = _lsh_inputs()
    op = refattn.lsh_attention
    with pytest.raises(ValueError, match=r"rotations must be \(d, n_hashes, n_buckets / 2\)"):
        op(qk, v, rotations=rot[None], chunk_size=4)
    with pytest.raises(ValueError, match="rotations must be"):
        op(qk, v, rotations=rot[:3], chunk_size=4)
    with pytest.raises(ValueError, match="n_hashes >= 1"):
        op(qk, v, rotations=rot[:, :0], chunk_size=4)
    with pytest.raises(TypeError, match="rotations must have qk's dtype"):
        op(qk, v, rotations=rot.astype(np.float32), chunk_size=4)
    for bad in (0, -2, 2.0, True):
        with pytest.raises(ValueError, match="chunk_size must be a positive int"):
            op(qk, v, rotations=rot, chunk_size=bad)
    with pytest.raises(ValueError, match="n=16 must be a multiple of chunk_size=3"):
        op(qk, v, rotations=rot, chunk_size=3)
    with pytest.raises(ValueError, match="v must be"):
        op(qk, v[:, :8], rotations=rot, chunk_size=4)
    with pytest.raises(ValueError, match="multiple of chunk_size"):
        refattn.lsh_attention_mask(qk, rotations=rot, chunk_size=5)


def test_lsh_blocks_of_chunks_do_not_change_the_result(monkeypatch):
    """The scores are computed per block of chunks; one chunk per block gives the same result."""
    import refattn.ops.lsh as lsh_module

    qk, v, rot, ct = _lsh_inputs(seed=8)
    for causal in (False, True):
        opts = {"rotations": rot, "chunk_size": 4, "is_causal": causal}
        whole = _refattn_vjp(refattn.lsh_attention, [qk, v], ct, **opts)
        with monkeypatch.context() as m:
            m.setattr(lsh_module, "_BLOCK_ENTRIES", 2 * 4 * 8)  # B c 2c: one chunk per block
            assert len(lsh_module._blocks(2, 12, 4)) == 12
            blocked = _refattn_vjp(refattn.lsh_attention, [qk, v], ct, **opts)
        _assert_all_close(blocked, (whole[0], list(whole[1])), tol=1e-15)
