"""SDPA's local ``window=(left, right)``, aligned like the causal diagonal, in both kernels.

References: ``jax.nn.dot_product_attention(local_window_size=...)`` (upper-left aligned) and
FlashAttention's ``attention_ref`` window rule (lower-right aligned: key ``j`` is hidden from
query ``i`` iff ``j > i + n_k - n_q + right`` or ``j < i + n_k - n_q - left``), written here in
torch and differentiated by autograd.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import randn, rel_err, to_numpy

import refattn
from refattn.ops.sdpa import problem
from refattn.ops.sdpa.tiled import make_plan

sdpa = refattn.scaled_dot_product_attention

KERNELS = [
    pytest.param({"implementation": "materialized"}, id="materialized"),
    pytest.param({"implementation": "tiled", "block_size": (3, 4)}, id="tiled"),
]
WINDOWS = [(2, 1), (0, 0), (3, None), (None, 2), (1, 0)]


def _inputs(n_q, n_k, seed=0, d_v=3):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((2, 4, n_q, 5))
    k = rng.standard_normal((2, 2, n_k, 5))
    v = rng.standard_normal((2, 2, n_k, d_v))
    return q, k, v, rng


def _flash_keep(n_q, n_k, window, causal, offset):
    """FlashAttention's local mask (with the diagonal at ``offset``), as a keep array."""
    i, j = np.arange(n_q)[:, None], np.arange(n_k)[None, :]
    left, right = window
    keep = np.ones((n_q, n_k), bool)
    if right is not None:
        keep &= j <= i + offset + right
    if left is not None:
        keep &= j >= i + offset - left
    if causal:
        keep &= j <= i + offset
    return keep


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize(("n_q", "n_k"), [(9, 9), (6, 11), (11, 6)])
@pytest.mark.parametrize("causal", [False, True])
def test_lower_right_matches_flash_attention_rule(kernel, window, n_q, n_k, causal):
    torch = pytest.importorskip("torch")
    q, k, v, rng = _inputs(n_q, n_k)
    options = {"window": window, "is_causal": causal, "causal_alignment": "lower_right"}
    (out, lse), pullback = refattn.vjp(sdpa, q, k, v, return_lse=True, **options, **kernel)
    d_out = rng.standard_normal(out.shape)
    grads = pullback((d_out, None))
    keep = _flash_keep(n_q, n_k, window, causal, n_k - n_q)
    tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
    s = tq @ tk.repeat_interleave(2, dim=1).transpose(-1, -2) / np.sqrt(5)
    s = s.masked_fill(~torch.tensor(keep), -torch.inf)
    p = torch.nan_to_num(torch.softmax(s, dim=-1))  # FA: fully masked rows give 0
    t_out = p @ tv.repeat_interleave(2, dim=1)
    t_grads = torch.autograd.grad(t_out, (tq, tk, tv), torch.tensor(d_out))
    assert rel_err(out, t_out.detach().numpy()) <= 1e-13
    dead = ~keep.any(axis=1)
    assert np.all(np.isneginf(lse[..., dead])) and np.all(out[..., dead, :] == 0)
    for g, t in zip(grads, t_grads, strict=True):
        # window (0, 0) leaves one key per row: its weight is 1 whatever q is, so dq is exactly
        # 0 in torch and rounding-sized here; compare against the gradients' own scale
        scale = max(x.abs().max().item() for x in t_grads)
        assert np.abs(g - t.numpy()).max() <= 1e-12 * float(scale)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("window", [2, (2, 1), (1, 3)])
def test_upper_left_matches_jax_local_window_size(kernel, window):
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    q, k, v, _ = _inputs(7, 10, d_v=5)  # JAX wants d_v = d_k
    out = sdpa(q, k, v, window=window, **kernel)
    jw = window if isinstance(window, tuple) else (window, window)
    swap = (0, 2, 1, 3)  # refattn (B, H, n, d) <-> JAX (B, n, H, d)
    j_out = jax.nn.dot_product_attention(
        *(np.transpose(x, swap) for x in (q, k, v)), local_window_size=jw
    )
    j_out = np.transpose(np.asarray(j_out), swap)
    # JAX's XLA path computes this op at float32 accuracy even with x64 on (refattn compare
    # probes it the same way); a wrong band or alignment is off by 1e-2 and more
    assert rel_err(out, j_out) <= 1e-6
    other = sdpa(q, k, v, window=window, causal_alignment="lower_right", **kernel)
    assert rel_err(other, j_out) > 1e-2


def test_tiled_skips_tiles_outside_the_band():
    n, block, w = 1024, 64, 64
    x = np.zeros((n, 4))
    pb = problem.prepare(x, x, x, window=(w, 0), implementation="tiled")
    banded = make_plan(pb, (block, block))
    full = make_plan(dataclasses.replace(pb, pattern=None), (block, block))
    assert full.n_tiles == (n // block) ** 2
    assert banded.n_tiles == 2 * (n // block) - 1  # the diagonal tiles and the ones left of them


@pytest.mark.parametrize("kernel", KERNELS)
def test_gradcheck(kernel):
    q, k, v, _ = _inputs(4, 5)
    assert refattn.gradcheck(sdpa, q[:1, :2], k[:1, :1], v[:1, :1], window=(1, 1), **kernel)


def test_every_backend(xp):
    q, k, v = (randn(xp, (2, 9, 4), seed=s) for s in range(3))
    out = sdpa(q, k, v, window=(2, 1), implementation="tiled", block_size=4)
    keep = xp.asarray(_flash_keep(9, 9, (2, 1), False, 0))
    assert rel_err(to_numpy(out), to_numpy(sdpa(q, k, v, mask=keep))) <= 1e-13


def test_multi_head_attention_takes_a_window():
    params = refattn.init_multi_head_attention(8, 2, seed=3)
    x = np.random.default_rng(4).standard_normal((1, 6, 8))
    keep = _flash_keep(6, 6, (1, 1), False, 0)
    y = refattn.multi_head_attention(params, x, x, x, n_heads=2, window=1)
    assert rel_err(y, refattn.multi_head_attention(params, x, x, x, n_heads=2, mask=keep)) <= 1e-14


@pytest.mark.parametrize("bad", [-1, 1.5, (1,), (1, -2), (True, 1), "2"])
def test_bad_window_is_rejected(bad):
    q, k, v, _ = _inputs(4, 5)
    with pytest.raises(ValueError, match="window must be"):
        sdpa(q, k, v, window=bad)
