"""SDPA with ``normalizer="sparsemax"|"entmax"``: the materialized kernel against torch autograd
of the direct formula built on the public ``entmax`` package (``sparsemax``, ``entmax15``,
``entmax_bisect``), with masks, causal, GQA, dropout and the softcap."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import randn, rel_err, to_numpy

import refattn

sdpa = refattn.scaled_dot_product_attention


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    q = 2.0 * rng.standard_normal((2, 4, 6, 5))
    k = 2.0 * rng.standard_normal((2, 2, 7, 5))
    v = rng.standard_normal((2, 2, 7, 3))
    return q, k, v, rng


def _package_normalizer(normalizer, alpha):
    entmax = pytest.importorskip("entmax")
    torch = pytest.importorskip("torch")
    if normalizer == "sparsemax":
        return lambda s: entmax.sparsemax(s, dim=-1)
    if alpha == 1.5:
        return lambda s: entmax.entmax15(s, dim=-1)
    return lambda s: entmax.entmax_bisect(s, torch.tensor(alpha, dtype=s.dtype), dim=-1, n_iter=100)


@pytest.mark.parametrize(
    ("normalizer", "alpha"), [("sparsemax", None), ("entmax", None), ("entmax", 1.25)]
)
@pytest.mark.parametrize("causal", [False, True])
def test_matches_the_entmax_package_under_torch_autograd(normalizer, alpha, causal):
    torch = pytest.importorskip("torch")
    norm = _package_normalizer(normalizer, 1.5 if alpha is None else alpha)
    q, k, v, rng = _inputs(1)
    mask = rng.random((2, 1, 6, 7)) < 0.85
    mask[..., 0] = True
    options = {"normalizer": normalizer, "alpha": alpha, "mask": mask, "is_causal": causal}
    (out, w), pullback = refattn.vjp(sdpa, q, k, v, return_weights=True, **options)
    d_out, d_w = rng.standard_normal(out.shape), rng.standard_normal(w.shape)
    grads = pullback((d_out, d_w))
    keep = mask & (np.tril(np.ones((6, 7), bool)) if causal else True)
    tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
    s = tq @ tk.repeat_interleave(2, dim=1).transpose(-1, -2) / np.sqrt(5)
    t_w = norm(s.masked_fill(~torch.tensor(keep), -torch.inf))
    t_out = t_w @ tv.repeat_interleave(2, dim=1)
    cts = (torch.tensor(d_out), torch.tensor(d_w))
    t_grads = torch.autograd.grad((t_out, t_w), (tq, tk, tv), cts)
    keep_full = np.broadcast_to(keep, w.shape)
    assert np.all(w[~keep_full] == 0) and np.any(w[keep_full] == 0)  # masked, and sparse
    tol = 1e-12 if alpha is None else 1e-10  # entmax_bisect stops at its own tolerance
    assert rel_err(w, t_w.detach().numpy()) <= tol
    assert rel_err(out, t_out.detach().numpy()) <= tol
    for g, t in zip(grads, t_grads, strict=True):
        assert rel_err(g, t.numpy()) <= tol


@pytest.mark.parametrize("normalizer", ["sparsemax", "entmax"])
def test_gradcheck_with_dropout_and_softcap(normalizer):
    q, k, v, rng = _inputs(2)
    drop = rng.random((2, 4, 3, 4)) < 0.8
    assert refattn.gradcheck(
        sdpa,
        q[:, :, :3],
        k[:, :, :4],
        v[:, :, :4],
        normalizer=normalizer,
        dropout_mask=drop,
        dropout_p=0.2,
        softcap=3.0,
    )


def test_alpha_one_is_softmax_and_two_is_sparsemax():
    q, k, v, _ = _inputs(3)
    assert rel_err(sdpa(q, k, v, normalizer="entmax", alpha=1.0), sdpa(q, k, v)) <= 1e-13
    two = sdpa(q, k, v, normalizer="entmax", alpha=2.0)
    assert rel_err(two, sdpa(q, k, v, normalizer="sparsemax")) <= 1e-13


def test_every_backend(xp):
    q, k, v = (randn(xp, (2, 6, 4), seed=s) for s in range(3))
    out = sdpa(q, k, v, normalizer="entmax")
    assert out.dtype == q.dtype
    qn, kn = to_numpy(q), to_numpy(k)
    p = refattn.entmax(qn @ np.swapaxes(kn, -1, -2) / 2.0)
    assert rel_err(to_numpy(out), p @ to_numpy(v)) <= 1e-13


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"normalizer": "relu"}, ValueError, "normalizer must be"),
        ({"normalizer": "sparsemax", "alpha": 1.5}, ValueError, "alpha is for normalizer"),
        ({"normalizer": "entmax", "alpha": 2.5}, ValueError, r"alpha must be in \[1, 2\]"),
        ({"normalizer": "entmax", "alpha": np.ones(2)}, TypeError, "compose with"),
        ({"normalizer": "entmax", "return_lse": True}, ValueError, "has no LSE"),
        ({"normalizer": "sparsemax", "implementation": "tiled"}, ValueError, "materialized"),
    ],
)
def test_bad_normalizer_options(options, error, message):
    q, k, v, _ = _inputs(4)
    with pytest.raises(error, match=message):
        sdpa(q, k, v, **options)
