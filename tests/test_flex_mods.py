"""FlexAttention's ``score_mod`` and ``mask_mod`` as SDPA options, in both kernels.

Forward against torch's own ``flex_attention`` (eager, float64, with ``create_block_mask``);
gradients against torch autograd of the direct formula (``flex_attention``'s eager mode has no
backward) and by finite differences. The score modifiers are refattn Ops: their backward is the
modifier's derivative, which the kernels apply to ``dS``.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from conftest import rel_err

import refattn
from refattn._backend import namespace
from refattn.ops.sdpa.problem import prepare
from refattn.ops.sdpa.tiled import make_plan

sdpa = refattn.scaled_dot_product_attention

KERNELS = [
    pytest.param({"implementation": "materialized"}, id="materialized"),
    pytest.param({"implementation": "tiled", "block_size": 4}, id="tiled"),
]

B, H, H_KV, N, D = 2, 4, 2, 16, 8
SLOPES = np.array([0.5, 0.25, 0.125, 0.0625])
DOCS = np.array([[0] * 6 + [1] * 10, [0] * 9 + [1] * 4 + [2] * 3])
TABLE = np.random.default_rng(9).standard_normal((H, 2 * N - 1))


def _alibi_fwd(s, /, *, b, h, i, j):
    return s - SLOPES[h] * (i - j), None


def _identity_bwd(residuals, d_s, /):
    return (d_s,)


def _tanh_fwd(s, /, *, b, h, i, j):
    xp = namespace(s)
    t = xp.tanh(s / 2.0)
    return 2.0 * t, t


def _tanh_bwd(t, d_s, /):
    return (d_s * (1.0 - t * t),)


def _table_fwd(s, /, *, b, h, i, j):
    return s + TABLE[h, i - j + N - 1], None


ALIBI = refattn.Op(_alibi_fwd, _identity_bwd, name="alibi_mod")
TANH = refattn.Op(_tanh_fwd, _tanh_bwd, name="tanh_mod")
TABLE_MOD = refattn.Op(_table_fwd, _identity_bwd, name="relative_table_mod")


def _document(b, h, i, j):
    return DOCS[b, i] == DOCS[b, j]


def _document_causal(b, h, i, j):
    return (DOCS[b, i] == DOCS[b, j]) & (j <= i)


def _prefix_lm(b, h, i, j):
    return (j <= i) | (j < 5)


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, H, N, D))
    k = rng.standard_normal((B, H_KV, N, D))
    v = rng.standard_normal((B, H_KV, N, D))
    return q, k, v, rng


def _torch_mods(torch):
    slopes, docs, table = (torch.tensor(x) for x in (SLOPES, DOCS, TABLE))
    score = {
        "alibi": lambda s, b, h, i, j: s - slopes[h] * (i - j),
        "tanh": lambda s, b, h, i, j: 2.0 * torch.tanh(s / 2.0),
        "table": lambda s, b, h, i, j: s + table[h, i - j + N - 1],
    }
    mask = {
        "document": lambda b, h, i, j: docs[b, i] == docs[b, j],
        "document_causal": lambda b, h, i, j: (docs[b, i] == docs[b, j]) & (j <= i),
        "prefix_lm": lambda b, h, i, j: (j <= i) | (j < 5),
    }
    return score, mask


SCORE = {"alibi": ALIBI, "tanh": TANH, "table": TABLE_MOD}
MASK = {"document": _document, "document_causal": _document_causal, "prefix_lm": _prefix_lm}


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("score", [None, "alibi", "tanh", "table"])
@pytest.mark.parametrize("mask", [None, "document", "document_causal", "prefix_lm"])
def test_forward_matches_torch_flex_attention(kernel, score, mask):
    torch = pytest.importorskip("torch")
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    if score is None and mask is None:
        pytest.skip("plain attention is tested elsewhere")
    q, k, v, _ = _inputs(1)
    t_score, t_mask = _torch_mods(torch)
    options = {"score_mod": SCORE.get(score), "mask_mod": MASK.get(mask), **kernel}
    out, lse = sdpa(q, k, v, return_lse=True, **options)
    block_mask = None
    if mask is not None:
        block_mask = flex.create_block_mask(t_mask[mask], B, H, N, N, device="cpu", BLOCK_SIZE=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex_attention warns that it runs eagerly
        t_out, t_lse = flex.flex_attention(
            *(torch.tensor(x) for x in (q, k, v)),
            score_mod=t_score.get(score),
            block_mask=block_mask,
            enable_gqa=True,
            return_lse=True,
        )
    assert rel_err(out, t_out.numpy()) <= 1e-13
    assert rel_err(lse, t_lse.numpy()) <= 1e-13


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("score", ["alibi", "tanh", "table"])
def test_gradients_match_torch_autograd_with_a_learnable_bias(kernel, score):
    """dS goes through the modifier's VJP, then to the bias and (times nothing else) to Q, K."""
    torch = pytest.importorskip("torch")
    q, k, v, rng = _inputs(2)
    bias = rng.standard_normal((H, 1, N))
    options = {"score_mod": SCORE[score], "mask_mod": _document_causal, **kernel}
    (out, lse), pullback = refattn.vjp(sdpa, q, k, v, bias, return_lse=True, **options)
    cot = (rng.standard_normal(out.shape), rng.standard_normal(lse.shape))
    grads = pullback(cot)
    t_score, t_mask = _torch_mods(torch)
    leaves = [torch.tensor(x, requires_grad=True) for x in (q, k, v, bias)]
    tq, tk, tv, tb = leaves
    kk, vv = tk.repeat_interleave(2, 1), tv.repeat_interleave(2, 1)
    s = tq @ kk.transpose(-1, -2) / D**0.5 + tb
    idx = [torch.arange(n).reshape(shape) for n, shape in ((B, (B, 1, 1, 1)), (H, (1, H, 1, 1)))]
    i, j = torch.arange(N).reshape(N, 1), torch.arange(N).reshape(1, N)
    s = t_score[score](s, *idx, i, j)
    s = s.masked_fill(~t_mask["document_causal"](*idx, i, j), -torch.inf)
    t_out = torch.softmax(s, -1) @ vv
    t_grads = torch.autograd.grad(
        (t_out, torch.logsumexp(s, -1)), leaves, tuple(map(torch.tensor, cot))
    )
    for g, t in zip(grads, t_grads, strict=True):
        assert rel_err(g, t.numpy()) <= 1e-12


