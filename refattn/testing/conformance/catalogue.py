"""The case catalogue of the conformance suite: features, cases, their seeded inputs and every
masking rule of a case as one explicit boolean array (docs/reference.md has it as a table)."""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np  # the harness works on host copies; refattn's reference runs on NumPy

DTYPES = ("float64", "float32", "float16", "bfloat16")
FEATURES = frozenset(
    {
        "mask",
        "bias",
        "fully_masked_rows",
        "causal",
        "causal_lower_right",
        "gqa",
        "cross",
        "d_v",
        "scale",
        "window",
        "softcap",
        "sinks",
        "varlen",
        "extreme_logits",
        "lse",
        "grad",
    }
)


@dataclass(frozen=True)
class Case:
    """One problem of the catalogue: shapes, the options passed to the kernel, the features it
    needs (:mod:`refattn.testing.conformance`)."""

    name: str
    needs: frozenset[str] = frozenset()
    batch: int = 2
    h_q: int = 2
    h_kv: int = 2
    n_q: int = 16
    n_k: int = 16
    d: int = 16
    d_v: int = 16
    mask: str | None = None  # None, "random" or "dead_rows" (two rows see nothing)
    bias: bool = False  # an additive (1, 1, n_q, n_k) score bias, not differentiated
    causal: str | None = None  # None, "upper_left", "lower_right"
    window: tuple[int | None, int | None] | None = None
    softcap: float | None = None
    sinks: bool = False
    query_lengths: tuple[int, ...] | None = None
    key_lengths: tuple[int, ...] | None = None
    scale: float | None = None
    logit_scale: float = 1.0

    @property
    def seed(self) -> int:
        return zlib.crc32(self.name.encode())

    def options(self) -> dict[str, Any]:
        """The kernel's keyword options for this case (arrays are added by :func:`inputs`)."""
        options: dict[str, Any] = {}
        if self.causal is not None:
            options.update(is_causal=True, causal_alignment=self.causal)
        for name in ("window", "softcap", "scale", "query_lengths", "key_lengths"):
            if getattr(self, name) is not None:
                options[name] = getattr(self, name)
        return options


def _case(name: str, needs: Iterable[str] = (), **fields: Any) -> Case:
    return Case(name, frozenset(needs), **fields)


#: the catalogue. Rows that see no key (the dead-row mask, padded varlen rows) need no feature:
#: a kernel that does not declare "fully_masked_rows" is judged on the other rows only.
CASES: tuple[Case, ...] = (
    _case("basic"),
    _case("cross_nq12_nk20", ("cross",), n_q=12, n_k=20),
    _case("d_v8", ("d_v",), d_v=8),
    _case("gqa_4q_2kv", ("gqa",), h_q=4, h_kv=2),
    _case("mask", ("mask",), mask="random"),
    _case("fully_masked_rows", ("mask",), mask="dead_rows"),
    _case("bias", ("bias",), bias=True),
    _case("causal", ("causal",), causal="upper_left"),
    _case("causal_nq12_nk20", ("causal", "cross"), n_q=12, n_k=20, causal="upper_left"),
    _case(
        "causal_lower_right_nq12_nk20",
        ("causal_lower_right", "cross"),
        n_q=12,
        n_k=20,
        causal="lower_right",
    ),
    _case("causal_gqa", ("causal", "gqa"), h_q=4, h_kv=1, causal="upper_left"),
    _case("window_3_3", ("window",), window=(3, 3)),
    _case(
        "window_causal_lower_right",
        ("window", "causal_lower_right", "cross"),
        n_q=12,
        n_k=20,
        causal="lower_right",
        window=(5, 0),
    ),
    _case("softcap_5", ("softcap",), softcap=5.0, logit_scale=3.0),
    _case("sinks", ("sinks",), sinks=True),
    _case(
        "sinks_causal_gqa",
        ("sinks", "causal", "gqa"),
        h_q=4,
        h_kv=2,
        sinks=True,
        causal="upper_left",
    ),
    _case(
        "varlen_causal_lower_right",
        ("varlen", "causal_lower_right"),  # its padded query rows see nothing
        causal="lower_right",
        query_lengths=(16, 5),
        key_lengths=(16, 9),
    ),
    _case("scale_0.3", ("scale",), scale=0.3),
    _case("extreme_logits", ("extreme_logits",), logit_scale=18.0),
)


