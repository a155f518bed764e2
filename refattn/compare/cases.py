"""The case grid of ``refattn compare``: attention cases, their seeded inputs, the rule's
constants and the dtypes."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np  # the comparison harness works on host copies; refattn ops run on NumPy

from ..ops.masks import causal_mask
from ..testing.conformance import DTYPES as DTYPES  # the same dtypes and rule constants
from ..testing.conformance import FACTOR as FACTOR
from ..testing.conformance import FLOOR_ULPS as FLOOR_ULPS
from ..testing.conformance import WARN_FACTOR as WARN_FACTOR

FRAMEWORKS = ("torch", "jax")
LAYER_DTYPES = ("float64", "float32")


# ----------------------------------------------------------------------------- the grid


@dataclass(frozen=True)
class AttentionCase:
    """One attention problem of the grid (refattn layout ``(B, H, n, d)``)."""

    name: str
    batch: int = 2
    h_q: int = 2
    h_kv: int = 2
    n_q: int = 16
    n_k: int = 16
    d: int = 16
    d_v: int = 16
    #: None, "random" (about 25% masked, every row keeps a key) or "fully_masked_rows"
    mask: str | None = None
    bias: bool = False
    #: None, "upper_left" (the framework's is_causal), "lower_right_mask" (an explicit boolean
    #: mask), "lower_right_bias" (torch's causal_lower_right attention bias)
    causal: str | None = None
    scale: float | None = None
    logit_scale: float = 1.0
    quick: bool = False

    @property
    def seed(self) -> int:
        return zlib.crc32(self.name.encode())


ATTENTION_CASES = (
    AttentionCase("basic", quick=True),
    AttentionCase("cross_nq12_nk20_dv8", n_q=12, n_k=20, d_v=8),
    AttentionCase("bool_mask", mask="random"),
    AttentionCase("bias", bias=True),
    AttentionCase("causal_upper_left_nq12_nk20", n_q=12, n_k=20, causal="upper_left", quick=True),
    AttentionCase(
        "causal_lower_right_mask_nq12_nk20", n_q=12, n_k=20, causal="lower_right_mask", quick=True
    ),
    AttentionCase("causal_lower_right_bias_nq12_nk20", n_q=12, n_k=20, causal="lower_right_bias"),
    AttentionCase("gqa_4q_2kv_causal", h_q=4, h_kv=2, causal="upper_left", quick=True),
    AttentionCase("fully_masked_rows", mask="fully_masked_rows", quick=True),
    AttentionCase("scale_0.3", scale=0.3),
    AttentionCase("large_logits_x8", logit_scale=8.0),
)


@dataclass
class Inputs:
    """Float64 host inputs of a case, and refattn's options for it."""

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    cotangent: np.ndarray
    mask: np.ndarray | None  # (B, 1, n_q, n_k), True = attend, without the causal part
    bias: np.ndarray | None  # (1, 1, n_q, n_k)
    options: dict[str, Any]  # refattn options except bias
    dead_rows: np.ndarray  # (B, H, n_q) rows with no key left (mask AND causal)


def make_inputs(case: AttentionCase) -> Inputs:
    """Seeded float64 inputs for ``case``."""
    rng = np.random.default_rng(case.seed)
    b, hq, hkv = case.batch, case.h_q, case.h_kv
    q = rng.standard_normal((b, hq, case.n_q, case.d)) * case.logit_scale
    k = rng.standard_normal((b, hkv, case.n_k, case.d))
    v = rng.standard_normal((b, hkv, case.n_k, case.d_v))
    cotangent = rng.standard_normal((b, hq, case.n_q, case.d_v))
    mask = None
    if case.mask is not None:
        mask = rng.random((b, 1, case.n_q, case.n_k)) > 0.25
        mask[..., np.arange(case.n_q), np.arange(case.n_q) % case.n_k] = True
        if case.mask == "fully_masked_rows":
            mask[..., 1, :] = False
            mask[..., case.n_q - 2, :] = False
    bias = rng.standard_normal((1, 1, case.n_q, case.n_k)) if case.bias else None
    options: dict[str, Any] = {}
    if mask is not None:
        options["mask"] = mask
    keep = np.ones((b, hq, case.n_q, case.n_k), dtype=bool) if mask is None else mask
    if case.causal is not None:
        alignment = "upper_left" if case.causal == "upper_left" else "lower_right"
        options["is_causal"] = True
        options["causal_alignment"] = alignment
        keep = keep & causal_mask(case.n_q, case.n_k, alignment)
    if case.scale is not None:
        options["scale"] = case.scale
    dead = ~np.broadcast_to(keep, (b, hq, case.n_q, case.n_k)).any(axis=-1)
    return Inputs(q, k, v, cotangent, mask, bias, options, dead)
