r"""Linformer attention (Wang et al. 2020): keys and values projected along the sequence.

.. math::

    K' = E^\top K \in \mathbb{R}^{p \times d_k}, \qquad V' = F^\top V \in \mathbb{R}^{p \times d_v},
    \qquad O = \mathrm{softmax}\bigl(\mathrm{scale}\; Q K'^\top\bigr)\, V',

with ``E, F`` of shape ``(n, p)`` (``n`` keys, ``p`` projected positions), so the score matrix is
``n_q x p`` instead of ``n_q x n``. The projections are shared by all heads (``(n, p)``, the
``linformer`` package's ``proj_k`` / ``proj_v``, and its ``share_kv`` when ``f is e``) or one per
key/value head (``(Hkv, n, p)``).

What Linformer does not define, and refattn rejects rather than guesses:

* **causal** masking: each projected position mixes all ``n`` keys, future ones included, so
  ``j <= i`` has no meaning after the projection (``is_causal=True`` is a ValueError);
* a **key padding** mask over the ``n`` original keys: it would have to act before the
  projection (zeroing rows of ``K, V`` is one choice, renormalising ``E`` another; the package
  has none). Zero the padded rows of ``k`` and ``v`` yourself if that is the convention you want.

A boolean or additive mask over the *projected* scores, shape broadcastable to
``(..., Hq, n_q, p)``, is well defined and is passed to SDPA as ``mask`` / ``bias``.
The composite runs the projections, then :func:`refattn.scaled_dot_product_attention` through
its public ``vjp``.
"""

from __future__ import annotations

from typing import Any

from .._backend import namespace
from .._op import Op, vjp
from .sdpa import scaled_dot_product_attention

__all__ = ["linformer_attention"]

Array = Any

_OP = "linformer_attention"


def _check_projection(name: str, p: Array, k: Array) -> None:
    n = int(k.shape[-2])
    heads = int(k.shape[-3]) if k.ndim >= 3 else None
    ok = (p.ndim == 2 and int(p.shape[0]) == n) or (
        p.ndim == 3 and heads is not None and tuple(p.shape[:2]) == (heads, n)
    )
    if not ok:
        per_head = f" or (Hkv, n, p) = ({heads}, {n}, p)" if heads is not None else ""
        raise ValueError(
            f"refattn.{_OP}: {name} must be (n, p) = ({n}, p){per_head} for keys of shape "
            f"{tuple(k.shape)} (slice a longer projection to the first n rows, as the "
            f"linformer package does), got {tuple(p.shape)}"
        )


def _project(xp: Any, p: Array, x: Array) -> Array:
    """``P^T X`` along the sequence: (n, p) or (H, n, p) and (..., H, n, d) -> (..., H, p, d)."""
    return xp.matrix_transpose(p) @ x


def _projection_grad(xp: Any, p: Array, x: Array, d_xp: Array) -> Array:
    r""":math:`dP = X\, dX'^\top` summed over the axes that ``P`` is broadcast over."""
    g = x @ xp.matrix_transpose(d_xp)  # (..., H, n, p)
    lead = g.ndim - p.ndim
    if lead:
        g = xp.sum(g, axis=tuple(range(lead)))
    return g


def _linformer_fwd(
    q: Array,
    k: Array,
    v: Array,
    e: Array,
    f: Array,
    /,
    *,
    scale: float | None = None,
    mask: Array | None = None,
    bias: Array | None = None,
    is_causal: bool = False,
) -> tuple[Array, Any]:
    r"""Linformer attention, :math:`\mathrm{softmax}(\mathrm{scale}\,Q (E^\top K)^\top) F^\top V`.

    Parameters
    ----------
    q : (..., Hq, n_q, d_k)
        Queries; ``(n_q, d_k)`` works too.
    k : (..., Hkv, n, d_k)
    v : (..., Hkv, n, d_v)
        ``Hq`` a multiple of ``Hkv`` (GQA, as in SDPA; the package's ``one_kv_head`` is
        ``Hkv = 1``).
    e, f : (n, p) or (Hkv, n, p)
        Sequence projections of the keys and of the values; shared by all heads or one per kv
        head. Both are primals.
    scale : float, optional
        Defaults to ``1 / sqrt(d_k)`` (the package's ``dim_head ** -0.5``).
    mask, bias : optional
        Boolean keep-mask / additive bias over the projected scores, broadcastable to
        ``(..., Hq, n_q, p)``.
    is_causal : bool
        Must be False: causality is not defined after a sequence projection.

    Returns
    -------
    out : (..., Hq, n_q, d_v)
    """
    if is_causal is not False:
        raise ValueError(
            f"refattn.{_OP}: is_causal must be False, got {is_causal!r}: every projected "
            "position mixes all n keys, future ones included, so a causal mask is not defined "
            "after the sequence projection (Linformer is an encoder/bidirectional method)"
        )
    xp = namespace(q, k, v, e, f)
    if k.ndim < 2 or v.ndim < 2 or int(k.shape[-2]) != int(v.shape[-2]):
        raise ValueError(
            f"refattn.{_OP}: k and v must be (..., n, d) with the same n, got k "
            f"{tuple(k.shape)} and v {tuple(v.shape)}"
        )
    _check_projection("e", e, k)
    _check_projection("f", f, v)
    for name, x in (("e", e), ("f", f)):
        if x.dtype != k.dtype:
            raise TypeError(f"refattn.{_OP}: {name} must have k's dtype {k.dtype}, got {x.dtype}")
    kp, vp = _project(xp, e, k), _project(xp, f, v)
    out, pullback = vjp(scaled_dot_product_attention, q, kp, vp, scale=scale, mask=mask, bias=bias)
    return out, (xp, k, v, e, f, pullback)


def _linformer_bwd(residuals: Any, d_out: Array, /) -> tuple[Array, ...]:
    r"""VJP of Linformer attention: SDPA's VJP, then the projections'.

    With :math:`K' = E^\top K` and :math:`(dQ, dK', dV')` from SDPA's backward:

    .. math::

        dK = E\, dK', \qquad dE = \sum_{\text{batch}} K\, dK'^\top, \qquad
        dV = F\, dV', \qquad dF = \sum_{\text{batch}} V\, dV'^\top,

    summed over the batch axes (and over the heads too for a shared ``(n, p)`` projection).
    (From :math:`K'_{pc} = \sum_t E_{tp} K_{tc}`: :math:`dK_{tc} = \sum_p E_{tp} dK'_{pc}`,
    :math:`dE_{tp} = \sum_c K_{tc}\, dK'_{pc}`.)
    """
    xp, k, v, e, f, pullback = residuals
    d_q, d_kp, d_vp = pullback(d_out)
    return (
        d_q,
        e @ d_kp,
        f @ d_vp,
        _projection_grad(xp, e, k, d_kp),
        _projection_grad(xp, f, v, d_vp),
    )


linformer_attention = Op(_linformer_fwd, _linformer_bwd, name=_OP, register=True)