def case(name: str) -> Case:
    """The catalogue's case called ``name``."""
    for c in CASES:
        if c.name == name:
            return c
    raise KeyError(
        f"refattn.testing.conformance: no case {name!r}; cases: {[c.name for c in CASES]}"
    )


@dataclass
class Inputs:
    """Float64 host inputs of a case: arrays, the options with their arrays (the boolean mask;
    ``bias`` and ``sinks`` are rounded per dtype and added by the caller), the explicit keep
    mask (every masking rule as one boolean array) and the rows that see no key."""

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    sinks: np.ndarray | None
    bias: np.ndarray | None
    cotangent: np.ndarray
    options: dict[str, Any]
    keep: np.ndarray  # (B, 1, n_q, n_k)
    dead: np.ndarray  # (B, Hq, n_q)

    @property
    def arrays(self) -> dict[str, np.ndarray | None]:
        """The floating arrays a dtype rounds: ``q, k, v, sinks, bias, cotangent``."""
        names = ("q", "k", "v", "sinks", "bias", "cotangent")
        return {name: getattr(self, name) for name in names}


def inputs(case: Case) -> Inputs:
    """Seeded float64 inputs of ``case`` (the same on every machine)."""
    rng = np.random.default_rng(case.seed)
    b, hq, hkv, n_q, n_k = case.batch, case.h_q, case.h_kv, case.n_q, case.n_k
    q = rng.standard_normal((b, hq, n_q, case.d)) * case.logit_scale
    k = rng.standard_normal((b, hkv, n_k, case.d))
    v = rng.standard_normal((b, hkv, n_k, case.d_v))
    cotangent = rng.standard_normal((b, hq, n_q, case.d_v))
    sinks = rng.standard_normal(hq) if case.sinks else None
    options = case.options()
    keep = np.ones((b, 1, n_q, n_k), dtype=bool)
    if case.mask is not None:
        mask = rng.random((b, 1, n_q, n_k)) > 0.25
        mask[..., np.arange(n_q), np.arange(n_q) % n_k] = True
        if case.mask == "dead_rows":
            mask[..., 1, :] = False
            mask[..., n_q - 2, :] = False
        options["mask"] = mask
        keep &= mask
    bias = rng.standard_normal((1, 1, n_q, n_k)) if case.bias else None
    keep &= _structured_keep(case)
    if case.query_lengths is not None:  # padded query rows see nothing
        keep &= (
            np.arange(n_q)[None, None, :, None] < np.array(case.query_lengths)[:, None, None, None]
        )
    dead = np.broadcast_to(~keep.any(axis=-1), (b, hq, n_q)).copy()
    return Inputs(q, k, v, sinks, bias, cotangent, options, keep, dead)


def _structured_keep(case: Case) -> np.ndarray:
    """Causal, window and key lengths as a ``(B, 1, n_q, n_k)`` mask, from FlashAttention's
    definitions (``attention_ref``'s ``construct_local_mask``): written out here, not taken from
    refattn's kernels."""
    b, n_q, n_k = case.batch, case.n_q, case.n_k
    q_len = np.array(case.query_lengths or (n_q,) * b)[:, None, None, None]
    k_len = np.array(case.key_lengths or (n_k,) * b)[:, None, None, None]
    offset = (k_len - q_len) if case.causal == "lower_right" else 0
    if case.causal is None and case.window is not None:
        offset = 0
    i = np.arange(n_q)[None, None, :, None]
    j = np.arange(n_k)[None, None, None, :]
    keep = np.broadcast_to(j < k_len, (b, 1, n_q, n_k)).copy()
    if case.causal is not None:
        keep &= j <= i + offset
    if case.window is not None:
        left, right = case.window
        if left is not None:
            keep &= j >= i + offset - left
        if right is not None:
            keep &= j <= i + offset + right
    return keep
