"""Attention sinks: gpt-oss's learnable sink logits and StreamingLLM's sink tokens.

Learnable sinks (``sinks``, one logit per query head in every row's softmax denominator, with no
value) are checked against transformers' gpt-oss attention (``eager_attention_forward``, the
model's own code: concatenate the sink column, softmax, drop it), differentiated by torch
autograd, and against finite differences. Sink tokens (``sink_tokens``, the first keys kept
visible through a window) are checked against FlashAttention's window rule plus the sink
columns, written as an explicit mask.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import randn, rel_err, to_numpy

import refattn
from refattn.ops.sdpa.plan import Pattern, plan_tiles

sdpa = refattn.scaled_dot_product_attention

KERNELS = [
    pytest.param({"implementation": "materialized"}, id="materialized"),
    pytest.param({"implementation": "tiled", "block_size": (2, 3)}, id="tiled"),
]


def _inputs(seed=0, *, b=2, h_q=4, h_kv=2, n_q=5, n_k=7, d=3, dtype=np.float64):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, h_q, n_q, d)).astype(dtype)
    k = rng.standard_normal((b, h_kv, n_k, d)).astype(dtype)
    v = rng.standard_normal((b, h_kv, n_k, d)).astype(dtype)
    sinks = rng.standard_normal(h_q).astype(dtype)
    return q, k, v, sinks, rng


def _gpt_oss(q, k, v, sinks, keep):
    """transformers' gpt-oss eager attention on float64 leaves; returns (out, leaves)."""
    torch = pytest.importorskip("torch")
    gpt_oss = pytest.importorskip("transformers.models.gpt_oss.modeling_gpt_oss")
    tq, tk, tv, ts = (torch.tensor(x, requires_grad=True) for x in (q, k, v, sinks))
    module = torch.nn.Module()
    module.sinks = ts
    module.num_key_value_groups = q.shape[1] // k.shape[1]
    module.training = False
    additive = torch.zeros(keep.shape, dtype=torch.float64)
    additive[~torch.tensor(keep)] = -torch.inf
    out, _ = gpt_oss.eager_attention_forward(
        module, tq, tk, tv, additive, scaling=q.shape[-1] ** -0.5
    )
    return out.transpose(1, 2), (tq, tk, tv, ts)  # (B, n, H, d) -> (B, H, n, d)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("alignment", ["upper_left", "lower_right"])
def test_matches_gpt_oss_attention_and_its_autograd(kernel, alignment):
    torch = pytest.importorskip("torch")
    q, k, v, sinks, rng = _inputs(1)
    offset = 0 if alignment == "upper_left" else 7 - 5
    keep = np.tril(np.ones((5, 7), bool), offset)
    options = {"is_causal": True, "causal_alignment": alignment, **kernel}
    out, pullback = refattn.vjp(sdpa, q, k, v, None, sinks, **options)
    d_out = rng.standard_normal(out.shape)
    d_q, d_k, d_v, d_bias, d_sinks = pullback(d_out)
    t_out, leaves = _gpt_oss(q, k, v, sinks, keep)
    t_grads = torch.autograd.grad(t_out, leaves, torch.tensor(d_out))
    assert d_bias is None
    assert rel_err(out, t_out.detach().numpy()) <= 1e-13
    for g, t in zip((d_q, d_k, d_v, d_sinks), t_grads, strict=True):
        assert rel_err(g, t.numpy()) <= 1e-12


@pytest.mark.parametrize("kernel", KERNELS)
def test_a_sink_takes_its_share_of_every_row(kernel):
    """Weights sum to 1 - exp(sink - lse); a row that sees no key has lse = sink, out = 0, and
    its sink gradient is exactly the LSE cotangent."""
    q, k, v, sinks, rng = _inputs(2)
    mask = rng.random((2, 4, 5, 7)) < 0.7
    mask[1, 2, 3, :] = False
    options = {"mask": mask, "return_weights": True, "return_lse": True, **kernel}
    (out, w, lse), pullback = refattn.vjp(sdpa, q, k, v, None, sinks, **options)
    share = 1.0 - np.exp(sinks[None, :, None] - lse)
    assert rel_err(w.sum(-1), share) <= 1e-14
    assert lse[1, 2, 3] == sinks[2] and np.all(out[1, 2, 3] == 0.0)
    d_lse = np.zeros_like(lse)
    d_lse[1, 2, 3] = 0.75
    *_, d_sinks = pullback((None, None, d_lse))
    assert d_sinks[2] == 0.75 and np.all(np.delete(d_sinks, 2) == 0.0)


