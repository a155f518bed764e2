"""refattn compare: the quick grids pass on CPU, and the semantic table matches what the
frameworks actually do (each probed behaviour is recomputed here, independently)."""

from __future__ import annotations

import argparse
import io

import numpy as np
import pytest

from refattn import compare

#: JAX's float16 attention cannot run under jit on the CPU, so it runs op by op (seconds per
#: case): the test grid leaves it out; torch's grid covers float16.
JAX_TEST_DTYPES = ("float64", "float32", "bfloat16")


def _run(framework, *extra):
    parser = argparse.ArgumentParser()
    compare.add_arguments(parser)
    args = parser.parse_args([framework, "--quick", *extra])
    stream = io.StringIO()
    return compare.run(args, stream), stream.getvalue()


@pytest.fixture(scope="module")
def torch_report():
    pytest.importorskip("torch")
    return compare.compare("torch", quick=True)


@pytest.fixture(scope="module")
def jax_report():
    pytest.importorskip("jax")
    return compare.compare("jax", quick=True, dtypes=JAX_TEST_DTYPES)


def _assert_all_pass(report):
    assert report.ok, [(r.case, r.kernel, r.dtype, r.note) for r in report.failures]
    assert not report.unexpected
    assert all(r.status in ("pass", "n/a") for r in report.rows)


# ----------------------------------------------------------------------------- torch


def test_torch_quick_grid_passes(torch_report):
    _assert_all_pass(torch_report)
    impls = {r.kernel for r in torch_report.rows}
    assert {"torch F.sdpa[default]", "torch F.sdpa[math]"} <= impls
    assert {r.dtype for r in torch_report.rows} >= {"float64", "float32", "float16", "bfloat16"}
    cases = {r.case for r in torch_report.rows}
    assert cases == set(compare.QUICK_CASES) | {
        r.case for r in torch_report.rows if "mha" in r.case or "encoder" in r.case
    }


def test_sdpa_rows_are_conformance_rows_on_its_catalogue():
    """compare is a client of refattn.testing.conformance: the full grid is the catalogue, each
    case a row per dtype or an n/a row naming what the function lacks, and each row's numbers
    are conformance.evaluate's for the same kernel."""
    pytest.importorskip("torch")
    from refattn.testing import conformance

    report = compare.compare("torch", dtypes=("float32",))
    math_rows = {r.case: r for r in report.rows if r.kernel == "torch F.sdpa[math]"}
    assert set(math_rows) == {c.name for c in conformance.CASES}
    kernel = conformance.torch_sdpa_kernel("math", dtypes=("float32",))
    for case in conformance.CASES:
        row = math_rows[case.name]
        if kernel.lacks(case):
            assert row.status == "n/a" and row.note == f"lacks {', '.join(kernel.lacks(case))}"
            continue
        direct = conformance.evaluate(kernel, case, "float32")
        assert (row.out_error, row.worst, row.worst_error) == (
            direct.out_error,
            direct.worst,
            direct.worst_error,
        )
    assert math_rows["bias"].status == "pass"


def _rows_behaviour(rows, uniform):
    """Classify fully masked rows here, independently of refattn.compare."""
    rows = np.asarray(rows, dtype=np.float64)
    if np.isnan(rows).all():
        return "nan"
    if (rows == 0).all():
        return "zero"
    if np.allclose(rows, uniform, rtol=1e-6, atol=1e-6):
        return "uniform_average"
    return "other"


