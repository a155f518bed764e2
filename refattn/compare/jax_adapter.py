"""JAX: ``jax.nn.dot_product_attention`` (outputs, gradients and the logsumexp of
``return_residual=True``) and ``flax.linen.dot_product_attention`` when flax is installed."""

from __future__ import annotations

import importlib.util
import math
from typing import Any

import numpy as np  # the comparison harness works on host copies; refattn ops run on NumPy

from ..ops.masks import causal_mask
from .cases import ATTENTION_CASES, AttentionCase, Inputs
from .references import Reference, References
from .report import CompareReport, Unavailable
from .rows import attention_probes, attention_rows, unsupported_note

# ----------------------------------------------------------------------------- JAX


class _JaxAttention:
    """``jax.nn.dot_product_attention`` (or flax's) in JAX's (B, T, N, H) layout.

    Each call is one jitted function of ``(q, k, v, cotangent, mask, bias)`` returning the
    output, the gradients and the logsumexp (``return_residual=True``), so that cases with the
    same shapes share one compilation: an absent mask is passed as all-True, an absent bias as
    zeros (both exact no-ops).
    """

    def __init__(self, name: str, fn: Any, device: Any, implementation: str | None) -> None:
        self.name = name
        self.fn = fn
        self.device = device
        self.implementation = implementation
        self.is_flax = name.startswith("flax")
        self._jitted: dict[tuple[Any, ...], Any] = {}
        self._eager_dtypes: set[str] = set()

    def unsupported(self, case: AttentionCase) -> str:
        """Why ``case`` cannot be expressed with this function ("" when it can)."""
        if case.causal == "lower_right_bias":
            return "torch's causal_lower_right bias; the lower_right_mask case covers JAX"
        if case.d_v != case.d:
            return "requires d_v == d_k"
        if self.is_flax and case.h_q != case.h_kv:
            return "flax.linen.dot_product_attention has no GQA"
        return ""

    def _function(self, is_causal: bool, scale: float | None) -> Any:
        key = (is_causal, scale)
        if key not in self._jitted:
            import jax
            import jax.numpy as jnp

            fn, flax = self.fn, self.is_flax
            extra = {} if self.implementation is None else {"implementation": self.implementation}

            def forward(q: Any, k: Any, v: Any, mask: Any, bias: Any) -> Any:
                if flax:  # flax scales q by 1/sqrt(d) itself and has no is_causal (mask has it)
                    if scale is not None:
                        q = q * (scale * math.sqrt(q.shape[-1]))
                    return fn(q, k, v, bias=bias, mask=mask), None
                return fn(
                    q,
                    k,
                    v,
                    bias=bias,
                    mask=mask,
                    scale=scale,
                    is_causal=is_causal,
                    return_residual=True,
                    **extra,
                )

            def run(q: Any, k: Any, v: Any, ct: Any, mask: Any, bias: Any) -> Any:
                (out, lse), pullback = jax.vjp(
                    lambda a, b, c: forward(a, b, c, mask, bias), q, k, v
                )
                grads = pullback((ct, None if lse is None else jnp.zeros_like(lse)))
                return out, grads, lse

            self._jitted[key] = (jax.jit(run), run)
        return self._jitted[key]

    def run(
        self,
        case: AttentionCase,
        inputs: Inputs,
        ref: Reference,
        dtype: str,
        *,
        mask: np.ndarray | None = None,
        want_grads: bool = True,
    ) -> tuple[np.ndarray, Any, Any]:
        """``(out, (dq, dk, dv), lse)`` in refattn's layout on the reference's rounded inputs."""
        import jax
        import jax.numpy as jnp

        keep = inputs.mask if mask is None else mask
        causal = case.causal
        if causal == "lower_right_mask" or (self.is_flax and causal == "upper_left"):
            alignment = "upper_left" if causal == "upper_left" else "lower_right"
            c = causal_mask(case.n_q, case.n_k, alignment)
            keep = c if keep is None else keep & c
        full = (case.batch, 1, case.n_q, case.n_k)
        keep = np.ones(full, dtype=bool) if keep is None else np.broadcast_to(keep, full)
        bias = np.zeros((1, 1, case.n_q, case.n_k)) if ref.bias is None else ref.bias

        with jax.enable_x64(True):

            def put(x: np.ndarray, dt: Any = dtype) -> Any:
                return jax.device_put(jnp.asarray(x, dtype=dt), self.device)

            q, k, v, ct = (put(np.swapaxes(x, 1, 2)) for x in (ref.q, ref.k, ref.v, ref.cotangent))
            jitted, eager = self._function(causal == "upper_left" and not self.is_flax, case.scale)
            args = (q, k, v, ct, put(keep, bool), put(bias))
            if dtype in self._eager_dtypes:
                out, grads, lse = eager(*args)
            else:
                try:
                    out, grads, lse = jitted(*args)
                except ValueError as exc:
                    # float16 on the CPU: JAX asks dot_general for an F16_F16_F32 precision the
                    # CPU lacks; eagerly JAX catches that and falls back, under jit it cannot.
                    if "not supported by dot_general" not in str(exc):
                        raise
                    self._eager_dtypes.add(dtype)
                    out, grads, lse = eager(*args)
            out = _from_jax(out)
            grads = tuple(_from_jax(g) for g in grads) if want_grads else None
            lse = None if lse is None else _from_jax(lse)  # (B, T, N) -> (B, N, T)
        return out, grads, lse


def _from_jax(x: Any) -> np.ndarray:
    return np.swapaxes(np.asarray(x), 1, 2)


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
        dev = jax.devices("cpu")[0]
        implementations = [None]
    impls = [
        _JaxAttention(
            f"jax.nn.dot_product_attention[{impl or 'default'}]",
            jax.nn.dot_product_attention,
            dev,
            impl,
        )
        for impl in implementations
    ]
    if importlib.util.find_spec("flax") is not None:
        import flax.linen

        impls.append(
            _JaxAttention(
                "flax.linen.dot_product_attention", flax.linen.dot_product_attention, dev, None
            )
        )
    else:
        report.notes.append("flax is not installed: flax.linen.dot_product_attention skipped")
    refs = References()
    precision = attention_probes(report, impls, refs)
    cases = [c for c in ATTENTION_CASES if c.quick or not quick]
    attention_rows(report, impls, cases, dtypes, refs, precision)