def test_sinks_lower_every_weight_by_the_same_factor():
    """With a sink, P = P_plain * exp(lse_plain - lse): the plain softmax rescaled per row."""
    q, k, v, sinks, _ = _inputs(3)
    _, w0, l0 = sdpa(q, k, v, return_weights=True, return_lse=True)
    _, w1, l1 = sdpa(q, k, v, sinks=sinks, return_weights=True, return_lse=True)
    assert rel_err(l1, np.logaddexp(l0, sinks[None, :, None])) <= 1e-15
    assert rel_err(w1, w0 * np.exp(l0 - l1)[..., None]) <= 1e-15


@pytest.mark.parametrize("kernel", KERNELS)
def test_gradcheck_with_sinks_bias_window_and_weights(xp, kernel):
    q, k, v, sinks, rng = _inputs(4, n_q=4, n_k=6)
    arrays = [xp.asarray(x) for x in (q, k, v, rng.standard_normal((4, 1, 6)), sinks)]
    options = {
        "is_causal": True,
        "causal_alignment": "lower_right",
        "window": (2, 0),
        "return_weights": True,
        "return_lse": True,
        **kernel,
    }
    assert refattn.gradcheck(sdpa, *arrays, **options)


def test_one_sink_for_all_heads_and_two_d_inputs():
    q, k, v, _, rng = _inputs(5)
    shared = np.asarray(0.3)
    out, pullback = refattn.vjp(sdpa, q, k, v, None, shared)
    assert rel_err(out, sdpa(q, k, v, sinks=np.full(4, 0.3))) <= 1e-15
    d_out = rng.standard_normal(out.shape)
    per_head = refattn.vjp(sdpa, q, k, v, None, np.full(4, 0.3))[1](d_out)[4]
    d_shared = pullback(d_out)[4]
    assert d_shared.shape == () and rel_err(d_shared, per_head.sum()) <= 1e-14
    assert refattn.gradcheck(sdpa, q[0, 0], k[0, 0], v[0, 0], None, np.asarray([0.4]))


def test_sinks_as_a_keyword_are_an_option():
    q, k, v, sinks, rng = _inputs(6)
    out, pullback = refattn.vjp(sdpa, q, k, v, sinks=sinks)
    assert rel_err(out, sdpa(q, k, v, None, sinks)) == 0.0
    assert len(pullback(rng.standard_normal(out.shape))) == 3


@pytest.mark.parametrize("kernel", KERNELS)
def test_float32_follows_float64(kernel):
    q, k, v, sinks, rng = _inputs(7)
    d_out = rng.standard_normal((2, 4, 5, 3))
    ref_out, ref_pull = refattn.vjp(sdpa, q, k, v, None, sinks, is_causal=True, **kernel)
    ref = ref_pull(d_out)
    f32 = [x.astype(np.float32) for x in (q, k, v, sinks)]
    out, pull = refattn.vjp(sdpa, *f32[:3], None, f32[3], is_causal=True, **kernel)
    grads = pull(d_out.astype(np.float32))
    assert out.dtype == np.float32 and grads[4].dtype == np.float32
    assert rel_err(out, ref_out) <= 1e-5
    for g, r in zip((*grads[:3], grads[4]), (*ref[:3], ref[4]), strict=True):
        assert rel_err(g, r) <= 1e-4


# ----------------------------------------------------------------------------- sink tokens


def _streaming_keep(n_q, n_k, left, right, n_sink, *, causal, offset):
    """FlashAttention's local mask (``i + o - left <= j <= i + o + right``) or the first
    ``n_sink`` keys, and the causal bound ``j <= i + o``."""
    i = np.arange(n_q)[:, None] + offset
    j = np.arange(n_k)[None, :]
    keep = np.ones((n_q, n_k), bool)
    if left is not None:
        keep &= j >= i - left
    if right is not None:
        keep &= j <= i + right
    keep |= j < n_sink
    if causal:
        keep &= j <= i
    return keep


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize(
    ("window", "causal", "alignment"),
    [
        ((2, 0), True, "upper_left"),
        ((2, 0), True, "lower_right"),
        ((1, 1), False, "upper_left"),
        ((1, None), False, "lower_right"),
    ],
)
def test_sink_tokens_equal_the_explicit_streaming_mask(kernel, window, causal, alignment):
    rng = np.random.default_rng(8)
    n_q, n_k = 9, 12
    q, k, v = (rng.standard_normal((2, 2, n, 3)) for n in (n_q, n_k, n_k))
    offset = 0 if alignment == "upper_left" else n_k - n_q
    keep = _streaming_keep(n_q, n_k, *window, 3, causal=causal, offset=offset)
    options = {"is_causal": causal, "causal_alignment": alignment, "return_lse": True}
    (out, lse), pullback = refattn.vjp(
        sdpa, q, k, v, window=window, sink_tokens=3, **options, **kernel
    )
    (m_out, m_lse), m_pullback = refattn.vjp(
        sdpa, q, k, v, mask=keep, implementation="materialized", **options
    )
    cot = (rng.standard_normal(out.shape), rng.standard_normal(lse.shape))
    assert rel_err(out, m_out) <= 1e-14 and rel_err(lse, m_lse) <= 1e-14
    for g, m in zip(pullback(cot), m_pullback(cot), strict=True):
        assert rel_err(g, m) <= 1e-13