def test_torch_semantic_table_matches_torch(torch_report):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 3, 4, dtype=torch.float64, generator=g) for _ in range(3))
    dead = torch.ones(3, 3, dtype=torch.bool)
    dead[1] = False
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=dead)
    seen = _rows_behaviour(out[..., 1, :].numpy(), v.mean(dim=-2).numpy())
    probe = torch_report.probe("torch F.sdpa[math]", "fully masked rows (bool mask)")
    assert probe.observed == seen
    assert probe.status == ("same" if seen == "zero" else "differs (known)")

    k5, v5 = (torch.randn(1, 2, 5, 4, dtype=torch.float64, generator=g) for _ in range(2))
    causal = F.scaled_dot_product_attention(q, k5, v5, is_causal=True)
    upper_left = torch.ones(3, 5, dtype=torch.bool).tril()
    lower_right = torch.ones(3, 5, dtype=torch.bool).tril(diagonal=2)
    if torch.allclose(causal, F.scaled_dot_product_attention(q, k5, v5, attn_mask=upper_left)):
        seen = "upper_left"
    elif torch.allclose(causal, F.scaled_dot_product_attention(q, k5, v5, attn_mask=lower_right)):
        seen = "lower_right"
    else:
        seen = "other"
    probe = torch_report.probe("torch F.sdpa[default]", "is_causal alignment (n_q < n_k)")
    assert probe.observed == seen

    mha = torch.nn.MultiheadAttention(4, 2, batch_first=True, dtype=torch.float64)
    x = torch.randn(1, 3, 4, dtype=torch.float64, generator=g)
    m = torch.tensor([[False, True, False], [True, False, False], [False, False, True]])
    _, w = mha(x, x, x, attn_mask=m, average_attn_weights=False)
    if torch.all(w[..., m] == 0) and torch.all(w[..., ~m] > 0):
        seen = "True = ignore"
    elif torch.all(w[..., ~m] == 0) and torch.all(w[..., m] > 0):
        seen = "True = attend"
    else:
        seen = "other"
    probe = torch_report.probe("torch nn.MultiheadAttention", "boolean attn_mask meaning")
    assert probe.observed == seen
    assert probe.status == ("same" if seen == "True = attend" else "differs (known)")

    row_dead = torch.zeros(3, 3, dtype=torch.bool)
    row_dead[0] = True  # True = ignore: query 0 attends nothing
    for need_weights in (True, False):
        y, _ = mha(x, x, x, attn_mask=row_dead, need_weights=need_weights)
        row = y[0, 0].detach().numpy()
        if np.isnan(row).all():
            seen = "nan"
        else:  # undo the output projection: the heads' attention output for that row
            w_o, b_o = mha.out_proj.weight.detach().numpy(), mha.out_proj.bias.detach().numpy()
            heads = np.linalg.solve(w_o, row - b_o)
            seen = "zero" if np.abs(heads).max() < 1e-12 else "other"
        probe = torch_report.probe(
            "torch nn.MultiheadAttention", f"fully masked rows (need_weights={need_weights})"
        )
        assert probe.observed == seen, need_weights


def test_torch_layers_are_compared(torch_report):
    import refattn

    # Each row's worst gradient must be one of the op's own gradients and within its tolerance.
    # Which one is worst is not asserted: for self-attention query, key and value are the same
    # tensor, and which of their rounding errors is largest depends on the CPU's BLAS kernel.
    for impl, grads in (
        ("torch nn.MultiheadAttention", ("dquery", "dkey", "dvalue")),
        ("torch nn.TransformerEncoderLayer", ("dx",)),
    ):
        rows = [r for r in torch_report.rows if r.kernel == impl]
        assert {r.dtype for r in rows} == {"float64", "float32"}
        for r in rows:
            root = r.worst.split(".", 1)[0]
            assert root == "dparams" or root in grads, (r.case, r.dtype, r.worst)
            assert r.worst_error <= r.worst_allowed, (r.case, r.dtype, r.worst)
    assert refattn.__version__


def test_run_prints_the_table_and_exits_zero():
    pytest.importorskip("torch")
    status, text = _run("torch", "--dtypes", "float32")
    assert status == 0
    assert "Known semantic differences" in text
    assert "case" in text and "allowed" in text and "status" in text
    assert "True = ignore" in text


