"""Kernels under test: the declaration (:class:`Kernel`), calling one on a case's rounded inputs
in its framework (:func:`call`), and the ready adapters for torch's SDPA and JAX."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np  # the harness works on host copies; refattn's reference runs on NumPy

from .catalogue import DTYPES, FEATURES, Case

#: torch's SDPA backends by refattn compare's names
TORCH_BACKENDS = ("default", "math", "flash", "efficient", "cudnn")


@dataclass
class Kernel:
    """An attention function under test, and what it declares.

    ``fn(q, k, v, **options)`` (:mod:`refattn.testing.conformance`). ``framework`` is "torch",
    "jax" or "numpy" (arrays are passed as that library's, gradients come from its autodiff; a
    NumPy kernel gives them through ``vjp(q, k, v, d_out, **options) -> (dq, dk, dv[, dsinks])``,
    or declares no "grad"). ``device`` is torch's device string or a JAX device.
    ``computes_in`` declares a precision below the inputs' (``{"float64": "float32"}``: JAX's
    softmax; TF32 matmuls would be ``{"float32": ...}`` of their own): those rows are judged by
    that dtype's rule, and say so.
    """

    fn: Callable[..., Any]
    framework: str = "torch"
    features: Iterable[str] = ()
    dtypes: tuple[str, ...] = ("float32",)
    layout: str = "BHSD"
    name: str = ""  # the function's __name__ when not given
    vjp: Callable[..., Any] | None = None
    device: Any = "cpu"
    computes_in: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.features = frozenset(self.features)
        unknown = sorted(self.features - FEATURES)
        if unknown:
            raise ValueError(
                f"refattn.testing.conformance: unknown features {unknown}; known: "
                f"{sorted(FEATURES)}"
            )
        if self.framework not in ("torch", "jax", "numpy"):
            raise ValueError(
                "refattn.testing.conformance: framework must be 'torch', 'jax' or 'numpy', got "
                f"{self.framework!r}"
            )
        bad = [d for d in (*self.dtypes, *self.computes_in.values()) if d not in DTYPES]
        if bad:
            raise ValueError(
                f"refattn.testing.conformance: dtypes must be among {DTYPES}, got {bad}"
            )
        if self.layout not in ("BHSD", "BSHD"):
            raise ValueError(
                f"refattn.testing.conformance: layout must be 'BHSD' or 'BSHD', got {self.layout!r}"
            )
        if self.framework == "numpy" and "grad" in self.features and self.vjp is None:
            raise ValueError(
                "refattn.testing.conformance: a NumPy kernel that declares 'grad' gives its "
                "gradients as vjp=; got none"
            )
        if not self.name:
            self.name = getattr(self.fn, "__name__", "kernel")

    def lacks(self, case: Case) -> list[str]:
        """The features ``case`` needs that the kernel does not declare."""
        return sorted(case.needs - self.features)


# ----------------------------------------------------------------------------- calling kernels

Outputs = tuple[np.ndarray, "np.ndarray | None", "tuple[np.ndarray, ...] | None"]


def call(
    kernel: Kernel,
    arrays: dict[str, np.ndarray | None],
    options: dict[str, Any],
    dtype: str,
    *,
    grads: bool = True,
) -> Outputs:
    """``(out, lse or None, grads or None)`` of ``kernel`` as float64 host arrays in refattn's
    layout (``grads``: ``(dq, dk, dv[, dsinks])`` for the ``cotangent``, when the kernel
    declares "grad").

    ``arrays`` are float64 host arrays holding ``dtype``'s values (``q, k, v, cotangent``,
    ``sinks`` and ``bias`` or None); ``options`` the case's, with its boolean ``mask``.
    """
    grads = grads and "grad" in kernel.features
    framework = {"torch": _Torch, "jax": _Jax, "numpy": _Numpy}[kernel.framework]
    xp = framework(kernel, dtype)
    with xp.context():
        names = ("q", "k", "v", "sinks")
        leaves = tuple(xp.array(arrays[n], grad=grads) for n in names if arrays[n] is not None)
        opts = dict(options)
        if "mask" in opts:
            opts["mask"] = xp.array(opts["mask"], dtype="bool")
        if arrays["bias"] is not None:
            opts["bias"] = xp.array(arrays["bias"])
        ct = xp.array(arrays["cotangent"]) if grads else None
        out, lse, found = xp.run(leaves, opts, ct)
        host = xp.host
        return host(out), None if lse is None else host(lse), found and tuple(map(host, found))


def _apply(kernel: Kernel, leaves: tuple[Any, ...], options: dict[str, Any]) -> tuple[Any, Any]:
    """The kernel on ``(q, k, v[, sinks])`` in refattn's layout: ``(out, lse or None)``."""
    extra = {"sinks": leaves[3]} if len(leaves) > 3 else {}
    found = kernel.fn(*(_layout(x, kernel.layout) for x in leaves[:3]), **options, **extra)
    out, lse = (found[0], found[1]) if isinstance(found, tuple) else (found, None)
    return _layout(out, kernel.layout), lse


