"""KV-cache decoding: feeding a sequence piece by piece equals the full causal pass.

The reference is the full-sequence op with ``is_causal=True`` (checked against torch in
``test_mha.py`` and ``test_transformer.py``); the cache must reproduce it to <= 1e-12 for MHA,
GQA/MQA, stacks of encoder-style causal layers and decoder stacks, in any chunking.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import randn, rel_err, to_numpy

import refattn
from refattn.layers.attention import init_multi_head_attention, multi_head_attention
from refattn.layers.kv_cache import (
    KVCache,
    multi_head_attention_cached,
    transformer_decoder_layer_cached,
    transformer_encoder_layer_cached,
)
from refattn.layers.transformer import (
    init_transformer_decoder_layer,
    init_transformer_encoder_layer,
    transformer_decoder_layer,
    transformer_encoder_layer,
)

TOL = 1e-12


def on(xp, tree):
    if isinstance(tree, dict):
        return {k: on(xp, v) for k, v in tree.items()}
    return xp.asarray(tree)


def chunks(n, sizes):
    """Split ``range(n)`` into consecutive pieces of the given sizes (last piece takes the rest)."""
    bounds, start = [], 0
    for s in sizes:
        bounds.append((start, min(start + s, n)))
        start += s
    if start < n:
        bounds.extend((i, i + 1) for i in range(start, n))
    return bounds


@pytest.mark.parametrize(
    "n_heads,n_kv_heads,pieces",
    [(2, None, []), (4, 2, [3, 1]), (4, 1, [2, 2])],
    ids=["mha_one_by_one", "gqa_prompt_then_tokens", "mqa_pairs"],
)
def test_mha_cache_equals_full_causal_pass(xp, n_heads, n_kv_heads, pieces):
    d_model, n = 8, 6
    params = on(xp, init_multi_head_attention(d_model, n_heads, n_kv_heads=n_kv_heads, seed=1))
    x = randn(xp, (2, n, d_model), seed=2)
    full = multi_head_attention(
        params, x, x, x, n_heads=n_heads, n_kv_heads=n_kv_heads, is_causal=True
    )
    cache = KVCache(n, n_kv_heads or n_heads, d_model // n_heads, batch=(2,), xp=xp)
    outs = []
    for s0, s1 in chunks(n, pieces):
        outs.append(
            multi_head_attention_cached(
                params, x[:, s0:s1, :], cache, n_heads=n_heads, n_kv_heads=n_kv_heads
            )
        )
        assert cache.length == s1
    got = xp.concat(outs, axis=1)
    assert type(got) is type(x) and got.dtype == x.dtype
    assert rel_err(got, full) <= TOL
    # the cache holds exactly the GQA kv heads (not repeated per query head)
    assert tuple(cache.keys.shape) == (2, n_kv_heads or n_heads, n, d_model // n_heads)


@pytest.mark.parametrize("norm_first", [False, True], ids=["post_ln", "pre_ln"])
def test_encoder_stack_cache_equals_full_causal_pass(xp, norm_first):
    d_model, n_heads, n_kv_heads, n, n_layers = 8, 4, 2, 5, 3
    layers = [
        on(
            xp,
            init_transformer_encoder_layer(
                d_model, n_heads, dim_feedforward=12, n_kv_heads=n_kv_heads, seed=s
            ),
        )
        for s in range(n_layers)
    ]
    options = {
        "n_heads": n_heads,
        "n_kv_heads": n_kv_heads,
        "norm_first": norm_first,
        "activation": "gelu",
    }
    x = randn(xp, (2, n, d_model), seed=3)
    h = x
    for p in layers:
        h = transformer_encoder_layer(p, h, is_causal=True, **options)
    caches = [KVCache(n, n_kv_heads, d_model // n_heads, batch=(2,), xp=xp) for _ in layers]
    outs = []
    for s0, s1 in chunks(n, [2]):
        g = x[:, s0:s1, :]
        for p, cache in zip(layers, caches, strict=True):
            g = transformer_encoder_layer_cached(p, g, cache, **options)
        outs.append(g)
    assert rel_err(xp.concat(outs, axis=1), h) <= TOL


@pytest.mark.parametrize("norm_first", [False, True], ids=["post_ln", "pre_ln"])
def test_decoder_stack_cache_equals_full_pass(xp, norm_first):
    d_model, n_heads, n_t, n_m = 8, 2, 5, 4
    layers = [
        on(xp, init_transformer_decoder_layer(d_model, n_heads, dim_feedforward=12, seed=s))
        for s in range(2)
    ]
    x = randn(xp, (n_t, d_model), seed=4)  # unbatched
    memory = randn(xp, (n_m, d_model), seed=5)
    memory_mask = xp.asarray([True, True, False, True])
    options = {"n_heads": n_heads, "norm_first": norm_first}
    h = x
    for p in layers:
        h = transformer_decoder_layer(
            p, h, memory, is_causal=True, memory_mask=memory_mask, **options
        )
    caches = [KVCache(n_t, n_heads, d_model // n_heads, xp=xp) for _ in layers]
    memory_caches = [KVCache(n_m, n_heads, d_model // n_heads, xp=xp) for _ in layers]
    outs = []
    for i in range(n_t):
        g = x[i : i + 1, :]
        for p, cache, mcache in zip(layers, caches, memory_caches, strict=True):
            g = transformer_decoder_layer_cached(
                p,
                g,
                memory if i == 0 else None,
                cache,
                memory_cache=mcache,
                memory_mask=memory_mask,
                **options,
            )
        outs.append(g)
    assert rel_err(xp.concat(outs, axis=0), h) <= TOL
    # without a memory cache the memory is projected on every call: same result
    cache = KVCache(n_t, n_heads, d_model // n_heads, xp=xp)
    g = transformer_decoder_layer_cached(
        layers[0], x, memory, cache, memory_mask=memory_mask, **options
    )
    full0 = transformer_decoder_layer(
        layers[0], x, memory, is_causal=True, memory_mask=memory_mask, **options
    )
    assert rel_err(g, full0) <= TOL


def test_overflow_raises_before_any_change(xp):
    params = on(xp, init_multi_head_attention(4, 2, seed=6))
    cache = KVCache(3, 2, 2, batch=(1,), xp=xp)
    x = randn(xp, (1, 2, 4), seed=7)
    multi_head_attention_cached(params, x, cache, n_heads=2)
    keys_before = to_numpy(cache.keys).copy()
    with pytest.raises(ValueError, match=r"overflow: it holds 2 of 3 positions and 2 more"):
        multi_head_attention_cached(params, x, cache, n_heads=2)
    assert cache.length == 2
    np.testing.assert_array_equal(to_numpy(cache.keys), keys_before)
    with pytest.raises(ValueError, match="overflow"):
        cache.append(xp.zeros((1, 2, 2, 2)), xp.zeros((1, 2, 2, 2)))
    assert cache.length == 2
    cache.reset()
    assert cache.length == 0 and cache.remaining == 3


def test_cache_mismatch_errors():
    params = init_multi_head_attention(8, 4, n_kv_heads=2, seed=8)
    x = np.ones((2, 1, 8))
    with pytest.raises(ValueError, match="n_kv_heads=4"):
        multi_head_attention_cached(
            params, x, KVCache(4, 4, 2, batch=(2,)), n_heads=4, n_kv_heads=2
        )
    with pytest.raises(ValueError, match=r"batch=\(3,\)"):
        multi_head_attention_cached(
            params, x, KVCache(4, 2, 2, batch=(3,)), n_heads=4, n_kv_heads=2
        )
    with pytest.raises(TypeError, match="dtype"):
        multi_head_attention_cached(
            params, x, KVCache(4, 2, 2, batch=(2,), dtype="float32"), n_heads=4, n_kv_heads=2
        )
    with pytest.raises(TypeError, match="KVCache"):
        multi_head_attention_cached(params, x, None, n_heads=4, n_kv_heads=2)
    with pytest.raises(ValueError, match="capacity must be a positive int"):
        KVCache(0, 2, 2)
    with pytest.raises(ValueError, match="must have shape"):
        KVCache(4, 2, 2).append(np.zeros((3, 1, 2)), np.zeros((3, 1, 2)))


@pytest.mark.parametrize("chunks", [[1] * 12, [5, 1, 4, 2]])
def test_streaming_decoding_with_window_sinks_and_softcap_equals_the_full_pass(chunks):
    """StreamingLLM's rule while decoding: a window of 3 plus 2 sink tokens, a softcap and
    learnable sink logits; the cached steps give the full causal pass's rows."""
    rng = np.random.default_rng(11)
    params = refattn.init_multi_head_attention(8, 4, n_kv_heads=2, seed=2)
    params["sinks"] = rng.standard_normal(4)
    x = rng.standard_normal((2, 12, 8))
    opts = {"window": (3, 0), "sink_tokens": 2, "softcap": 2.5}
    full = refattn.multi_head_attention(
        params, x, x, x, n_heads=4, n_kv_heads=2, is_causal=True, **opts
    )
    cache = KVCache(12, 2, 2, batch=(2,))
    outs, start = [], 0
    for t in chunks:
        outs.append(
            refattn.multi_head_attention_cached(
                params, x[:, start : start + t], cache, n_heads=4, n_kv_heads=2, **opts
            )
        )
        start += t
    assert rel_err(np.concatenate(outs, axis=1), full) <= 1e-13
    # the window matters: without it the rows differ
    plain = refattn.multi_head_attention(params, x, x, x, n_heads=4, n_kv_heads=2, is_causal=True)
    assert rel_err(plain, full) > 1e-3
