r"""The XCA layer of XCiT (timm's ``timm.models.xcit.XCA``): qkv projection, XCA, output projection.

.. math::

    [Q, K, V] = X W_{qkv} + b_{qkv}, \qquad
    Y = \mathrm{concat}_h\, \mathrm{XCA}(Q_h, K_h, V_h; \tau_h)\; W_o + b_o,

with ``X (..., n, C)``, ``H`` heads of ``C / H`` channels, and
:func:`refattn.cross_covariance_attention` per head. The feature layout of the ``3C`` qkv
outputs is timm's: ``(3, H, C / H)``, q first.

Parameters (refattn's affine convention, the transpose of ``nn.Linear.weight``)::

    {"qkv": {"weight": (C, 3C), "bias"?: (3C,)}, "proj": {"weight": (C, C), "bias": (C,)},
     "temperature": (H,)}

Loading timm's module ``m``: ``qkv.weight = m.qkv.weight.T``, ``proj.weight = m.proj.weight.T``,
``temperature = m.temperature.reshape(H)`` (timm's ``qkv_bias`` defaults to False).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from .._backend import namespace
from .._op import Op, vjp
from ..ops.xca import cross_covariance_attention
from .basic import check_size, linear, linear_params, resolve_dtype

__all__ = ["cross_covariance_attention_layer", "init_cross_covariance_attention_layer"]

Array = Any
Params = dict[str, Any]

_OP = "cross_covariance_attention_layer"


def _check(params: Any, x: Array, num_heads: int) -> int:
    if not isinstance(params, dict) or set(params) != {"qkv", "proj", "temperature"}:
        got = sorted(params) if isinstance(params, dict) else type(params).__name__
        raise ValueError(
            f"refattn.{_OP}: params must be a dict with keys 'qkv', 'proj', 'temperature', "
            f"got {got}"
        )
    check_size(_OP, "num_heads", num_heads)
    if x.ndim < 2:
        raise ValueError(f"refattn.{_OP}: x must be (..., n, C), got shape {tuple(x.shape)}")
    c = int(x.shape[-1])
    if c % num_heads:
        raise ValueError(
            f"refattn.{_OP}: the embedding size C={c} must be a multiple of num_heads={num_heads}"
        )
    w = params["qkv"].get("weight") if isinstance(params["qkv"], dict) else None
    if w is None or tuple(w.shape) != (c, 3 * c):
        seen = None if w is None else tuple(w.shape)
        raise ValueError(f"refattn.{_OP}: qkv.weight must be (C, 3C) = ({c}, {3 * c}), got {seen}")
    return c // num_heads


def _heads(xp: Any, y: Array, j: int, num_heads: int, dh: int) -> Array:
    """Part ``j`` (q, k, v) of the qkv output ``(..., n, 3C)`` as ``(..., H, n, dh)``."""
    *lead, n, _ = (int(s) for s in y.shape)
    part = xp.reshape(y, (*lead, n, 3, num_heads, dh))[..., j, :, :]
    return xp.moveaxis(part, -2, -3)


def _xca_layer_fwd(params: Params, x: Array, /, *, num_heads: int) -> tuple[Array, Any]:
    """The XCA layer: ``x (..., n, C) -> (..., n, C)``; see the module docstring."""
    dh = _check(params, x, num_heads)
    xp = namespace(x)
    y, qkv_pull = vjp(linear, params["qkv"], x)
    q, k, v = (_heads(xp, y, j, num_heads, dh) for j in range(3))
    o, xca_pull = vjp(cross_covariance_attention, q, k, v, params["temperature"])
    merged = xp.reshape(xp.moveaxis(o, -3, -2), tuple(x.shape))
    out, proj_pull = vjp(linear, params["proj"], merged)
    return out, (xp, qkv_pull, xca_pull, proj_pull, tuple(y.shape), num_heads, dh)


def _xca_layer_bwd(residuals: Any, d_out: Array, /) -> tuple[Params, Array]:
    """The chain rule through the three steps, in reverse; the head split's adjoint is its inverse
    reshape (q, k, v gradients stacked back into the ``(3, H, dh)`` feature layout)."""
    xp, qkv_pull, xca_pull, proj_pull, y_shape, num_heads, dh = residuals
    d_proj, d_merged = proj_pull(d_out)
    *lead, n, _ = y_shape
    d_o = xp.moveaxis(xp.reshape(d_merged, (*lead, n, num_heads, dh)), -2, -3)
    d_q, d_k, d_v, d_tau = xca_pull(d_o)
    d_y = xp.stack([xp.moveaxis(g, -3, -2) for g in (d_q, d_k, d_v)], axis=-3)
    d_qkv, d_x = qkv_pull(xp.reshape(d_y, y_shape))
    return {"qkv": d_qkv, "proj": d_proj, "temperature": d_tau}, d_x


cross_covariance_attention_layer = Op(_xca_layer_fwd, _xca_layer_bwd, name=_OP, register=True)


def init_cross_covariance_attention_layer(
    dim: int,
    num_heads: int = 8,
    *,
    qkv_bias: bool = False,
    seed: int = 0,
    xp: ModuleType | None = None,
    dtype: Any = "float64",
) -> Params:
    """Parameters of :func:`cross_covariance_attention_layer`, timm's ``XCA`` defaults.

    ``nn.Linear``'s init for ``qkv`` then ``proj`` (drawn on the host with
    ``numpy.random.default_rng(seed)``), ``temperature`` ones (timm's ``torch.ones``).
    """
    import numpy as np  # host RNG for initial values only

    dim = check_size("init_cross_covariance_attention_layer", "dim", dim)
    num_heads = check_size("init_cross_covariance_attention_layer", "num_heads", num_heads)
    if dim % num_heads:
        raise ValueError(
            f"refattn.init_cross_covariance_attention_layer: dim={dim} must be a multiple of "
            f"num_heads={num_heads}"
        )
    if xp is None:
        from array_api_compat import array_namespace

        xp = array_namespace(np.empty(0))
    dt = resolve_dtype(xp, dtype)
    rng = np.random.default_rng(seed)
    return {
        "qkv": linear_params(xp, rng, dim, 3 * dim, qkv_bias, dt),
        "proj": linear_params(xp, rng, dim, dim, True, dt),
        "temperature": xp.ones((num_heads,), dtype=dt),
    }