@pytest.mark.parametrize("kernel", KERNELS)
def test_gradcheck_on_every_backend(xp, kernel):
    q, k, v, _ = _inputs(3)
    arrays = [xp.asarray(x[:1, :, :8]) for x in (q, k, v)]

    def slope_fwd(s, /, *, b, h, i, j):  # indices are integer arrays: cast them
        return s - 0.25 * namespace(s).astype(i - j, s.dtype), None

    slope = refattn.Op(slope_fwd, _identity_bwd, name="slope_mod")
    for mod in (slope, TANH):
        assert refattn.gradcheck(
            sdpa, *arrays, score_mod=mod, mask_mod=lambda b, h, i, j: j <= i, **kernel
        )


def test_a_tanh_score_mod_is_the_softcap():
    q, k, v, rng = _inputs(4)
    d_out = rng.standard_normal((B, H, N, D))
    mod = refattn.vjp(sdpa, q, k, v, score_mod=TANH)
    cap = refattn.vjp(sdpa, q, k, v, softcap=2.0)
    assert rel_err(mod[0], cap[0]) <= 1e-15
    for a, b in zip(mod[1](d_out), cap[1](d_out), strict=True):
        assert rel_err(a, b) <= 1e-14


def test_the_tiled_plan_skips_tiles_the_mask_mod_hides():
    """Documents of 8 and 24 tokens in blocks of 4: only the tiles on the documents' diagonal
    blocks are computed, the ones inside a document's causal triangle marked full."""
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((1, 1, 32, 4)) for _ in range(3))
    docs = np.array([[0] * 8 + [1] * 24])

    def mask(b, h, i, j):
        return (docs[b, i] == docs[b, j]) & (j <= i)

    pb = prepare(q, k, v, mask_mod=mask, implementation="tiled", block_size=(4, 4))
    plan = make_plan(pb)
    tiles = [t for ri in range(len(plan.rows)) for t in plan.tiles(plan.heads[0], ri)]
    # documents 2 and 6 blocks long: 2*3/2 + 6*7/2 lower-triangular block pairs
    assert len(tiles) == 3 + 21
    assert sum(full for *_, full in tiles) == 1 + 15  # the strictly lower block pairs
    explicit = mask(0, 0, np.arange(32)[:, None], np.arange(32)[None, :])
    ref = sdpa(q, k, v, mask=explicit, implementation="materialized")
    assert rel_err(sdpa(q, k, v, mask_mod=mask, implementation="tiled", block_size=4), ref) <= 1e-14


def test_bad_modifiers_are_refused_with_the_argument_named():
    q, k, v, _ = _inputs(6)
    with pytest.raises(TypeError, match=r"score_mod must be a refattn\.Op .* without a backward"):
        sdpa(q, k, v, score_mod=lambda s, b, h, i, j: s)
    with pytest.raises(TypeError, match="mask_mod must be a function"):
        sdpa(q, k, v, mask_mod=np.ones((N, N), bool))
    with pytest.raises(TypeError, match="mask_mod must return a boolean array"):
        sdpa(q, k, v, mask_mod=lambda b, h, i, j: (j <= i).astype(np.float64))
    wrong = refattn.Op(lambda s, /, *, b, h, i, j: (s[..., :1], None), _identity_bwd, name="w")
    with pytest.raises(ValueError, match="score_mod must return the scores' shape"):
        sdpa(q, k, v, score_mod=wrong)
