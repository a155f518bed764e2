"""JAX: ``jax.nn.dot_product_attention`` (outputs, gradients and the logsumexp of
``return_residual=True``: :func:`refattn.testing.conformance.jax_kernel`) and
``flax.linen.dot_product_attention`` when flax is installed."""

from __future__ import annotations

import importlib.util
import math
from typing import Any

from ..testing.conformance import Kernel, jax_kernel
from .cases import DTYPES, attention_cases
from .report import CompareReport, Unavailable
from .rows import attention_probes, attention_rows, unsupported_note


def flax_kernel(device: Any) -> Kernel:
    """``flax.linen.dot_product_attention`` as a conformance kernel: it scales ``q`` by
    ``1/sqrt(d)`` itself (another scale is folded into ``q``) and has no ``is_causal`` (the
    causal rule is given as a mask) and no GQA."""

    def attention(
        q: Any,
        k: Any,
        v: Any,
        *,
        mask: Any = None,
        bias: Any = None,
        is_causal: bool = False,
        causal_alignment: str = "upper_left",
        scale: float | None = None,
    ) -> Any:
        import flax.linen
        import jax.numpy as jnp

        if scale is not None:
            q = q * (scale * math.sqrt(q.shape[-1]))
        if is_causal:
            n_q, n_k = q.shape[1], k.shape[1]
            offset = n_k - n_q if causal_alignment == "lower_right" else 0
            causal = jnp.tril(jnp.ones((n_q, n_k), dtype=bool), offset)
            mask = causal if mask is None else mask & causal
        return flax.linen.dot_product_attention(q, k, v, bias=bias, mask=mask)

    attention.__name__ = "flax.linen.dot_product_attention"
    attention.native_is_causal = False  # type: ignore[attr-defined]  # the alignment probe: n/a
    features = {"mask", "bias", "causal", "causal_lower_right", "cross", "scale", "grad"}
    features |= {"extreme_logits"}
    return Kernel(
        attention, framework="jax", features=features, dtypes=DTYPES, layout="BSHD", device=device
    )


def compare_jax(report: CompareReport, device: str, quick: bool, dtypes: tuple[str, ...]) -> None:
    import jax

    report.notes.append(f"jax {jax.__version__}")
    if device == "cuda":
        try:
            dev = jax.devices("gpu")[0]
        except RuntimeError as exc:
            raise Unavailable(f"JAX sees no GPU ({unsupported_note(exc)})") from None
        implementations: list[str | None] = ["xla", "cudnn"]
    else:
        dev = "cpu"
        implementations = [None]
    kernels = [jax_kernel(implementation=i, device=dev, dtypes=DTYPES) for i in implementations]
    if importlib.util.find_spec("flax") is not None:
        kernels.append(flax_kernel(dev))
    else:
        report.notes.append("flax is not installed: flax.linen.dot_product_attention skipped")
    kernels, behaviours = attention_probes(report, kernels)
    attention_rows(report, kernels, attention_cases(quick), dtypes, behaviours)
