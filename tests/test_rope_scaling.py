"""RoPE scaling types and partial rotary, against transformers' own rules.

``rope_frequencies`` is compared with transformers' ``ROPE_INIT_FUNCTIONS`` on Llama and
GPT-NeoX configs (transformers computes the frequencies in float32, hence the tolerance there);
``rope(..., scaling=, rotary_dim=)`` applies them as transformers' ``apply_rotary_pos_emb``
does (rotate-half on the first ``rotary_dim`` channels, the rest passed through, cos and sin
times the attention factor), checked in float64 with the same frequencies on both sides.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import rel_err

import refattn

HEAD_DIM = 16

CASES = {
    "linear": ({"rope_type": "linear", "factor": 4.0}, {}),
    "dynamic_below_max": (
        {"rope_type": "dynamic", "factor": 2.0, "max_position_embeddings": 64, "seq_len": 40},
        {"seq_len": 40},
    ),
    "dynamic_past_max": (
        {"rope_type": "dynamic", "factor": 2.0, "max_position_embeddings": 64, "seq_len": 200},
        {"seq_len": 200},
    ),
    "yarn": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}, {}),
    "yarn_mscale_betas": (
        {
            "rope_type": "yarn",
            "factor": 8.0,
            "original_max_position_embeddings": 128,
            "mscale": 0.707,
            "mscale_all_dim": 0.5,
            "beta_fast": 16,
            "beta_slow": 2,
        },
        {},
    ),
    "yarn_no_truncate": (
        {
            "rope_type": "yarn",
            "factor": 3.0,
            "original_max_position_embeddings": 96,
            "truncate": False,
        },
        {},
    ),
    "llama3": (
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        {},
    ),
}


def _transformers_frequencies(scaling, base, partial, seq_len=None):
    torch = pytest.importorskip("torch")
    rope_utils = pytest.importorskip("transformers.modeling_rope_utils")
    from transformers import LlamaConfig

    params = {k: v for k, v in scaling.items() if k not in ("max_position_embeddings", "seq_len")}
    params["rope_theta"] = base
    if partial != 1.0:
        params["partial_rotary_factor"] = partial
    config = LlamaConfig(
        hidden_size=4 * HEAD_DIM,
        num_attention_heads=4,
        head_dim=HEAD_DIM,
        max_position_embeddings=scaling.get("max_position_embeddings", 256),
        rope_parameters=params,
    )
    fn = rope_utils.ROPE_INIT_FUNCTIONS[params["rope_type"]]
    kwargs = {} if seq_len is None else {"seq_len": seq_len}
    inv_freq, factor = fn(config, torch.device("cpu"), **kwargs)
    return inv_freq.double().numpy(), float(factor)


@pytest.mark.parametrize("partial", [1.0, 0.5])
@pytest.mark.parametrize("name", list(CASES))
def test_frequencies_match_transformers(name, partial):
    scaling, extra = CASES[name]
    base = 500000.0 if name == "llama3" else 10000.0
    inv_freq, factor = refattn.rope_frequencies(
        HEAD_DIM, base=base, scaling=scaling, partial_rotary_factor=partial
    )
    t_inv, t_factor = _transformers_frequencies(scaling, base, partial, extra.get("seq_len"))
    assert len(inv_freq) == int(HEAD_DIM * partial) // 2
    assert rel_err(np.array(inv_freq), t_inv) <= 3e-7  # transformers' float32 rounding
    assert abs(factor - t_factor) <= 1e-12 * t_factor


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rotary_dim", [None, 8, 4])
@pytest.mark.parametrize("name", ["linear", "yarn_mscale_betas", "llama3"])
def test_rope_applies_the_frequencies_as_transformers_does(name, rotary_dim, interleaved):
    torch = pytest.importorskip("torch")
    neox = pytest.importorskip("transformers.models.gpt_neox.modeling_gpt_neox")
    scaling, _ = CASES[name]
    rng = np.random.default_rng(1)
    q, k = rng.standard_normal((2, 3, 11, HEAD_DIM)), rng.standard_normal((2, 3, 11, HEAD_DIM))
    positions = np.arange(11) * 7
    d_rot = HEAD_DIM if rotary_dim is None else rotary_dim
    inv_freq, factor = refattn.rope_frequencies(d_rot, scaling=scaling)
    perm = np.r_[0:d_rot:2, 1:d_rot:2, d_rot:HEAD_DIM]  # interleaved = rotate-half permuted
    angle = positions[:, None] * np.array(inv_freq)[None, :]
    cos = torch.tensor(np.concatenate([np.cos(angle)] * 2, -1) * factor)[None]
    sin = torch.tensor(np.concatenate([np.sin(angle)] * 2, -1) * factor)[None]
    xs = [x[..., perm] if interleaved else x for x in (q, k)]
    t_q, t_k = neox.apply_rotary_pos_emb(torch.tensor(xs[0]), torch.tensor(xs[1]), cos, sin)
    opts = {"positions": positions, "scaling": scaling, "rotary_dim": rotary_dim}
    r_q = refattn.rope(q, interleaved=interleaved, **opts)
    r_k = refattn.rope(k, interleaved=interleaved, **opts)
    if interleaved:
        r_q, r_k = r_q[..., perm], r_k[..., perm]
    assert rel_err(r_q, t_q.numpy()) <= 1e-14 and rel_err(r_k, t_k.numpy()) <= 1e-14


def test_linear_scaling_is_position_interpolation_and_dynamic_waits_for_its_length():
    x = np.random.default_rng(2).standard_normal((3, 20, 8))
    p = np.arange(20)
    linear = refattn.rope(x, positions=p, scaling={"rope_type": "linear", "factor": 4.0})
    assert rel_err(linear, refattn.rope(x, positions=p / 4.0)) <= 1e-15
    dynamic = {"rope_type": "dynamic", "factor": 2.0, "max_position_embeddings": 32}
    assert np.array_equal(refattn.rope(x, positions=p, scaling=dynamic), refattn.rope(x))
    longer = refattn.rope(x, positions=p + 40, scaling=dynamic)  # max position 59 >= 32
    grown = refattn.rope_frequencies(8, scaling={**dynamic, "seq_len": 60})[0]
    angle = (p + 40)[:, None] * np.array(grown)
    half = x[..., :4] * np.cos(angle) - x[..., 4:] * np.sin(angle)
    assert rel_err(longer[..., :4], half) <= 1e-14


@pytest.mark.parametrize("interleaved", [False, True])
def test_gradcheck_with_scaling_and_partial_rotary(xp, interleaved):
    x = xp.asarray(np.random.default_rng(3).standard_normal((2, 5, 12)))
    scaling = CASES["yarn"][0]
    assert refattn.gradcheck(
        refattn.rope, x, scaling=scaling, rotary_dim=8, interleaved=interleaved
    )


def test_bad_scaling_is_refused_with_the_argument_named():
    x = np.zeros((4, 8))
    with pytest.raises(ValueError, match="rope_type must be one of"):
        refattn.rope(x, scaling={"rope_type": "ntk-by-parts", "factor": 2.0})
    with pytest.raises(ValueError, match=r"missing \['original_max_position_embeddings'\]"):
        refattn.rope(x, scaling={"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(ValueError, match=r"unexpected \['low_freq_factor'\]"):
        refattn.rope(x, scaling={"rope_type": "linear", "factor": 2.0, "low_freq_factor": 1})
    with pytest.raises(ValueError, match="factor must be > 0"):
        refattn.rope(x, scaling={"rope_type": "linear", "factor": 0.0})
    with pytest.raises(ValueError, match=r"rotary_dim must be an even int in \[2, 8\]"):
        refattn.rope(x, rotary_dim=5)
    with pytest.raises(ValueError, match="partial_rotary_factor must be in"):
        refattn.rope_frequencies(8, partial_rotary_factor=1.5)
