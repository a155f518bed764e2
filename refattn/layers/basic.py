r"""Basic layer ops: affine maps, layer normalisation, activations and the feed-forward block.

Parameters are plain nested dicts of arrays and gradients come back with the same structure.

* An affine map is ``{"weight": (d_in, d_out), "bias": (d_out,)}`` used as ``y = x @ weight +
  bias`` (``bias`` may be absent). This is the transpose of torch's ``nn.Linear.weight``
  ``(out, in)``; :mod:`refattn.interop.torch` converts.
* A layer norm is ``{"weight": (d,), "bias": (d,)}`` (``bias`` may be absent, as with torch's
  ``nn.LayerNorm(bias=False)``).
* A feed-forward block is ``{"linear1": affine (d_model, d_ff), "linear2": affine (d_ff,
  d_model)}``.

Every op here is an :class:`refattn.Op` with its own backward: ``refattn.vjp(linear, params, x)``
returns ``(dparams, dx)``. Composite layers (:mod:`refattn.layers.attention`,
:mod:`refattn.layers.transformer`) call the private ``_*_fwd``/``_*_bwd`` pairs by hand.

The ``init_*`` functions follow torch's default initialisation *schemes* (distributions and
bounds), drawing the numbers on the host with ``numpy.random.default_rng(seed)`` and moving them
to the requested namespace with ``xp.asarray``: the values are reproducible per seed, but they
are not the numbers torch's own RNG would draw.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

from .._backend import (
    check_floating,
    default_namespace,
    describe,
    floating_dtype,
    namespace,
    real_number,
)
from .._op import Op
from .._runtime import matmul
from ..ops.sdpa.problem import dropout_scale

__all__ = [
    "ACTIVATIONS",
    "feed_forward",
    "gelu",
    "gelu_tanh",
    "init_feed_forward",
    "init_layer_norm",
    "init_linear",
    "layer_norm",
    "linear",
    "relu",
]

Array = Any
Params = dict[str, Any]

_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_INV_SQRT_PI = 1.0 / math.sqrt(math.pi)
_TANH_C = math.sqrt(2.0 / math.pi)
_TANH_A = 0.044715


# ----------------------------------------------------------------------------- parameter checks


def join_path(prefix: str, key: str) -> str:
    """``"self_attn" + "query" -> "self_attn.query"`` (an empty prefix gives ``key``)."""
    return f"{prefix}.{key}" if prefix else key


def get_subtree(op: str, params: Any, key: str, prefix: str) -> Any:
    """``params[key]``, or a clear error naming the key path when it is missing."""
    path = join_path(prefix, key)
    if not isinstance(params, Mapping):
        where = prefix or "params"
        raise TypeError(
            f"refattn.{op}: parameters '{where}' must be a dict, got {type(params).__name__}"
        )
    if key not in params:
        raise ValueError(
            f"refattn.{op}: missing parameter '{path}' (keys present under "
            f"'{prefix or 'params'}': {sorted(params)})"
        )
    return params[key]


def _check_leaf(
    op: str, xp: ModuleType, x: Any, path: str, shape: tuple[int | None, ...], dtype: Any
) -> None:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"refattn.{op}: parameter '{path}' must be an array, got {describe(x)}")
    if len(x.shape) != len(shape) or any(
        want is not None and got != want for got, want in zip(x.shape, shape, strict=False)
    ):
        parts = ["·" if s is None else str(s) for s in shape]
        expected = f"({parts[0]},)" if len(parts) == 1 else "(" + ", ".join(parts) + ")"
        raise ValueError(
            f"refattn.{op}: parameter '{path}' must have shape {expected}, got {describe(x)}"
        )
    check_floating(xp, f"{op}: parameter '{path}'", x)
    if x.dtype != dtype:
        raise TypeError(
            f"refattn.{op}: parameter '{path}' must have the inputs' dtype {dtype}, got {x.dtype}"
        )


def check_affine(
    op: str,
    xp: ModuleType,
    params: Any,
    prefix: str,
    *,
    d_in: int | None,
    d_out: int | None,
    dtype: Any,
) -> tuple[int, int]:
    """Validate an affine map ``{"weight": (d_in, d_out), "bias"?: (d_out,)}``.

    ``prefix`` is the map's key path (``"self_attn.query"``) for error messages; ``d_in`` and
    ``d_out`` are the sizes required by the caller (None = any). Returns ``(d_in, d_out)``.
    """
    weight = get_subtree(op, params, "weight", prefix)
    path = join_path(prefix, "weight")
    _check_leaf(op, xp, weight, path, (d_in, d_out), dtype)
    d_in, d_out = int(weight.shape[0]), int(weight.shape[1])
    extra = sorted(set(params) - {"weight", "bias"})
    if extra:
        raise ValueError(
            f"refattn.{op}: unexpected parameter(s) {[join_path(prefix, k) for k in extra]} "
            "(an affine map has 'weight' and optionally 'bias')"
        )
    if "bias" in params:
        _check_leaf(op, xp, params["bias"], join_path(prefix, "bias"), (d_out,), dtype)
    return d_in, d_out


def check_norm(op: str, xp: ModuleType, params: Any, prefix: str, *, d: int, dtype: Any) -> None:
    """Validate a layer norm ``{"weight": (d,), "bias"?: (d,)}``."""
    weight = get_subtree(op, params, "weight", prefix)
    _check_leaf(op, xp, weight, join_path(prefix, "weight"), (d,), dtype)
    extra = sorted(set(params) - {"weight", "bias"})
    if extra:
        raise ValueError(
            f"refattn.{op}: unexpected parameter(s) {[join_path(prefix, k) for k in extra]} "
            "(a layer norm has 'weight' and optionally 'bias')"
        )
    if "bias" in params:
        _check_leaf(op, xp, params["bias"], join_path(prefix, "bias"), (d,), dtype)


def batch_first_view(op: str, xp: ModuleType, batch_first: Any, **inputs: Any) -> list[Any]:
    """The ``inputs`` as ``(..., batch, n, d)``: as they are when ``batch_first`` (refattn's
    layout), else the sequence-first ``(n, batch, d)`` of torch's ``batch_first=False``
    swapped to it (views). Each input is checked first."""
    if not isinstance(batch_first, bool):
        raise TypeError(f"refattn.{op}: batch_first must be a bool, got {batch_first!r}")
    for name, x in inputs.items():
        check_input(op, xp, name, x, min_ndim=2 if batch_first else 3)
    if batch_first:
        return list(inputs.values())
    return [swap_batch_and_sequence(xp, x) for x in inputs.values()]


def batch_first_vjp(
    backward: Callable[..., tuple[Any, ...]], saved: Any, dy: Any, batch_first: bool, *extra: Any
) -> tuple[Any, ...]:
    """``backward(saved, dy, *extra) -> (param_grads, *input_grads)``, written for refattn's
    batch-first layout, for a call in either layout: a sequence-first call
    (``batch_first=False``) swaps ``dy`` in and every input gradient out (``saved.xp`` is the
    namespace)."""
    if batch_first:
        return backward(saved, dy, *extra)
    swap = functools.partial(swap_batch_and_sequence, saved.xp)
    grads, *d_inputs = backward(saved, None if dy is None else swap(dy), *extra)
    return grads, *(swap(d) for d in d_inputs)


def swap_batch_and_sequence(xp: ModuleType, x: Any) -> Any:
    """``(..., n, batch, d) <-> (..., batch, n, d)`` (axes -3 and -2), a view."""
    nd = x.ndim
    return xp.permute_dims(x, (*range(nd - 3), nd - 2, nd - 3, nd - 1))


def check_input(op: str, xp: ModuleType, name: str, x: Any, *, min_ndim: int = 1) -> None:
    """TypeError/ValueError unless ``x`` is a floating array with at least ``min_ndim`` axes."""
    if not hasattr(x, "shape"):
        raise TypeError(f"refattn.{op}: {name} must be an array, got {describe(x)}")
    check_floating(xp, f"{op}: {name}", x)
    if x.ndim < min_ndim:
        raise ValueError(
            f"refattn.{op}: {name} must have at least {min_ndim} dimension(s), got {describe(x)}"
        )


def check_multiplier(
    op: str, xp: ModuleType, name: str, m: Any, shape: tuple[int, ...], dtype: Any
) -> Array | None:
    """A dropout multiplier broadcastable to ``shape``: bool/float mask -> ``dtype`` array."""
    if m is None:
        return None
    if not hasattr(m, "shape"):
        raise TypeError(f"refattn.{op}: {name} must be an array, got {describe(m)}")
    mshape = tuple(m.shape)
    ok = len(mshape) <= len(shape) and all(
        s in (1, t) for s, t in zip(reversed(mshape), reversed(shape), strict=False)
    )
    if not ok:
        raise ValueError(f"refattn.{op}: {name} of shape {mshape} does not broadcast to {shape}")
    if m.dtype != xp.bool and not xp.isdtype(m.dtype, "real floating"):
        raise TypeError(f"refattn.{op}: {name} must be boolean or floating, got {m.dtype}")
    return xp.astype(m, dtype)


# ----------------------------------------------------------------------------- linear


def affine_forward(xp: ModuleType, params: Params, x: Array) -> Array:
    """``x @ weight + bias`` over any leading axes, as one GEMM on the ``(M, d_in)`` view."""
    weight = params["weight"]
    lead = tuple(x.shape[:-1])
    y = matmul(xp, xp.reshape(x, (-1, x.shape[-1])), weight)
    if "bias" in params:
        y += params["bias"]  # y is the GEMM's own array
    return xp.reshape(y, (*lead, weight.shape[1]))


def affine_backward(
    xp: ModuleType, params: Params, x: Array, dy: Array, *, need_dx: bool = True
) -> tuple[Params, Array | None]:
    """``(dparams, dx)`` of :func:`affine_forward` (see :func:`_linear_bwd`)."""
    weight = params["weight"]
    d_in, d_out = weight.shape
    x2 = xp.reshape(x, (-1, d_in))
    dy2 = xp.reshape(dy, (-1, d_out))
    grads: Params = {"weight": matmul(xp, xp.matrix_transpose(x2), dy2)}
    if "bias" in params:
        grads["bias"] = xp.sum(dy2, axis=0)
    dx = None
    if need_dx:
        dx = xp.reshape(matmul(xp, dy2, xp.matrix_transpose(weight)), tuple(x.shape))
    return grads, dx


def _linear_fwd(params: Params, x: Array, /) -> tuple[Array, Any]:
    r"""Affine map ``y = x @ weight + bias`` over any leading axes.

    Parameters
    ----------
    params : {"weight": (d_in, d_out), "bias": (d_out,)}
        ``bias`` is optional. Same floating dtype as ``x``.
    x : (..., d_in)

    Returns
    -------
    y : (..., d_out)

    The leading axes are flattened so the product is one ``(M, d_in) @ (d_in, d_out)`` GEMM.
    """
    xp = namespace(x, *array_leaves(params))
    check_input("linear", xp, "x", x)
    check_affine("linear", xp, params, "", d_in=int(x.shape[-1]), d_out=None, dtype=x.dtype)
    return affine_forward(xp, params, x), (xp, params, x)


def _linear_bwd(residuals: Any, dy: Array, /) -> tuple[Params, Array]:
    r"""VJP of the affine map, with ``X`` the ``(M, d_in)`` view of ``x`` and ``dY`` of ``dy``.

    .. math::

        Y = XW + \mathbf 1 b^\top
        \quad\Rightarrow\quad
        dW = X^\top dY,\qquad db = \textstyle\sum_m dY_{m,:},\qquad dX = dY\,W^\top .

    (From ``dL = tr(dY^T dY_perturbation)`` with ``dY_perturbation = dX W + X dW + 1 db^T``.)
    """
    xp, params, x = residuals
    grads, dx = affine_backward(xp, params, x, dy)
    return grads, dx


linear = Op(_linear_fwd, _linear_bwd, name="linear", register=True)


def array_leaves(tree: Any) -> list[Any]:
    """The arrays of a parameter tree (nested mappings) in insertion order, other leaves skipped."""
    if isinstance(tree, Mapping):
        return [leaf for v in tree.values() for leaf in array_leaves(v)]
    return [tree] if hasattr(tree, "shape") else []


# ----------------------------------------------------------------------------- layer norm


def layer_norm_forward(
    xp: ModuleType, params: Params, x: Array, eps: float
) -> tuple[Array, tuple[Array, Array]]:
    """``(y, (x_hat, rstd))`` of :func:`_layer_norm_fwd` (no validation)."""
    mu = xp.mean(x, axis=-1, keepdims=True)
    x_hat = x - mu
    var = xp.vecdot(x_hat, x_hat, axis=-1)[..., None] / x.shape[-1]
    rstd = 1.0 / xp.sqrt(var + eps)
    x_hat *= rstd  # x_hat is x - mu, our own array
    y = x_hat * params["weight"]
    if "bias" in params:
        y += params["bias"]
    return y, (x_hat, rstd)


def layer_norm_backward(
    xp: ModuleType, params: Params, saved: tuple[Array, Array], dy: Array
) -> tuple[Params, Array]:
    """``(dparams, dx)`` of :func:`_layer_norm_fwd` (see :func:`_layer_norm_bwd`)."""
    x_hat, rstd = saved
    d = x_hat.shape[-1]
    dy2 = xp.reshape(dy, (-1, d))
    grads: Params = {"weight": xp.sum(dy2 * xp.reshape(x_hat, (-1, d)), axis=0)}
    if "bias" in params:
        grads["bias"] = xp.sum(dy2, axis=0)
    g = dy * params["weight"]
    mean_g = xp.mean(g, axis=-1, keepdims=True)
    mean_gx = xp.mean(g * x_hat, axis=-1, keepdims=True)
    dx = rstd * (g - mean_g - x_hat * mean_gx)
    return grads, dx


def _layer_norm_fwd(params: Params, x: Array, /, *, eps: float = 1e-5) -> tuple[Array, Any]:
    r"""Layer normalisation over the last axis (torch's ``nn.LayerNorm(d)`` semantics).

    .. math::

        \mu = \tfrac1d\textstyle\sum_c x_c,\quad
        \sigma^2 = \tfrac1d\textstyle\sum_c (x_c - \mu)^2 \ \text{(biased)},\quad
        \hat x = (x - \mu)/\sqrt{\sigma^2 + \varepsilon},\quad
        y = \hat x \circ w + b .

    Parameters
    ----------
    params : {"weight": (d,), "bias": (d,)}
        ``bias`` is optional.
    x : (..., d)
    eps : float
        Added to the variance (torch's default 1e-5).

    Returns
    -------
    y : (..., d)
    """
    xp = namespace(x, *array_leaves(params))
    check_input("layer_norm", xp, "x", x)
    check_norm("layer_norm", xp, params, "", d=int(x.shape[-1]), dtype=x.dtype)
    eps = check_eps("layer_norm", eps)
    y, saved = layer_norm_forward(xp, params, x, eps)
    return y, (xp, params, saved)


def _layer_norm_bwd(residuals: Any, dy: Array, /) -> tuple[Params, Array]:
    r"""VJP of layer normalisation, per row, with :math:`r = 1/\sqrt{\sigma^2+\varepsilon}`.

    .. math::

        dw = \textstyle\sum_{\text{rows}} dy \circ \hat x,\qquad
        db = \textstyle\sum_{\text{rows}} dy,\qquad g = dy \circ w,

    and, since :math:`\partial\mu/\partial x_c = 1/d` and
    :math:`\partial r/\partial x_c = -r^3 (x_c - \mu)/d = -r^2 \hat x_c / d`,

    .. math::

        \frac{\partial \hat x_a}{\partial x_c} = r\Bigl(\delta_{ac} - \frac1d
        - \frac{\hat x_a \hat x_c}{d}\Bigr)
        \quad\Rightarrow\quad
        dx = r\,\bigl(g - \overline{g} - \hat x\,\overline{g \circ \hat x}\bigr),

    where the bars are means over the normalised axis. The two means are the projections that
    remove the directions the normalisation forgets (shifts and rescalings of the row).
    """
    xp, params, saved = residuals
    return layer_norm_backward(xp, params, saved, dy)


layer_norm = Op(_layer_norm_fwd, _layer_norm_bwd, name="layer_norm", register=True)


def check_eps(op: str, eps: Any) -> float:
    """``eps`` as a finite float >= 0 (a layer norm's epsilon), else a clear error."""
    value = real_number(op, "eps", eps)
    if not value >= 0.0:
        raise ValueError(f"refattn.{op}: eps must be finite and >= 0, got {eps!r}")
    return value


# ----------------------------------------------------------------------------- erf


def erfc(xp: ModuleType, x: Array) -> Array:
    r"""The complementary error function on any array-API backend.

    NumPy uses ``scipy.special.erfc`` and CuPy ``cupyx.scipy.special.erfc`` (both are
    correctly rounded to within a few ulp). Other namespaces (array-api-strict, ...) use
    :func:`erfc_portable`, made of array-API operations only, accurate to about ``1.3e-15``
    absolute everywhere and ``1.2e-15`` relative for ``x >= 2.5``. No data leaves the device.
    """
    from array_api_compat import is_cupy_namespace, is_numpy_namespace

    if is_numpy_namespace(xp):
        import scipy.special

        return scipy.special.erfc(x)
    if is_cupy_namespace(xp):
        import cupyx.scipy.special

        return cupyx.scipy.special.erfc(x)
    return erfc_portable(xp, x)


#: terms of the Taylor series and depth of the continued fraction in :func:`erfc_portable`
_ERF_SERIES_TERMS = 50
_ERFC_CF_DEPTH = 50
_ERF_SPLIT = 2.5


def erfc_portable(xp: ModuleType, x: Array) -> Array:
    r"""``erfc(x)`` from array-API operations only (float32 and float64).

    For :math:`|x| < 2.5` the everywhere-convergent series with positive terms

    .. math::

        \operatorname{erf}(x) = \frac{2}{\sqrt\pi} e^{-x^2}
        \sum_{n\ge0} \frac{2^n x^{2n+1}}{1\cdot3\cdots(2n+1)}

    (50 terms: the last is below ``1e-17`` of the sum at ``|x| = 2.5``), and ``erfc = 1 - erf``.
    For :math:`|x| \ge 2.5` Laplace's continued fraction, evaluated bottom-up at depth 50,

    .. math::

        \operatorname{erfc}(x) = \frac{e^{-x^2}}{\sqrt\pi}\,
        \cfrac{1}{x + \cfrac{1/2}{x + \cfrac{1}{x + \cfrac{3/2}{x + \cdots}}}}

    and ``erfc(-x) = 2 - erfc(x)``. Measured against ``scipy.special.erfc`` on a dense grid:
    at most ``1.3e-15`` absolute error, and ``1.2e-15`` relative for ``x >= 2.5``. Each branch
    is evaluated on clamped arguments so that no intermediate overflows.
    """
    a = xp.abs(x)
    small = xp.minimum(a, _ERF_SPLIT)
    large = xp.maximum(a, _ERF_SPLIT)
    # series on [0, 2.5)
    s2 = small * small
    term = small
    total = small
    for n in range(1, _ERF_SERIES_TERMS):
        term = term * (2.0 / (2 * n + 1)) * s2
        total = total + term
    erf_small = (2.0 * _INV_SQRT_PI) * xp.exp(-s2) * total
    # continued fraction on [2.5, inf)
    f = large
    for k in range(_ERFC_CF_DEPTH, 0, -1):
        f = large + (0.5 * k) / f
    erfc_large = _INV_SQRT_PI * xp.exp(-(large * large)) / f
    erfc_abs = xp.where(a < _ERF_SPLIT, 1.0 - erf_small, erfc_large)
    return xp.where(x < 0, 2.0 - erfc_abs, erfc_abs)


def normal_cdf(xp: ModuleType, x: Array) -> Array:
    r""":math:`\Phi(x) = \tfrac12\operatorname{erfc}(-x/\sqrt2)` (relative accuracy for x < 0)."""
    return 0.5 * erfc(xp, -_SQRT_HALF * x)


# ----------------------------------------------------------------------------- activations


def relu_forward(xp: ModuleType, x: Array) -> tuple[Array, Any]:
    r"""``max(x, 0)`` elementwise."""
    keep = x > 0
    return xp.where(keep, x, 0.0), (xp, keep)


def _relu_bwd(residuals: Any, dy: Array, /) -> tuple[Array]:
    r"""VJP of ReLU: :math:`dx = dy\,[x > 0]` (the subgradient 0 at ``x = 0``, as torch)."""
    xp, keep = residuals
    return (xp.where(keep, dy, 0.0),)


def gelu_forward(xp: ModuleType, x: Array) -> tuple[Array, Any]:
    r"""GELU, the exact form: :math:`x\,\Phi(x) = \tfrac{x}{2}\,(1 + \operatorname{erf}(x/\sqrt2))`.

    torch's ``nn.GELU()`` / ``F.gelu(x)`` (``approximate="none"``). :math:`\Phi` is computed as
    ``erfc(-x/sqrt(2))/2`` (see :func:`erfc`), exact to float64 rounding on every backend.
    """
    cdf = normal_cdf(xp, x)
    return x * cdf, (xp, x, cdf)


def _gelu_bwd(residuals: Any, dy: Array, /) -> tuple[Array]:
    r"""VJP of exact GELU.

    .. math::

        \frac{d}{dx}\,x\Phi(x) = \Phi(x) + x\,\varphi(x),\qquad
        \varphi(x) = \frac{e^{-x^2/2}}{\sqrt{2\pi}} .
    """
    xp, x, cdf = residuals
    pdf = _INV_SQRT_2PI * xp.exp(-0.5 * (x * x))
    return (dy * (cdf + x * pdf),)


def gelu_tanh_forward(xp: ModuleType, x: Array) -> tuple[Array, Any]:
    r"""GELU, tanh approximation (torch's ``approximate="tanh"``).

    .. math::

        y = \tfrac{x}{2}\,(1 + \tanh u),\qquad u = \sqrt{2/\pi}\,(x + 0.044715\,x^3).
    """
    t = xp.tanh(_TANH_C * (x + _TANH_A * (x * x * x)))
    return 0.5 * x * (1.0 + t), (xp, x, t)


def _gelu_tanh_bwd(residuals: Any, dy: Array, /) -> tuple[Array]:
    r"""VJP of the tanh GELU.

    .. math::

        \frac{dy}{dx} = \tfrac12(1 + t) + \tfrac{x}{2}\,(1 - t^2)\,\sqrt{2/\pi}\,
        (1 + 3\cdot0.044715\,x^2),\qquad t = \tanh u .
    """
    _, x, t = residuals
    du = _TANH_C * (1.0 + (3.0 * _TANH_A) * (x * x))
    return (dy * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du),)


_ELEMENTWISE_DOC = """

    Parameters
    ----------
    x : (...) real floating

    Returns
    -------
    y : (...), same dtype.
    """


def _activation_op(name: str, forward: Any, backward: Any) -> Op:
    """The public op of an elementwise activation: ``x`` is checked, then ``forward(xp, x)``
    (whose docstring, with the shapes added, is the op's); the layers call ``forward`` itself."""

    def fwd(x: Array, /) -> tuple[Array, Any]:
        xp = namespace(x)
        check_input(name, xp, "x", x, min_ndim=0)
        return forward(xp, x)

    fwd.__doc__ = forward.__doc__.rstrip() + _ELEMENTWISE_DOC
    fwd.__name__ = fwd.__qualname__ = f"_{name}_fwd"
    return Op(fwd, backward, name=name, register=True)


relu = _activation_op("relu", relu_forward, _relu_bwd)
gelu = _activation_op("gelu", gelu_forward, _gelu_bwd)
gelu_tanh = _activation_op("gelu_tanh", gelu_tanh_forward, _gelu_tanh_bwd)

#: activation name -> (forward(xp, x) -> (y, residuals), backward(residuals, dy) -> (dx,))
ACTIVATIONS = {
    "relu": (relu_forward, _relu_bwd),
    "gelu": (gelu_forward, _gelu_bwd),
    "gelu_tanh": (gelu_tanh_forward, _gelu_tanh_bwd),
}


def check_activation(op: str, activation: Any) -> None:
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(
            f"refattn.{op}: activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}"
        )


# ----------------------------------------------------------------------------- feed-forward


def check_feed_forward(
    op: str, xp: ModuleType, params: Any, prefix: str, *, d_model: int, dtype: Any
) -> int:
    """Validate ``{"linear1": (d_model, d_ff), "linear2": (d_ff, d_model)}``; return ``d_ff``."""
    _, d_ff = check_affine(
        op,
        xp,
        get_subtree(op, params, "linear1", prefix),
        join_path(prefix, "linear1"),
        d_in=d_model,
        d_out=None,
        dtype=dtype,
    )
    check_affine(
        op,
        xp,
        get_subtree(op, params, "linear2", prefix),
        join_path(prefix, "linear2"),
        d_in=d_ff,
        d_out=d_model,
        dtype=dtype,
    )
    return d_ff


def feed_forward_forward(
    xp: ModuleType, params: Params, x: Array, activation: str, drop: Array | None
) -> tuple[Array, Any]:
    """``(y, residuals)`` of :func:`_feed_forward_fwd` (no validation); ``drop`` a multiplier."""
    act_fwd, _ = ACTIVATIONS[activation]
    h = affine_forward(xp, params["linear1"], x)
    a, act_res = act_fwd(xp, h)
    a_dropped = a if drop is None else a * drop
    y = affine_forward(xp, params["linear2"], a_dropped)
    return y, (x, act_res, a_dropped, drop)


def feed_forward_backward(
    xp: ModuleType,
    params: Params,
    residuals: Any,
    dy: Array,
    activation: str,
) -> tuple[Params, Array]:
    """``(dparams, dx)`` of :func:`_feed_forward_fwd` (see :func:`_feed_forward_bwd`)."""
    x, act_res, a_dropped, drop = residuals
    _, act_bwd = ACTIVATIONS[activation]
    g2, da = affine_backward(xp, params["linear2"], a_dropped, dy)
    if drop is not None:
        da = da * drop
    (dh,) = act_bwd(act_res, da)
    g1, dx = affine_backward(xp, params["linear1"], x, dh)
    return {"linear1": g1, "linear2": g2}, dx


def _feed_forward_fwd(
    params: Params,
    x: Array,
    /,
    *,
    activation: str = "relu",
    dropout_mask: Array | None = None,
    dropout_p: float = 0.0,
) -> tuple[Array, Any]:
    r"""The position-wise feed-forward block of a transformer layer.

    .. math::

        y = \mathrm{linear}_2\bigl(\mathrm{act}(\mathrm{linear}_1(x)) \circ M / (1 - p)\bigr)

    (torch: ``linear2(dropout(activation(linear1(x))))``).

    Parameters
    ----------
    params : {"linear1": {"weight": (d_model, d_ff), "bias"}, "linear2": {"weight": (d_ff,
        d_model), "bias"}}
    x : (..., d_model)
    activation : {"relu", "gelu", "gelu_tanh"}
    dropout_mask : bool or float, broadcastable to (..., d_ff), optional
        True/1 = keep; refattn draws no random numbers. Kept entries are scaled by
        ``1 / (1 - dropout_p)``.
    dropout_p : float in [0, 1)

    Returns
    -------
    y : (..., d_model)
    """
    xp = namespace(x, dropout_mask, *array_leaves(params))
    check_input("feed_forward", xp, "x", x)
    check_activation("feed_forward", activation)
    d_model = int(x.shape[-1])
    d_ff = check_feed_forward("feed_forward", xp, params, "", d_model=d_model, dtype=x.dtype)
    scale = dropout_scale("feed_forward", dropout_p)
    drop = check_multiplier(
        "feed_forward", xp, "dropout_mask", dropout_mask, (*x.shape[:-1], d_ff), x.dtype
    )
    if drop is None and scale != 1.0:
        raise ValueError(
            f"refattn.feed_forward: dropout_p={dropout_p} needs an explicit dropout_mask "
            "(True/1 = keep); refattn ops draw no random numbers"
        )
    if drop is not None and scale != 1.0:
        drop = drop * scale
    y, res = feed_forward_forward(xp, params, x, activation, drop)
    return y, (xp, params, res)


def _feed_forward_bwd(
    residuals: Any, dy: Array, /, *, activation: str = "relu"
) -> tuple[Params, Array]:
    r"""VJP of the feed-forward block: the chain rule through its three pieces, in reverse.

    With :math:`h = xW_1 + b_1`, :math:`a = \mathrm{act}(h) \circ m` (``m`` the dropout
    multiplier) and :math:`y = aW_2 + b_2`:

    .. math::

        dW_2 = a^\top dy,\quad db_2 = \textstyle\sum dy,\quad
        da = dy\,W_2^\top,\quad dh = \mathrm{act}'(h) \circ m \circ da,\\
        dW_1 = x^\top dh,\quad db_1 = \textstyle\sum dh,\quad dx = dh\,W_1^\top .
    """
    xp, params, res = residuals
    return feed_forward_backward(xp, params, res, dy, activation)


feed_forward = Op(_feed_forward_fwd, _feed_forward_bwd, name="feed_forward", register=True)


# ----------------------------------------------------------------------------- init


def resolve_dtype(xp: ModuleType, dtype: Any) -> Any:
    """``"float32"``/``"float64"`` or a dtype of ``xp`` -> the dtype of ``xp``."""
    if isinstance(dtype, str):
        if dtype not in ("float32", "float64"):
            raise ValueError(f"refattn: dtype must be 'float32' or 'float64', got {dtype!r}")
        return getattr(xp, dtype)
    if not xp.isdtype(dtype, "real floating"):
        raise TypeError(f"refattn: dtype must be a real floating dtype, got {dtype!r}")
    return dtype


def check_size(fn: str, name: str, n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"refattn.{fn}: {name} must be a positive int, got {n!r}")
    return n


def uniform(xp: ModuleType, rng: Any, shape: tuple[int, ...], bound: float, dtype: Any) -> Array:
    """``U(-bound, bound)`` drawn on the host with ``rng`` and moved to ``xp``."""
    return xp.asarray(rng.uniform(-bound, bound, size=shape), dtype=dtype)


def linear_params(
    xp: ModuleType, rng: Any, d_in: int, d_out: int, bias: bool, dtype: Any
) -> Params:
    """torch's ``nn.Linear`` init: weight and bias ``U(-1/sqrt(d_in), 1/sqrt(d_in))``."""
    bound = 1.0 / math.sqrt(d_in)
    params = {"weight": uniform(xp, rng, (d_in, d_out), bound, dtype)}
    if bias:
        params["bias"] = uniform(xp, rng, (d_out,), bound, dtype)
    return params


def init_linear(
    d_in: int,
    d_out: int,
    *,
    bias: bool = True,
    seed: int = 0,
    xp: ModuleType | None = None,
    dtype: Any = "float64",
) -> Params:
    r"""Affine-map parameters ``{"weight": (d_in, d_out), "bias": (d_out,)}``, torch's scheme.

    ``nn.Linear`` uses ``kaiming_uniform_(a=sqrt(5))`` on the weight, i.e.
    :math:`U(-1/\sqrt{d_{in}}, 1/\sqrt{d_{in}})`, and the same bound for the bias. The numbers
    are drawn on the host with ``numpy.random.default_rng(seed)`` and moved to ``xp`` (NumPy by
    default) with ``dtype`` ("float32", "float64" or a dtype of ``xp``).
    """
    import numpy as np  # host RNG for initial values only

    check_size("init_linear", "d_in", d_in)
    check_size("init_linear", "d_out", d_out)
    xp = default_namespace() if xp is None else xp
    return linear_params(
        xp, np.random.default_rng(seed), d_in, d_out, bias, resolve_dtype(xp, dtype)
    )


def init_layer_norm(
    d: int, *, bias: bool = True, xp: ModuleType | None = None, dtype: Any = "float64"
) -> Params:
    """Layer-norm parameters as torch initialises them: weight ones, bias zeros."""
    check_size("init_layer_norm", "d", d)
    xp = default_namespace() if xp is None else xp
    dt = resolve_dtype(xp, dtype)
    params = {"weight": xp.ones((d,), dtype=dt)}
    if bias:
        params["bias"] = xp.zeros((d,), dtype=dt)
    return params


def init_feed_forward(
    d_model: int,
    d_ff: int,
    *,
    bias: bool = True,
    seed: int = 0,
    xp: ModuleType | None = None,
    dtype: Any = "float64",
) -> Params:
    """``{"linear1": (d_model, d_ff), "linear2": (d_ff, d_model)}`` with ``nn.Linear``'s init."""
    import numpy as np  # host RNG for initial values only

    check_size("init_feed_forward", "d_model", d_model)
    check_size("init_feed_forward", "d_ff", d_ff)
    xp = default_namespace() if xp is None else xp
    dt = resolve_dtype(xp, dtype)
    rng = np.random.default_rng(seed)
    return {
        "linear1": linear_params(xp, rng, d_model, d_ff, bias, dt),
        "linear2": linear_params(xp, rng, d_ff, d_model, bias, dt),
    }


def same_dtype(op: str, xp: ModuleType, arrays: dict[str, Any]) -> Any:
    """The one floating dtype shared by ``arrays`` (TypeError naming them otherwise)."""
    return floating_dtype(xp, {f"{op}: {k}": v for k, v in arrays.items()})
