r"""Cross-covariance attention (XCA, El-Nouby et al. 2021, XCiT): attention over channels.

Per head, with tokens as rows (``Q, K, V`` are ``n x d``) and the columns L2-normalised along the
tokens, :math:`\hat Q_{:,a} = Q_{:,a} / \lVert Q_{:,a} \rVert`:

.. math::

    S = \tau\, \hat Q^\top \hat K \in \mathbb{R}^{d \times d}, \qquad
    A = \mathrm{softmax}_{\text{rows}}(S), \qquad
    O = V A^\top \in \mathbb{R}^{n \times d},

that is ``O[t, a] = sum_b A[a, b] V[t, b]``: each output channel is a mixture of the value
channels, weighted by the softmax of the ``d x d`` cross-covariance of the normalised queries and
keys. :math:`\tau` is a learnable per-head temperature. The cost is ``O(n d^2)``, linear in the
number of tokens. This is timm's ``XCA`` (``timm.models.xcit``) with timm's ``(B, H, d, n)``
layout transposed to refattn's ``(..., H, n, d)``; timm normalises with
``x / max(||x||, 1e-12)``, here with ``x / ||x||`` (a column of zeros is an error here).
"""

from __future__ import annotations

from typing import Any

from .._backend import namespace
from .._op import Op

__all__ = ["cross_covariance_attention"]

Array = Any

_OP = "cross_covariance_attention"


def _check(q: Array, k: Array, v: Array, temperature: Array) -> Any:
    xp = namespace(q, k, v, temperature)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim < 3:
            raise ValueError(
                f"refattn.{_OP}: {name} must be (..., H, n, d) with a head axis, got shape "
                f"{tuple(x.shape)}"
            )
        if x.dtype not in (xp.float32, xp.float64):
            raise TypeError(f"refattn.{_OP}: {name} must be float32 or float64, got {x.dtype}")
    if tuple(q.shape) != tuple(k.shape) or tuple(q.shape) != tuple(v.shape):
        raise ValueError(
            f"refattn.{_OP}: q, k and v must have the same shape (..., H, n, d) (XCA mixes "
            f"channels, so d_q = d_k = d_v), got q {tuple(q.shape)}, k {tuple(k.shape)}, "
            f"v {tuple(v.shape)}"
        )
    heads = int(q.shape[-3])
    if tuple(temperature.shape) != (heads,):
        raise ValueError(
            f"refattn.{_OP}: temperature must have shape (H,) = ({heads},), one per head "
            f"(timm's (H, 1, 1) parameter reshaped), got {tuple(temperature.shape)}"
        )
    dtypes = {q.dtype, k.dtype, v.dtype, temperature.dtype}
    if len(dtypes) != 1:
        raise TypeError(
            f"refattn.{_OP}: q, k, v and temperature must have one dtype, got "
            f"{q.dtype}, {k.dtype}, {v.dtype}, {temperature.dtype}"
        )
    return xp


def _normalize(xp: Any, x: Array, name: str) -> tuple[Array, Array]:
    """Columns of ``x`` (..., n, d) divided by their norm over the tokens: ``(x_hat, norm)``."""
    norm = xp.sqrt(xp.sum(x * x, axis=-2, keepdims=True))  # (..., 1, d)
    if not bool(xp.all(norm > 0.0)):
        raise ValueError(
            f"refattn.{_OP}: {name} has a channel that is zero on every token; its L2 "
            "normalisation along the tokens is undefined"
        )
    return x / norm, norm


def _xca_fwd(q: Array, k: Array, v: Array, temperature: Array, /) -> tuple[Array, Any]:
    r"""Cross-covariance attention, :math:`O = V\,\mathrm{softmax}(\tau \hat Q^\top \hat K)^\top`.

    Parameters
    ----------
    q, k, v : (..., H, n, d)
        Queries, keys and values (one shape). Normalisation runs along the tokens (axis -2).
    temperature : (H,)
        :math:`\tau_h`, a primal (it is learned). timm's ``XCA.temperature`` is ``(H, 1, 1)``:
        pass ``temperature.reshape(H)``.

    Returns
    -------
    out : (..., H, n, d)
    """
    xp = _check(q, k, v, temperature)
    qh, qn = _normalize(xp, q, "q")
    kh, kn = _normalize(xp, k, "k")
    c = xp.matrix_transpose(qh) @ kh  # (..., H, d, d)
    s = c * temperature[:, None, None]
    a = xp.exp(s - xp.max(s, axis=-1, keepdims=True))
    a = a / xp.sum(a, axis=-1, keepdims=True)
    out = v @ xp.matrix_transpose(a)
    return out, (xp, qh, qn, kh, kn, v, c, a, temperature)


def _normalize_bwd(xp: Any, xh: Array, norm: Array, d_xh: Array) -> Array:
    r"""VJP of :math:`\hat x = x / \lVert x \rVert` per column: ``(dxh - xh (xh . dxh)) / |x|``."""
    return (d_xh - xh * xp.sum(xh * d_xh, axis=-2, keepdims=True)) / norm


def _xca_bwd(residuals: Any, d_out: Array, /) -> tuple[Array, Array, Array, Array]:
    r"""VJP of XCA.

    With :math:`C = \hat Q^\top \hat K`, :math:`S = \tau C`, :math:`A = \mathrm{softmax}(S)`
    (rows), :math:`O = V A^\top`:

    .. math::

        dA = dO^\top V, \qquad dV = dO\, A, \qquad
        dS = A \circ \bigl(dA - \mathrm{rowsum}(dA \circ A)\bigr), \\
        d\tau_h = \sum_{\text{batch}} \sum_{a, b} dS_{ab}\, C_{ab}, \qquad
        d\hat Q = \tau\, \hat K\, dS^\top, \qquad d\hat K = \tau\, \hat Q\, dS, \\
        dQ_{:,a} = \bigl(d\hat Q_{:,a} - \hat Q_{:,a}\,(\hat Q_{:,a} \cdot d\hat Q_{:,a})\bigr)
                   / \lVert Q_{:,a} \rVert \quad (\text{the same for } K).

    (From :math:`O_{ta} = \sum_b A_{ab} V_{tb}`: :math:`dA_{ab} = \sum_t dO_{ta} V_{tb}` and
    :math:`dV_{tb} = \sum_a dO_{ta} A_{ab}`; :math:`S_{ab} = \tau \sum_t \hat Q_{ta} \hat K_{tb}`.)
    """
    xp, qh, qn, kh, kn, v, c, a, temperature = residuals
    d_a = xp.matrix_transpose(d_out) @ v
    d_v = d_out @ a
    d_s = a * (d_a - xp.sum(d_a * a, axis=-1, keepdims=True))
    d_tau = xp.sum(xp.reshape(d_s * c, (-1, *c.shape[-3:])), axis=(0, 2, 3))
    tau = temperature[:, None, None]
    d_qh = (kh @ xp.matrix_transpose(d_s)) * tau
    d_kh = (qh @ d_s) * tau
    return _normalize_bwd(xp, qh, qn, d_qh), _normalize_bwd(xp, kh, kn, d_kh), d_v, d_tau


cross_covariance_attention = Op(_xca_fwd, _xca_bwd, name=_OP, register=True)
