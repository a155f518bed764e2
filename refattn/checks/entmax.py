"""Check cases for sparsemax and α-entmax (issue 19).

The torch reference is the direct formula ``p = [1 + ε(x − m − s)]_+^{1/ε}`` (ε = α − 1,
softmax at ε = 0) differentiated by torch's autograd, independent of refattn's algorithm and of
the ``entmax`` package: the shift ``s`` is found by bisection without gradient, then one Newton
step ``s = s₀ − F(s₀)/F'(s₀)`` on ``F(s) = Σ p − 1`` is taken *with* autograd. At the root,
that step's derivative in ``x`` and α is the implicit-function derivative, so autograd of the
formula yields the exact VJP for x and α. Masked entries are filled with a large finite negative
number (below every threshold, so their weight is exactly 0), and fully masked slices are
multiplied by 0.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..ops.entmax import entmax, sparsemax
from . import Case, register_case

_BIG = 1e30


def _torch_entmax(torch, x, alpha, axis: int, mask):
    """Direct-formula α-entmax in torch (see the module docstring); ``alpha`` float or tensor."""
    if mask is not None:
        any_kept = mask.any(dim=axis, keepdim=True)
        x = torch.where(mask, x, torch.full_like(x, -_BIG))
    if not torch.is_tensor(alpha) and alpha == 1.0:
        p = torch.softmax(x, axis)
    else:
        eps = alpha - 1.0
        m = x.detach().amax(dim=axis, keepdim=True)

        def weights(s):
            base = torch.clamp(1.0 + eps * (x - m - s), min=0.0)
            return base ** (1.0 / eps), base

        with torch.no_grad():
            n = x.shape[axis]
            hi = torch.zeros_like(m) + (1.0 - n ** (-eps)) / eps
            lo = torch.zeros_like(hi)
            for _ in range(200):
                mid = (lo + hi) / 2
                above = weights(mid)[0].sum(dim=axis, keepdim=True) >= 1.0
                lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
            s0 = lo
        p0, base0 = weights(s0)
        slope = -(torch.where(base0 > 0, base0 ** (1.0 / eps - 1.0), torch.zeros_like(base0)))
        s = s0 - (p0.sum(dim=axis, keepdim=True) - 1.0) / slope.sum(dim=axis, keepdim=True)
        p = weights(s)[0]
        p = p / p.sum(dim=axis, keepdim=True).detach()
    if mask is not None:
        p = p * any_kept
    return p


def _make(shape, *, axis: int = -1, masked: str | None = None, alpha: Any = None, scale=2.0):
    """``alpha``: None (sparsemax / default), a float (an option), or a shape (an array primal)."""

    def make(rng: np.random.Generator):
        x = rng.standard_normal(shape) * scale
        options: dict[str, Any] = {"axis": axis}
        primals: tuple[Any, ...] = (x,)
        if isinstance(alpha, float):
            options["alpha"] = alpha
        elif alpha is not None:
            primals = (x, 1.15 + 0.8 * rng.random(alpha))
        if masked is not None:
            mask = rng.random(shape) > 0.3
            if masked == "full_row":
                index = [0] * len(shape)
                index[axis] = slice(None)
                mask[tuple(index)] = False
            options["mask"] = mask
        return primals, options

    return make


def _torch_sparsemax(torch, primals, options):
    (x,) = primals
    return _torch_entmax(torch, x, 2.0, options.get("axis", -1), options.get("mask"))


def _torch_entmax_ref(torch, primals, options):
    x = primals[0]
    alpha = primals[1] if len(primals) > 1 else options.get("alpha", 1.5)
    return _torch_entmax(torch, x, alpha, options.get("axis", -1), options.get("mask"))


for _name, _make_fn in (
    ("plain", _make((3, 7))),
    ("axis0", _make((6, 3), axis=0)),
    ("mask", _make((2, 3, 6), masked="some")),
    ("fully_masked_row", _make((3, 6), masked="full_row")),
):
    register_case(Case(sparsemax, _name, _make_fn, torch_ref=_torch_sparsemax, tags=("entmax",)))

for _name, _make_fn in (
    ("default_1.5", _make((3, 7))),
    ("alpha_1", _make((3, 7), alpha=1.0)),
    ("alpha_1.25", _make((3, 7), alpha=1.25)),
    ("alpha_2_axis0", _make((6, 3), axis=0, alpha=2.0)),
    ("alpha_per_head", _make((2, 3, 4, 6), alpha=(3, 1, 1))),
    ("alpha_per_row_mask", _make((2, 4, 6), alpha=(2, 4, 1), masked="some")),
    ("alpha_1.7_fully_masked_row", _make((3, 6), alpha=1.7, masked="full_row")),
):
    register_case(Case(entmax, _name, _make_fn, torch_ref=_torch_entmax_ref, tags=("entmax",)))
