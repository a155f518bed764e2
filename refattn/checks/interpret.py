"""Check cases for the interpretability ops (issue 20): entropy and rollout.

The references are the direct formulas, differentiated by torch's and JAX's autodiff:
``-Σ p log p`` with ``log`` taken of ``where(p > 0, p, 1)`` (so that autodiff sees no
``0 · log 0``), and rollout as the plain product of the renormalised, fused layer matrices. The
weights are softmaxes of random logits (every entry positive, so that finite differences stay
non-negative); ``check_rows=False`` lets gradcheck perturb them off the simplex.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..interpret.entropy import attention_entropy
from ..interpret.rollout import attention_rollout
from . import Case, register_case


def _weights(rng: np.random.Generator, shape: tuple[int, ...], spread: float = 1.5) -> np.ndarray:
    x = rng.standard_normal(shape) * spread
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _entropy_case(shape, *, axis: int = -1, where: str | None = None):
    def make(rng):
        w = _weights(rng, shape)
        options: dict[str, Any] = {"axis": axis, "check_rows": False}
        if axis != -1:
            w = np.moveaxis(w, -1, axis)
        if where is not None:
            keep = rng.random(w.shape) > 0.3
            keep[..., 0, :] = False  # a fully masked row
            keep[..., 1, :] = True
            options["where"] = keep
        return (w,), options

    return make


def _entropy_ref(lib: Any, where_fn: Any, primals, options):
    (p,) = primals
    on = p > 0
    keep = options.get("where")
    if keep is not None:
        on = on & keep
    safe = where_fn(on, p, lib.ones_like(p))
    return -(where_fn(on, p * lib.log(safe), lib.zeros_like(p))).sum(options.get("axis", -1))


def _torch_entropy(torch, primals, options):
    return _entropy_ref(torch, torch.where, primals, options)


def _jax_entropy(jnp, primals, options):
    return _entropy_ref(jnp, jnp.where, primals, options)


for _name, _make in (
    ("rows", _entropy_case((2, 3, 4, 6))),
    ("axis0", _entropy_case((5, 3), axis=0)),
    ("where_fully_masked_row", _entropy_case((2, 4, 6), where="some")),
):
    register_case(
        Case(
            attention_entropy,
            _name,
            _make,
            torch_ref=_torch_entropy,
            jax_ref=_jax_entropy,
            tags=("interpret",),
        )
    )


def _rollout_case(layers: int, shape, *, residual=0.5, head_fusion="mean", discard_ratio=0.0):
    def make(rng):
        w = np.stack([_weights(rng, shape) for _ in range(layers)])
        return (w,), {
            "residual": residual,
            "head_fusion": head_fusion,
            "discard_ratio": discard_ratio,
            "check_rows": False,
        }

    return make


def _rollout_ref(lib: Any, primals, options):
    (w,) = primals
    r = options["residual"]
    fusion = options["head_fusion"]
    n = w.shape[-1]
    eye = lib.eye(n, dtype=w.dtype)
    result = None
    for layer in range(w.shape[0]):
        a = w[layer]
        if fusion == "mean":
            f = a.mean(-3)
        else:
            f = a.max(-3) if fusion == "max" else a.min(-3)
            f = f if not hasattr(f, "values") else f.values
        t = r * eye + (1.0 - r) * f
        t = t / t.sum(-1, keepdims=True)
        result = t if result is None else t @ result
    return result


def _torch_rollout(torch, primals, options):
    return _rollout_ref(torch, primals, options)


def _jax_rollout(jnp, primals, options):
    return _rollout_ref(jnp, primals, options)


for _name, _make in (
    ("mean", _rollout_case(3, (2, 4, 5, 5))),
    ("max_residual_0.3", _rollout_case(2, (3, 4, 4), residual=0.3, head_fusion="max")),
    ("min_no_residual", _rollout_case(2, (3, 4, 4), residual=0.0, head_fusion="min")),
):
    register_case(
        Case(
            attention_rollout,
            _name,
            _make,
            torch_ref=_torch_rollout,
            jax_ref=_jax_rollout,
            tags=("interpret",),
        )
    )