def test_a_sink_tokens_own_row_keeps_its_window():
    """Unlike sliding_window_attention's global tokens, a non-causal sink row sees its band."""
    n = 8
    q, k, v = (randn(np, (1, n, 2), seed=s) for s in (1, 2, 3))
    _, w = sdpa(q, k, v, window=1, sink_tokens=2, return_weights=True)
    visible = to_numpy(w)[0] > 0
    assert visible[0].tolist() == [True, True] + [False] * 6  # row 0: keys 0, 1 only
    assert visible[:, :2].all()  # every row sees the two sinks
    assert visible[5].tolist() == [True, True, False, False, True, True, True, False]


def test_the_tiled_plan_visits_only_the_sink_and_window_tiles():
    n, block = 4096, 256
    window = plan_tiles(1, 1, 1, n, n, 8, Pattern(causal=0, left=256), (block, block), 2**21)
    streaming = plan_tiles(
        1, 1, 1, n, n, 8, Pattern(causal=0, left=256, n_sink=4), (block, block), 2**21
    )
    # the sinks are a key tile of their own, (0, 4): one more tile per row block (for the
    # first two, whose window holds the sinks already, the split of the first key block)
    assert streaming.n_tiles == window.n_tiles + n // block
    # the scores computed grow by the sink columns of the rows past the first two blocks only
    assert streaming.score_bytes - window.score_bytes == 8 * 4 * (n - 2 * block)


def test_sink_bad_input_is_refused_with_the_argument_named():
    q, k, v, sinks, _ = _inputs(9)
    with pytest.raises(ValueError, match=r"sinks must have shape \(4,\)"):
        sdpa(q, k, v, sinks=np.zeros(3))
    with pytest.raises(TypeError, match="sinks must have the inputs' dtype float64"):
        sdpa(q, k, v, sinks=sinks.astype(np.float32))
    with pytest.raises(ValueError, match="sinks are softmax logits"):
        sdpa(q, k, v, sinks=sinks, normalizer="sparsemax")
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="sink_tokens must be an int >= 0"):
            sdpa(q, k, v, window=2, sink_tokens=bad)


def test_multi_head_attention_learns_its_sinks():
    """An MHA tree with ``sinks`` (n_heads,): torch autograd of the projections and the sink
    column (gpt-oss's formula) gives the same outputs and every gradient, sinks included."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(10)
    params = refattn.init_multi_head_attention(8, 4, n_kv_heads=2, seed=1)
    params["sinks"] = rng.standard_normal(4)
    x = rng.standard_normal((2, 5, 8))
    bias = rng.standard_normal((4, 5, 5))
    y, pullback = refattn.vjp(
        refattn.multi_head_attention, params, x, x, x, n_heads=4, n_kv_heads=2, bias=bias
    )
    d_y = rng.standard_normal(y.shape)
    grads, d_q, d_k, d_v = pullback(d_y)
    t = {
        name: {k: torch.tensor(v, requires_grad=True) for k, v in p.items()}
        for name, p in params.items()
        if name != "sinks"
    }
    t_sinks = torch.tensor(params["sinks"], requires_grad=True)
    tx = torch.tensor(x, requires_grad=True)

    def affine(p, z):
        return z @ p["weight"] + p["bias"]

    q = affine(t["query"], tx).reshape(2, 5, 4, 2).transpose(1, 2)
    k = affine(t["key"], tx).reshape(2, 5, 2, 2).transpose(1, 2).repeat_interleave(2, 1)
    v = affine(t["value"], tx).reshape(2, 5, 2, 2).transpose(1, 2).repeat_interleave(2, 1)
    s = q @ k.transpose(-1, -2) / 2**0.5 + torch.tensor(bias)
    s = torch.cat([s, t_sinks.reshape(1, 4, 1, 1).expand(2, 4, 5, 1)], -1)
    o = (torch.softmax(s, -1)[..., :-1] @ v).transpose(1, 2).reshape(2, 5, 8)
    t_y = affine(t["out"], o)
    t_y.backward(torch.tensor(d_y))
    assert rel_err(y, t_y.detach().numpy()) <= 1e-13
    assert rel_err(grads["sinks"], t_sinks.grad.numpy()) <= 1e-12
    for name in ("query", "key", "value", "out"):
        for leaf in ("weight", "bias"):
            assert rel_err(grads[name][leaf], t[name][leaf].grad.numpy()) <= 1e-12
    assert rel_err(d_q + d_k + d_v, tx.grad.numpy()) <= 1e-12