def test_a_broken_framework_is_caught(monkeypatch):
    """A kernel that is off by 1e-3 relative fails, and the command exits 1."""
    torch = pytest.importorskip("torch")
    real = torch.nn.functional.scaled_dot_product_attention

    def broken(*args, **kwargs):
        return real(*args, **kwargs) * 1.001

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", broken)
    report = compare.compare("torch", quick=True, dtypes=("float32",))
    sdpa_rows = [r for r in report.rows if r.kernel.startswith("torch F.sdpa")]
    assert sdpa_rows and all(r.status == "FAIL" for r in sdpa_rows)
    assert not report.ok
    status, _ = _run("torch", "--dtypes", "float32")
    assert status == 1


# ----------------------------------------------------------------------------- JAX


def test_jax_quick_grid_passes(jax_report):
    _assert_all_pass(jax_report)
    assert {r.dtype for r in jax_report.rows if r.status != "n/a"} == set(JAX_TEST_DTYPES)
    n_a = {r.case: r.note for r in jax_report.rows if r.status == "n/a"}
    assert n_a == {"causal_lower_right_nq12_nk20": "lacks causal_lower_right"}
    # JAX's fully masked rows are the values' average: left out, the other rows judged
    dead = [r for r in jax_report.rows if r.case == "fully_masked_rows"]
    assert dead and all("uniform_average (known difference; left out)" in r.note for r in dead)
    judged = [r for r in jax_report.rows if r.status != "n/a"]
    assert all(r.worst in ("lse", "dq", "dk", "dv") for r in judged)


def test_jax_semantic_table_matches_jax(jax_report):
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    name = "jax.nn.dot_product_attention[default]"
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 3, 2, 4)) for _ in range(3))  # (B, T, N, H)
    mask = np.ones((1, 2, 3, 3), dtype=bool)
    mask[:, :, 1] = False
    with jax.enable_x64(True):
        out, lse = jax.nn.dot_product_attention(
            jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask=mask, return_residual=True
        )
        exact = jax.nn.dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
    seen = _rows_behaviour(np.asarray(out)[0, 1], v[0].mean(axis=0))
    probe = jax_report.probe(name, "fully masked rows (bool mask)")
    assert probe.observed == seen
    assert probe.status == ("same" if seen == "zero" else "differs (known)")

    dead_lse = np.asarray(lse)[0, 1]
    if np.isneginf(dead_lse).all():
        seen = "-inf"
    elif np.isfinite(dead_lse).all() and (dead_lse < -1e30).all():
        seen = "large finite negative"
    else:
        seen = "other"
    assert jax_report.probe(name, "logsumexp of fully masked rows").observed == seen

    # float64 inputs: float64 accuracy (~1e-16) or a float32 softmax inside (~1e-8)?
    s = np.einsum("tnh,snh->nts", q[0], k[0]) / 2.0
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    err = np.abs(np.asarray(exact)[0] - np.einsum("nts,snh->tnh", p, v[0])).max()
    seen = "float64" if err < 1e-13 else ("float32" if err < 1e-5 else "other")
    probe = jax_report.probe(name, "precision of float64 inputs")
    assert probe.observed == seen
    float64_rows = [r for r in jax_report.rows if r.dtype == "float64"]
    assert float64_rows
    assert all(("judged as float32" in r.note) == (seen == "float32") for r in float64_rows)
    assert jax_report.probe(name, "boolean mask meaning").observed == "True = attend"
    assert jax_report.probe(name, "is_causal alignment (n_q < n_k)").observed == "upper_left"


# ----------------------------------------------------------------------------- classification


def test_classify_masked_rows():
    v_mean = np.array([[0.5, -1.0]])
    assert compare.classify_masked_rows(np.zeros((1, 2)), v_mean, "float32") == "zero"
    assert compare.classify_masked_rows(np.full((1, 2), np.nan), v_mean, "float32") == "nan"
    assert compare.classify_masked_rows(v_mean + 1e-9, v_mean, "float64") == "uniform_average"
    assert compare.classify_masked_rows(v_mean + 0.5, v_mean, "float64") == "other"
