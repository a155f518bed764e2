"""The standing bad-input campaign (issue 23): one table over every public entry point.

Each row is a call a user could plausibly get wrong. It must raise the stated exception type,
its message must name the argument at fault, and nothing the user can observe may change: the
inputs are not mutated, a ``DynamicAttention`` or ``KVCache`` reads back exactly as before (and a
``DynamicAttention`` stays exact). A row whose call returns is a silent-wrong result and fails.

A new public op adds its rows here; ``test_every_public_callable_has_a_row`` fails until it does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import refattn
import refattn.compare
import refattn.vectors

RNG = np.random.default_rng(0)
Q = RNG.standard_normal((2, 3, 4, 8))
K = RNG.standard_normal((2, 3, 6, 8))
V = RNG.standard_normal((2, 3, 6, 5))
X = RNG.standard_normal((2, 4, 8))
INPUTS = (Q, K, V, X)
SNAPSHOT = tuple(a.copy() for a in INPUTS)


@dataclass(frozen=True)
class Bad:
    """``call(state)`` must raise ``error`` with every string of ``names`` in its message."""

    id: str
    call: Callable[[Any], object]
    error: type[Exception]
    names: tuple[str, ...]
    state: str = "none"  # "dynamic", "cache" or "none": what the call gets and must not change


def _sdpa(**kw: Any) -> Callable[[Any], object]:
    return lambda _: refattn.scaled_dot_product_attention(Q, K, V, **kw)


MHA = refattn.init_multi_head_attention(8, 2)
ENC = refattn.init_transformer_encoder_layer(8, 2, dim_feedforward=16)
LN = refattn.init_layer_norm(8)
LIN = refattn.init_linear(8, 3)
FF = refattn.init_feed_forward(8, 16)
ADD = refattn.init_additive_attention(8, 8, 6)
MUL = refattn.init_multiplicative_attention(8, 8, method="general")
XCA = refattn.init_cross_covariance_attention_layer(8, 2)
ROT = RNG.standard_normal((8, 2, 2))
f32 = np.float32

CASES = [
    # ---- scaled_dot_product_attention: every option
    Bad(
        "sdpa q 2-d",
        lambda _: refattn.scaled_dot_product_attention(Q[0, 0], K, V),
        ValueError,
        ("q",),
    ),
    Bad(
        "sdpa k d mismatch",
        lambda _: refattn.scaled_dot_product_attention(Q, K[..., :7], V),
        ValueError,
        ("k",),
    ),
    Bad(
        "sdpa v length",
        lambda _: refattn.scaled_dot_product_attention(Q, K, V[..., :5, :]),
        ValueError,
        ("v",),
    ),
    Bad(
        "sdpa dtype mix",
        lambda _: refattn.scaled_dot_product_attention(Q, K.astype(f32), V),
        TypeError,
        ("k",),
    ),
    Bad(
        "sdpa float16",
        lambda _: refattn.scaled_dot_product_attention(*(a.astype(np.float16) for a in (Q, K, V))),
        TypeError,
        ("float32 or float64",),
    ),
    Bad(
        "sdpa int q",
        lambda _: refattn.scaled_dot_product_attention(Q.astype(int), K, V),
        TypeError,
        ("q",),
    ),
    Bad("sdpa mask shape", _sdpa(mask=np.ones((4, 5), bool)), ValueError, ("mask",)),
    Bad("sdpa mask dtype", _sdpa(mask=np.ones((4, 6), np.int8)), TypeError, ("mask",)),
    Bad("sdpa bias shape", _sdpa(bias=np.zeros((3, 6))), ValueError, ("bias",)),
    Bad("sdpa scale nan", _sdpa(scale=float("nan")), ValueError, ("scale",)),
    Bad("sdpa scale str", _sdpa(scale="1"), TypeError, ("scale",)),
    Bad("sdpa is_causal int", _sdpa(is_causal=1), TypeError, ("is_causal",)),
    Bad(
        "sdpa alignment",
        _sdpa(is_causal=True, causal_alignment="upper"),
        ValueError,
        ("causal_alignment",),
    ),
    Bad(
        "sdpa dropout_p",
        _sdpa(dropout_p=1.5, dropout_mask=np.ones((4, 6), bool)),
        ValueError,
        ("dropout_p",),
    ),
    Bad("sdpa dropout mask missing", _sdpa(dropout_p=0.5), ValueError, ("dropout_mask",)),
    Bad("sdpa implementation", _sdpa(implementation="flash"), ValueError, ("implementation",)),
    Bad(
        "sdpa block_size", _sdpa(implementation="tiled", block_size=0), ValueError, ("block_size",)
    ),
    Bad("sdpa softcap", _sdpa(softcap="1"), TypeError, ("softcap",)),
    Bad("sdpa window", _sdpa(window=(-2, 0)), ValueError, ("window",)),
    Bad("sdpa normalizer", _sdpa(normalizer="softermax"), ValueError, ("normalizer",)),
    Bad("sdpa alpha", _sdpa(normalizer="entmax", alpha=2.5), ValueError, ("alpha",)),
    Bad(
        "sdpa entmax lse",
        _sdpa(normalizer="sparsemax", return_lse=True),
        ValueError,
        ("return_lse",),
    ),
    Bad(
        "sdpa gqa heads",
        lambda _: refattn.scaled_dot_product_attention(Q, K[:, :2], V[:, :2]),
        ValueError,
        ("heads",),
    ),
    # ---- the other attention ops
    Bad("softmax axis", lambda _: refattn.softmax(X, axis=3), ValueError, ("axis",)),
    Bad(
        "softmax mask shape",
        lambda _: refattn.softmax(X, mask=np.ones((3,), bool)),
        ValueError,
        ("mask",),
    ),
    Bad("log_softmax int", lambda _: refattn.log_softmax(X.astype(int)), TypeError, ("x",)),
    Bad("sparsemax axis", lambda _: refattn.sparsemax(X, axis=5), ValueError, ("axis",)),
    Bad("entmax alpha", lambda _: refattn.entmax(X, alpha=0.5), ValueError, ("alpha",)),
    Bad("entmax int", lambda _: refattn.entmax(X.astype(int)), TypeError, ("x",)),
    Bad(
        "window size",
        lambda _: refattn.sliding_window_attention(Q, K, V, window=-1),
        ValueError,
        ("window",),
    ),
    Bad(
        "window globals",
        lambda _: refattn.sliding_window_attention(Q, Q, Q, window=2, global_tokens=-1),
        ValueError,
        ("global_tokens",),
    ),
    Bad(
        "linear feature map",
        lambda _: refattn.linear_attention(Q, K, V, feature_map="exp"),
        ValueError,
        ("feature_map",),
    ),
    Bad(
        "linear chunk",
        lambda _: refattn.linear_attention(Q, K, V, chunk_size=0),
        ValueError,
        ("chunk_size",),
    ),
    Bad("linear eps", lambda _: refattn.linear_attention(Q, K, V, eps=-1.0), ValueError, ("eps",)),
    Bad(
        "relative distance",
        lambda _: refattn.relative_position_attention(
            Q, K, V, RNG.standard_normal((5, 8)), max_distance=-1
        ),
        ValueError,
        ("max_distance",),
    ),
    Bad(
        "relative table",
        lambda _: refattn.relative_position_attention(
            Q, K, V, RNG.standard_normal((4, 8)), max_distance=2
        ),
        ValueError,
        ("rel_k",),
    ),
    Bad(
        "xca temperature",
        lambda _: refattn.cross_covariance_attention(Q, Q, Q, np.ones(2)),
        ValueError,
        ("temperature",),
    ),
    Bad(
        "linformer e",
        lambda _: refattn.linformer_attention(Q, K, V, np.ones((5, 3)), np.ones((6, 3))),
        ValueError,
        ("e",),
    ),
    Bad(
        "lsh rotations",
        lambda _: refattn.lsh_attention(Q[0, 0], Q[0, 0], rotations=ROT[:7], chunk_size=2),
        ValueError,
        ("rotations",),
    ),
    Bad(
        "lsh chunk",
        lambda _: refattn.lsh_attention(Q[0, 0], Q[0, 0], rotations=ROT, chunk_size=3),
        ValueError,
        ("chunk_size",),
    ),
    Bad(
        "lsh buckets",
        lambda _: refattn.lsh_buckets(Q[0, 0], rotations=ROT.astype(f32)),
        TypeError,
        ("rotations",),
    ),
    Bad("causal_mask n", lambda _: refattn.causal_mask(-1, 4), ValueError, ("n",)),
    Bad(
        "padding_mask lengths",
        lambda _: refattn.padding_mask(np.array([5]), 4),
        ValueError,
        ("lengths",),
    ),
    # ---- layers
    Bad(
        "mha heads",
        lambda _: refattn.multi_head_attention(MHA, X, X, X, n_heads=3),
        ValueError,
        ("n_heads",),
    ),
    Bad(
        "mha kv heads",
        lambda _: refattn.multi_head_attention(MHA, X, X, X, n_heads=2, n_kv_heads=3),
        ValueError,
        ("n_kv_heads",),
    ),
    Bad(
        "mha d_model",
        lambda _: refattn.multi_head_attention(MHA, X[..., :6], X, X, n_heads=2),
        ValueError,
        ("query",),
    ),
    Bad(
        "mha softcap",
        lambda _: refattn.multi_head_attention(MHA, X, X, X, n_heads=2, softcap=-1.0),
        ValueError,
        ("softcap",),
    ),
    Bad(
        "encoder activation",
        lambda _: refattn.transformer_encoder_layer(ENC, X, n_heads=2, activation="swish"),
        ValueError,
        ("activation",),
    ),
    Bad(
        "encoder eps",
        lambda _: refattn.transformer_encoder_layer(ENC, X, n_heads=2, layer_norm_eps=-1.0),
        ValueError,
        ("eps",),
    ),
    Bad(
        "layer_norm width",
        lambda _: refattn.layer_norm(LN, X[..., :5]),
        ValueError,
        ("weight", "(5,)"),
    ),
    Bad(
        "linear width", lambda _: refattn.linear(LIN, X[..., :5]), ValueError, ("weight", "(5, ·)")
    ),
    Bad(
        "feed_forward dropout",
        lambda _: refattn.feed_forward(FF, X, dropout_p=0.5),
        ValueError,
        ("dropout_mask",),
    ),
    Bad(
        "additive keys",
        lambda _: refattn.additive_attention(ADD, X[:, 0], X[..., :5]),
        ValueError,
        ("W_h.weight", "(5, ·)"),
    ),
    Bad(
        "multiplicative method",
        lambda _: refattn.multiplicative_attention(MUL, X[:, 0], X, method="cosine"),
        ValueError,
        ("method",),
    ),
    Bad(
        "luong local-m position",
        lambda _: refattn.multiplicative_attention(
            MUL, X[:, 0], X, method="general", local="m", window=1, position=np.ones(2)
        ),
        TypeError,
        ("position", "integer"),
    ),
    Bad("rope odd width", lambda _: refattn.rope(X[..., :7]), ValueError, ("x",)),
    Bad(
        "rope positions",
        lambda _: refattn.rope(X, positions=np.arange(3)),
        ValueError,
        ("positions",),
    ),
    Bad(
        "learned positions",
        lambda _: refattn.learned_positions(RNG.standard_normal((3, 8)), X),
        ValueError,
        ("table",),
    ),
    Bad("sinusoidal n", lambda _: refattn.sinusoidal_positions(-1, 8), ValueError, ("n",)),
    Bad(
        "xca layer heads",
        lambda _: refattn.cross_covariance_attention_layer(XCA, X, num_heads=3),
        ValueError,
        ("num_heads",),
    ),
    Bad("init heads", lambda _: refattn.init_multi_head_attention(8, 3), ValueError, ("n_heads",)),
    Bad("init dtype", lambda _: refattn.init_linear(8, 3, dtype="float16"), ValueError, ("dtype",)),
    # ---- gradcheck and vjp
    Bad("vjp not an op", lambda _: refattn.vjp(np.sum, X), TypeError, ("op",)),
    Bad(
        "gradcheck eps",
        lambda _: refattn.gradcheck(refattn.softmax, X, eps=0.0),
        ValueError,
        ("eps",),
    ),
    # ---- padded and packed sequences
    Bad(
        "sdpa key_lengths out of range",
        _sdpa(key_lengths=[99] * int(np.prod(Q.shape[:-3]))),
        ValueError,
        ("key_lengths", "99"),
    ),
    Bad("sdpa query_lengths float", _sdpa(query_lengths=1.5), TypeError, ("query_lengths",)),
    Bad(
        "varlen cu_seqlens decreasing",
        lambda _: refattn.varlen_attention(
            np.zeros((4, 1, 3)),
            np.zeros((4, 1, 3)),
            np.zeros((4, 1, 3)),
            cu_seqlens_q=[0, 3, 1, 4],
            cu_seqlens_k=[0, 1, 2, 4],
        ),
        ValueError,
        ("cu_seqlens_q", "non-decreasing"),
    ),
    Bad(
        "varlen cu_seqlens short",
        lambda _: refattn.varlen_attention(
            np.zeros((4, 1, 3)),
            np.zeros((4, 1, 3)),
            np.zeros((4, 1, 3)),
            cu_seqlens_q=[0, 4],
            cu_seqlens_k=[0, 3],
        ),
        ValueError,
        ("cu_seqlens_k", "4"),
    ),
    Bad(
        "paged block out of range",
        lambda _: refattn.paged_attention(
            np.zeros((1, 1, 1, 3)),
            np.zeros((2, 1, 4, 3)),
            np.zeros((2, 1, 4, 3)),
            block_table=[[0, 2]],
            cache_seqlens=[6],
        ),
        ValueError,
        ("block_table[0]", "block 2"),
    ),
    Bad(
        "rope scaling type",
        lambda _: refattn.rope(X, scaling={"rope_type": "ntk", "factor": 2.0}),
        ValueError,
        ("rope_type", "ntk"),
    ),
    Bad(
        "rope_frequencies missing key",
        lambda _: refattn.rope_frequencies(8, scaling={"rope_type": "llama3", "factor": 2.0}),
        ValueError,
        ("llama3", "low_freq_factor"),
    ),
    Bad(
        "rope rotary_dim odd", lambda _: refattn.rope(X, rotary_dim=3), ValueError, ("rotary_dim",)
    ),
    # ---- ALiBi
    Bad("alibi n_heads", lambda _: refattn.alibi_slopes(0), ValueError, ("n_heads", "0")),
    Bad(
        "alibi slopes shape",
        lambda _: refattn.alibi_bias(np.ones((2, 2)), 3, 3),
        ValueError,
        ("slopes", "(2, 2)"),
    ),
    # ---- block-sparse attention and its patterns
    Bad(
        "block_sparse layout shape",
        lambda _: refattn.block_sparse_attention(
            Q, Q, Q, layout=np.ones((3, 1), bool), block_size=4
        ),
        ValueError,
        ("layout", "(3, 1)"),
    ),
    Bad(
        "block_sparse layout dtype",
        lambda _: refattn.block_sparse_attention(
            Q, Q, Q, layout=np.ones((1, 1), int), block_size=4
        ),
        TypeError,
        ("layout",),
    ),
    Bad(
        "block_sparse block_size",
        lambda _: refattn.block_sparse_attention(
            Q, Q, Q, layout=np.ones((1, 1), bool), block_size=0
        ),
        ValueError,
        ("block_size",),
    ),
    Bad(
        "block_sparse_mask block_size",
        lambda _: refattn.block_sparse_mask(np.ones((2, 2), bool), 0, 8),
        ValueError,
        ("block_size",),
    ),
    Bad("strided l", lambda _: refattn.strided_pattern(4, 0), ValueError, ("l",)),
    Bad("fixed c", lambda _: refattn.fixed_pattern(4, 2, 3), ValueError, ("c", "3")),
    Bad(
        "combine how",
        lambda _: refattn.combine_patterns([np.ones((2, 2), bool)], how="x"),
        ValueError,
        ("how",),
    ),
    Bad(
        "bigbird window",
        lambda _: refattn.bigbird_pattern(4, -1, 1, 1, seed=0),
        ValueError,
        ("window",),
    ),
    Bad(
        "longformer dilation",
        lambda _: refattn.longformer_dilated_pattern(4, 1, 0),
        ValueError,
        ("dilation",),
    ),
    # ---- golden vectors, compare, testing
    Bad(
        "vectors missing file",
        lambda _: refattn.vectors.load("/nonexistent/x.npz"),
        refattn.vectors.GoldenVectorError,
        ("/nonexistent/x.npz",),
    ),
    Bad(
        "vectors sha256",
        lambda _: refattn.vectors.load(__file__, sha256="00"),
        ValueError,
        ("sha256",),
    ),
    Bad(
        "compare framework",
        lambda _: refattn.compare.compare("tensorflow"),
        ValueError,
        ("framework", "tensorflow"),
    ),
    Bad(
        "assert_close shapes",
        lambda _: refattn.testing.assert_close(X, X[0], rtol=0.0, atol=0.0),
        AssertionError,
        ("shape",),
    ),
    Bad(
        "attention tolerance factor",
        lambda _: refattn.testing.assert_attention_close(X, X, X, factor=-1.0),
        ValueError,
        ("factor",),
    ),
    # ---- KV cache: state unchanged
    Bad(
        "cache overflow",
        lambda c: c.append(np.ones((1, 2, 3, 4)), np.ones((1, 2, 3, 4))),
        ValueError,
        ("capacity",),
        "cache",
    ),
    Bad(
        "cache heads",
        lambda c: c.append(np.ones((1, 3, 1, 4)), np.ones((1, 3, 1, 4))),
        ValueError,
        ("k",),
        "cache",
    ),
    Bad(
        "cache dtype",
        lambda c: c.append(np.ones((1, 2, 1, 4), f32), np.ones((1, 2, 1, 4), f32)),
        TypeError,
        ("k",),
        "cache",
    ),
    Bad(
        "cache k v length",
        lambda c: c.append(np.ones((1, 2, 1, 4)), np.ones((1, 2, 2, 4))),
        ValueError,
        ("v",),
        "cache",
    ),
    Bad(
        "cached mha heads",
        lambda c: refattn.multi_head_attention_cached(
            refattn.init_multi_head_attention(8, 2, n_kv_heads=1), X[:1, :1], c, n_heads=2
        ),
        ValueError,
        ("cache",),
        "cache",
    ),
    # ---- DynamicAttention: state unchanged, still exact
    Bad(
        "dyn update_key index", lambda a: a.update_key(6, 0, 1.0), IndexError, ("i", "6"), "dynamic"
    ),
    Bad(
        "dyn update_key nan",
        lambda a: a.update_key(0, 0, float("nan")),
        ValueError,
        ("delta",),
        "dynamic",
    ),
    Bad(
        "dyn update_key overflow",
        lambda a: a.update_key(0, 0, 1.7e308),
        ValueError,
        ("delta",),
        "dynamic",
    ),
    Bad(
        "dyn update_keys lengths",
        lambda a: a.update_keys(np.array([0, 1]), np.array([0]), np.array([1.0, 2.0])),
        ValueError,
        ("cols",),
        "dynamic",
    ),
    Bad(
        "dyn update_keys float rows",
        lambda a: a.update_keys(np.array([0.5]), np.array([0]), np.array([1.0])),
        TypeError,
        ("rows",),
        "dynamic",
    ),
    Bad(
        "dyn update_keys bad col",
        lambda a: a.update_keys(np.array([0, 1]), np.array([0, 9]), np.array([1.0, 2.0])),
        IndexError,
        ("cols", "9"),
        "dynamic",
    ),
    Bad(
        "dyn update_values inf",
        lambda a: a.update_values(np.array([0]), np.array([0]), np.array([np.inf])),
        ValueError,
        ("deltas",),
        "dynamic",
    ),
    Bad(
        "dyn update_value index",
        lambda a: a.update_value(0, 3, 1.0),
        IndexError,
        ("j", "3"),
        "dynamic",
    ),
    Bad(
        "dyn update_query index",
        lambda a: a.update_query(-6, 0, 1.0),
        IndexError,
        ("i",),
        "dynamic",
    ),
    Bad(
        "dyn update_query bool",
        lambda a: a.update_query(0, 0, True),
        TypeError,
        ("delta",),
        "dynamic",
    ),
    Bad(
        "dyn append shape",
        lambda a: a.append(np.ones(3), np.ones(3)),
        ValueError,
        ("k_row",),
        "dynamic",
    ),
    Bad(
        "dyn append bools",
        lambda a: a.append([True] * 4, np.ones(3)),
        TypeError,
        ("k_row",),
        "dynamic",
    ),
    Bad(
        "dyn append nan",
        lambda a: a.append(np.ones(4), np.full(3, np.nan)),
        ValueError,
        ("v_row",),
        "dynamic",
    ),
    Bad(
        "dyn append dtype",
        lambda a: a.append(np.ones(4, f32), np.ones(3)),
        TypeError,
        ("k_row",),
        "dynamic",
    ),
    Bad("dyn remove index", lambda a: a.remove(6), IndexError, ("r", "6"), "dynamic"),
    Bad("dyn query index", lambda a: a.query(0, 3), IndexError, ("j",), "dynamic"),
    Bad(
        "dyn construct shapes",
        lambda _: refattn.DynamicAttention(Q[0, 0], K[0, 0, :, :5], V[0, 0]),
        ValueError,
        ("K",),
    ),
    Bad(
        "dyn construct float16",
        lambda _: refattn.DynamicAttention(*(a[0, 0].astype(np.float16) for a in (Q, K, V))),
        TypeError,
        ("float32 or float64",),
    ),
    Bad(
        "dyn construct scale",
        lambda _: refattn.DynamicAttention(Q[0, 0], K[0, 0], V[0, 0], scale=1e300),
        ValueError,
        ("scale",),
    ),
    Bad(
        "dyn construct threshold",
        lambda _: refattn.DynamicAttention(Q[0, 0], K[0, 0], V[0, 0], threshold=0),
        ValueError,
        ("threshold",),
    ),
]


def _dynamic() -> refattn.DynamicAttention:
    rng = np.random.default_rng(1)
    return refattn.DynamicAttention(
        rng.standard_normal((5, 4)), rng.standard_normal((6, 4)), rng.standard_normal((6, 3))
    )


def _cache() -> refattn.KVCache:
    cache = refattn.KVCache(3, 2, 4, batch=(1,))
    cache.append(np.ones((1, 2, 2, 4)), np.full((1, 2, 2, 4), 2.0))
    return cache


def _observe(kind: str, obj: Any) -> Any:
    """Everything a user can read back, by public methods that do not change the state."""
    if kind == "dynamic":
        n_q, _, _, d_v = obj.shape
        out = [[obj.query(i, j) for j in range(d_v)] for i in range(n_q)]
        return (obj.shape, obj.pending, obj.threshold, out)
    if kind == "cache":
        return (obj.remaining, obj.keys.tolist(), obj.values.tolist())
    return None


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_a_clear_error_and_changes_nothing(case: Bad) -> None:
    obj = {"dynamic": _dynamic, "cache": _cache}.get(case.state, lambda: None)()
    before = _observe(case.state, obj)
    with pytest.raises(case.error) as info:
        case.call(obj)
    message = str(info.value)
    for name in case.names:
        assert name in message, f"{case.id}: {name!r} not named in: {message}"
    assert _observe(case.state, obj) == before
    if case.state == "dynamic":
        assert obj.approximation_error() <= 1e-12
    for a, b in zip(INPUTS, SNAPSHOT, strict=True):
        assert np.array_equal(a, b), f"{case.id} mutated an input"


def test_every_public_callable_has_a_row() -> None:
    """A new public function or class gets bad-input rows here before it lands."""
    exempt = {"GradcheckError", "Op", "registered_ops", "testing", "__version__"}
    exempt |= {"from_torch_mha_masks", "gelu", "gelu_tanh", "relu"}  # elementwise / torch masks
    exempt |= {n for n in refattn.__all__ if n.startswith("init_")}
    exempt |= {"add_sinusoidal_positions", "transformer_decoder_layer"}
    exempt |= {"transformer_encoder_layer_cached", "transformer_decoder_layer_cached"}
    exempt |= {"lsh_attention_mask"}
    exempt |= {"interpret"}  # a subpackage: its bad-input rows are in tests/test_interpret.py
    source = Path(__file__).read_text()
    missing = [
        n
        for n in refattn.__all__
        if n not in exempt and f"refattn.{n}(" not in source and f"a.{n}" not in source
    ]
    assert missing == [], f"public names without a bad-input row: {missing}"