def _layout(x: Any, layout: str) -> Any:
    """BHSD <-> BSHD (axes 1 and 2) in ``x``'s own library (array API ``permute_dims``)."""
    if layout == "BHSD":
        return x
    if hasattr(x, "requires_grad"):  # torch (array-api-compat's permute_dims would copy)
        return x.transpose(1, 2)
    import array_api_compat

    return array_api_compat.array_namespace(x).permute_dims(x, (0, 2, 1, 3))


class _Torch:
    """torch tensors on ``kernel.device``, gradients by ``torch.autograd.grad``."""

    def __init__(self, kernel: Kernel, dtype: str) -> None:
        import torch

        self.torch, self.kernel, self.dtype = torch, kernel, getattr(torch, dtype)

    def context(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def array(self, x: np.ndarray, *, grad: bool = False, dtype: str | None = None) -> Any:
        t = self.torch.from_numpy(np.ascontiguousarray(x)).to(self.kernel.device)
        return t if dtype == "bool" else t.to(self.dtype).requires_grad_(grad)

    def host(self, t: Any) -> np.ndarray:
        return t.detach().to(device="cpu", dtype=self.torch.float64).numpy()

    def run(self, leaves: tuple[Any, ...], options: dict[str, Any], ct: Any) -> Any:
        out, lse = _apply(self.kernel, leaves, options)
        return out, lse, None if ct is None else self.torch.autograd.grad(out, leaves, ct)


#: jitted JAX programs by (kernel function, layout, static options, array options, grads):
#: cases of one shape share a compilation
_JAX_PROGRAMS: dict[tuple[Any, ...], Any] = {}


class _Jax:
    """JAX arrays on ``kernel.device`` (64-bit types enabled for the call), gradients by
    ``jax.vjp`` with a zero LSE cotangent, under ``jax.jit`` (array options are arguments,
    the others static), eagerly where jit cannot run the dtype."""

    def __init__(self, kernel: Kernel, dtype: str) -> None:
        import jax
        import jax.numpy as jnp

        self.jax, self.jnp, self.kernel, self.dtype = jax, jnp, kernel, getattr(jnp, dtype)
        self.device = None if kernel.device == "cpu" else kernel.device

    def context(self) -> contextlib.AbstractContextManager[Any]:
        return self.jax.enable_x64(True)

    def array(self, x: np.ndarray, *, grad: bool = False, dtype: str | None = None) -> Any:
        a = self.jnp.asarray(x, dtype=bool if dtype == "bool" else self.dtype)
        return a if self.device is None else self.jax.device_put(a, self.device)

    def host(self, x: Any) -> np.ndarray:
        wide = self.jnp.float64 if x.dtype == self.jnp.float64 else self.jnp.float32
        return np.asarray(self.jnp.asarray(x, dtype=wide), dtype=np.float64)

    def run(self, leaves: tuple[Any, ...], options: dict[str, Any], ct: Any) -> Any:
        arrays = {k: x for k, x in options.items() if hasattr(x, "shape")}
        static = tuple(sorted((k, x) for k, x in options.items() if k not in arrays))
        key = (self.kernel.fn, self.kernel.layout, static, tuple(sorted(arrays)), ct is None)
        if key not in _JAX_PROGRAMS:
            _JAX_PROGRAMS[key] = self._program(dict(static))
        jitted, eager = _JAX_PROGRAMS[key]
        try:
            return jitted(leaves, arrays, ct)
        except ValueError as exc:
            # float16 on the CPU: JAX asks dot_general for an F16_F16_F32 precision the CPU
            # lacks; eagerly JAX catches that and falls back, under jit it cannot
            if "not supported by dot_general" not in str(exc):
                raise
            return eager(leaves, arrays, ct)

    def _program(self, static: dict[str, Any]) -> tuple[Any, Any]:
        jax, jnp, kernel = self.jax, self.jnp, self.kernel

        def program(leaves: tuple[Any, ...], arrays: dict[str, Any], ct: Any) -> Any:
            def f(*xs: Any) -> tuple[Any, Any]:
                return _apply(kernel, xs, {**static, **arrays})

            if ct is None:
                return (*f(*leaves), None)
            (out, lse), pullback = jax.vjp(f, *leaves)
            return out, lse, pullback((ct, None if lse is None else jnp.zeros_like(lse)))

        return jax.jit(program), program


class _Numpy:
    """NumPy arrays in the dtype, gradients by the kernel's own ``vjp``."""

    def __init__(self, kernel: Kernel, dtype: str) -> None:
        if dtype == "bfloat16":
            raise ValueError(
                "refattn.testing.conformance: NumPy has no bfloat16; list other dtypes"
            )
        self.kernel, self.dtype = kernel, dtype

    def context(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def array(self, x: np.ndarray, *, grad: bool = False, dtype: str | None = None) -> Any:
        return np.asarray(x, dtype=dtype or self.dtype)

    def host(self, x: Any) -> np.ndarray:
        return np.asarray(x, dtype=np.float64)

    def run(self, leaves: tuple[Any, ...], options: dict[str, Any], ct: Any) -> Any:
        kernel = self.kernel
        out, lse = _apply(kernel, leaves, options)
        if ct is None:
            return out, lse, None
        assert kernel.vjp is not None  # checked by Kernel
        extra = {"sinks": leaves[3]} if len(leaves) > 3 else {}
        args = [_layout(x, kernel.layout) for x in (*leaves[:3], ct)]
        found = kernel.vjp(*args, **options, **extra)
        return out, lse, tuple(_layout(g, kernel.layout) if g.ndim == 4 else g for g in found)


# ----------------------------------------------------------------------------- ready kernels


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the frameworks' warnings (kernel-selection notes, causal_lower_right's NaN note)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _torch_backend(backend: str) -> contextlib.AbstractContextManager[Any]:
    if backend == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    enum = {
        "math": SDPBackend.MATH,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
    }[backend]
    return sdpa_kernel([enum])


def torch_sdpa_kernel(
    backend: str = "default", *, device: str = "cpu", dtypes: tuple[str, ...] = ("float32",)
) -> Kernel:
    """``torch.nn.functional.scaled_dot_product_attention`` on one backend (``backend`` one of
    :data:`TORCH_BACKENDS`, chosen with ``torch.nn.attention.sdpa_kernel``), adapted to the
    calling convention: masks and bias as ``attn_mask`` (a bias and a mask together as one
    float mask with -inf), upper-left causal as ``is_causal``, lower-right causal alone as
    torch's own ``causal_lower_right`` bias (and with a mask as an explicit boolean mask), GQA
    with ``enable_gqa``."""
    if backend not in TORCH_BACKENDS:
        raise ValueError(
            f"refattn.testing.conformance: backend must be one of {TORCH_BACKENDS}, got {backend!r}"
        )

    def sdpa(
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
        import torch
        import torch.nn.functional as F

        kwargs: dict[str, Any] = {"scale": scale}
        if q.shape[1] != k.shape[1]:
            kwargs["enable_gqa"] = True
        n_q, n_k = q.shape[2], k.shape[2]
        attn_mask = None
        if is_causal and mask is None and bias is None:
            if causal_alignment == "upper_left":
                kwargs["is_causal"] = True
            else:
                from torch.nn.attention.bias import causal_lower_right

                with quiet():
                    attn_mask = causal_lower_right(n_q, n_k)
        else:
            keep = mask
            if is_causal:
                offset = n_k - n_q if causal_alignment == "lower_right" else 0
                causal = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril(offset)
                keep = causal if keep is None else keep & causal
            attn_mask = keep
            if bias is not None:
                attn_mask = bias if keep is None else bias.masked_fill(~keep, -torch.inf)
        with quiet(), _torch_backend(backend):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, **kwargs)

    sdpa.__name__ = f"torch F.sdpa[{backend}]"
    # what torch's SDPA cannot express (it returns no LSE either)
    features = FEATURES - {"window", "softcap", "sinks", "varlen", "lse"}
    return Kernel(sdpa, framework="torch", features=features, dtypes=dtypes, device=device)


def jax_kernel(
    *,
    implementation: str | None = None,
    device: Any = "cpu",
    dtypes: tuple[str, ...] = ("float32",),
) -> Kernel:
    """``jax.nn.dot_product_attention`` (``implementation`` None, "xla" or "cudnn"), adapted:
    its ``(B, S, H, D)`` layout, masks, bias, upper-left causal, ``local_window_size``, and
    the LSE of ``return_residual=True``. Its fully masked rows are the average of all values
    and their LSE a large finite negative number (not refattn's 0 and -inf), so
    "fully_masked_rows" is not declared; its softmax runs in float32 for float64 inputs, so it
    declares ``computes_in={"float64": "float32"}``."""

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
        window: tuple[int, int] | None = None,
    ) -> Any:
        import jax

        if causal_alignment != "upper_left":  # not declared: the catalogue never asks
            raise ValueError("jax.nn.dot_product_attention's is_causal is upper-left only")

        out, lse = jax.nn.dot_product_attention(
            q,
            k,
            v,
            bias=bias,
            mask=mask,
            scale=scale,
            is_causal=is_causal,
            local_window_size=window,
            implementation=implementation,
            return_residual=True,
        )
        return out, jax.numpy.swapaxes(lse, 1, 2)  # (B, S, H) -> (B, H, S)

    attention.__name__ = f"jax.nn.dot_product_attention[{implementation or 'default'}]"
    # what it cannot express: its dead rows are not refattn's, is_causal is upper-left only,
    # it needs d_v == d, and it has no softcap, sinks or (lower-right) varlen
    lacks = {"fully_masked_rows", "causal_lower_right", "d_v", "softcap", "sinks", "varlen"}
    features = FEATURES - lacks
    return Kernel(
        attention,
        framework="jax",
        features=features,
        dtypes=dtypes,
        layout="BSHD",
        device=device,
        computes_in={"float64": "float32"},
    )
