r"""Sparsemax and α-entmax: sparse normalisers, with backward passes for the input and for α.

α-entmax (Peters, Niculae and Martins 2019) maps a score vector ``x`` to the probability vector

.. math::

    \mathrm{entmax}_\alpha(x) = \operatorname*{argmax}_{p \in \Delta}\ \langle p, x\rangle
        + \frac{1}{\alpha(\alpha - 1)} \sum_j (p_j - p_j^\alpha)
    \quad\Longrightarrow\quad
    p_j = \bigl[1 + (\alpha - 1)(x_j - m - s)\bigr]_+^{1/(\alpha - 1)},

with ``m = max_j x_j`` and the shift ``s ∈ [0, (1 − d^{1−α})/(α − 1)]`` the one root of
``Σ_j p_j = 1`` (``d`` kept entries). α = 2 is sparsemax (Martins and Astudillo 2016),
``p = [x − τ]_+``; α → 1 is softmax, ``p_j = exp(x_j − m − s)``, ``s = logsumexp(x) − m``.
Entries below the threshold get exactly 0: the *support* ``S = {j : p_j > 0}``. The shift ``s`` is
the threshold in the units of ``x`` (the ``entmax`` package bisects ``τ = (α−1)(m + s) − 1``
instead: the same function, see docs/entmax.md).

How each α is computed
    * α = 1 (Python float): :func:`refattn.softmax`.
    * α = 2 and α = 1.5 (Python floats): exact, by sorting each slice (Martins and Astudillo
      2016; Peters et al. 2019, Algorithm 2): the support is the largest prefix of the sorted
      values that satisfies the threshold condition, then the threshold is solved on it in closed
      form, for 1.5 with the centred sum of squares (the package's ``E[z²] − E[z]²`` loses digits
      to cancellation).
    * any other α, and α given as an array (one α per slice, Correia et al. 2019): bisection on
      ``s`` (Blondel et al. 2019), halving until the bracket is two adjacent floats or narrower
      than ``eps · 2⁻¹²`` (``s`` is O(log d), so that is float rounding): the mantissa's bits
      plus ``log2 s_hi``, about 55 halvings in float64 and 26 in float32. The ``entmax``
      package's ``entmax_bisect`` runs a fixed 50.
      ``p`` is evaluated as ``exp(log1p((α−1)v)/(α−1))``, which keeps the relative accuracy of
      softmax's ``exp`` as α → 1 (``(1 + (α−1)v)^{1/(α−1)}`` loses ``1/(α−1)`` ulps), and the
      result is divided by its sum.

Masks follow :mod:`refattn.ops.softmax`: ``mask`` is boolean, True = keep; masked entries and
entries equal to ``-inf`` get exactly 0 and no gradient; a fully masked slice gives 0 and
gradient 0; an empty axis gives an empty result.

Backward (derivation; docs/entmax.md has it at more length). On the support, with ``ε = α − 1``,
``p_j^ε = 1 + ε(x_j − m − s)``. Differentiating in ``x`` with ``S`` fixed,
``ε p_j^{ε−1} dp_j = ε (dx_j − ds)``, so ``dp_j = g_j (dx_j − ds)`` with ``g_j = p_j^{2−α}`` on
``S`` and 0 off it; ``Σ_j dp_j = 0`` gives ``ds = ⟨g, dx⟩ / Σg``. The Jacobian
``diag(g) − g gᵀ/Σg`` is symmetric, so the VJP is the same map:

.. math::

    \bar x = g \circ (\bar p - \tfrac{\langle g, \bar p\rangle}{\sum_j g_j}),
    \qquad g = p^{2-\alpha} \text{ on } S,

which is softmax's VJP at α = 1 (``g = p``) and sparsemax's at α = 2 (``g = 1_S``). For α,
differentiate ``p_j^ε = ε x_j − τ`` (``τ = ε(m + s) − 1``) in ε with ``x`` fixed (implicit
function theorem on τ): ``p_j^ε (L_j + ε p_j'/p_j) = x_j − τ'`` with ``L_j = log p_j``, so
``p_j' = (g_j/ε)(a_j − τ')``, ``a_j = x_j − p_j^ε L_j``, and ``Σ p' = 0`` fixes τ'. Substituting
``x_j = (p_j^ε − 1)/ε + m + s`` (the constant cancels against τ'):

.. math::

    \frac{\partial p_j}{\partial \alpha} = g_j (c_j - \bar c), \quad
    c_j = L_j^2\, \varphi(\varepsilon L_j), \quad
    \bar c = \frac{\langle g, c\rangle}{\sum_j g_j}, \quad
    \varphi(z) = \frac{e^z - 1 - z e^z}{z^2},
    \qquad \bar\alpha = \sum_j \bar p_j\, g_j (c_j - \bar c),

summed over the axes where α was broadcast. This is the package's formula
``(p − g̃)/ε² − (p log p − g̃ Σ p log p)/ε`` (``g̃ = g/Σg``) written without its two ``1/ε``
terms that cancel: ``φ`` is evaluated by its Taylor series for ``|z| < 1``, so the α gradient is
accurate down to α = 1, where ``φ(0) = −1/2`` gives the softmax limit
``∂p_j/∂α = −½ p_j (L_j² − Σ_k p_k L_k²)``. The formula holds where the support does not change
with α (almost everywhere).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .._backend import check_floating, describe, device_of, namespace
from .._op import Op
from .softmax import check_broadcast, check_mask, softmax

__all__ = ["entmax", "normalize_backward", "normalize_forward", "sparsemax"]

Array = Any

#: the bisection stops after this many halvings even if not converged (never reached: a bracket
#: of width ≤ log d reaches adjacent floats in about 55 halvings in float64)
MAX_BISECTIONS = 200


class _DefaultAlpha(float):
    """The default α (1.5), told apart from an α passed positionally (a primal)."""

    __slots__ = ()


_ALPHA_DEFAULT = _DefaultAlpha(1.5)


# ----------------------------------------------------------------------------- validation


def _check_x(xp: Any, op: str, x: Array, axis: Any, mask: Array | None) -> int:
    check_floating(xp, f"{op}: x", x)
    if x.ndim == 0:
        raise ValueError(f"refattn.{op}: x must have at least one dimension, got a 0-d array")
    if isinstance(axis, bool) or not isinstance(axis, int) or not -x.ndim <= axis < x.ndim:
        raise ValueError(f"refattn.{op}: axis {axis!r} is out of range for x of {describe(x)}")
    if mask is not None:
        check_mask(xp, f"{op}: mask", mask, tuple(x.shape))
    return axis % x.ndim


def _check_alpha(xp: Any, alpha: Any, x: Array, axis: int) -> Array | float:
    """α as a Python float, or as an array of x's dtype broadcastable to x's slice shape."""
    is_number = isinstance(alpha, (int, float)) and not isinstance(alpha, bool)
    if not is_number and not hasattr(alpha, "dtype"):
        raise TypeError(
            f"refattn.entmax: alpha must be a float or a real floating array, got {describe(alpha)}"
        )
    if not hasattr(alpha, "dtype"):
        alpha = float(alpha)
        if not 1.0 <= alpha <= 2.0:
            raise ValueError(f"refattn.entmax: alpha must lie in [1, 2], got {alpha!r}")
        return alpha
    if not xp.isdtype(alpha.dtype, "real floating"):
        raise TypeError(
            f"refattn.entmax: alpha must have a real floating dtype, got {describe(alpha)}"
        )
    target = tuple(1 if i == axis else n for i, n in enumerate(x.shape))
    if alpha.ndim > x.ndim:
        raise ValueError(
            f"refattn.entmax: alpha of shape {tuple(alpha.shape)} has more dimensions than x of "
            f"{describe(x)}; expected a shape broadcastable to {target} (size 1 along axis)"
        )
    check_broadcast("entmax: alpha (size 1 along axis)", alpha, target)
    if not bool(xp.all(xp.logical_and(alpha >= 1.0, alpha <= 2.0))):
        raise ValueError(
            f"refattn.entmax: every alpha must lie in [1, 2], got values from "
            f"{float(xp.min(alpha))} to {float(xp.max(alpha))}"
        )
    return xp.astype(alpha, x.dtype)


# ----------------------------------------------------------------------------- kernels


def _keep(xp: Any, x: Array, mask: Array | None) -> Array:
    keep = x > -math.inf
    return keep if mask is None else xp.logical_and(keep, mask)


def _shifted(xp: Any, x: Array, keep: Array, axis: int) -> Array:
    """``x − max`` over kept entries, ``-inf`` at masked ones (a fully masked slice: all -inf)."""
    filled = xp.where(keep, x, -math.inf)
    m = xp.max(filled, axis=axis, keepdims=True)
    return filled - xp.where(xp.isfinite(m), m, xp.zeros_like(m))


def _sorted_prefix_sums(xp: Any, z: Array, axis: int):
    """Sorted (descending) ``z`` with masked entries as 0, ``rho = 1..n``, and "k ≤ n_kept"."""
    zs = xp.sort(z, axis=axis, descending=True)
    valid = zs > -math.inf  # masked entries sort last
    zs = xp.where(valid, zs, xp.zeros_like(zs))
    shape = [1] * z.ndim
    shape[axis] = z.shape[axis]
    rho = xp.reshape(
        xp.arange(1, z.shape[axis] + 1, dtype=z.dtype, device=device_of(z)), tuple(shape)
    )
    return zs, rho, valid


def _sparsemax_kernel(xp: Any, x: Array, keep: Array, axis: int) -> Array:
    """Sort-based sparsemax, ``z = x − max`` sorted descending: the support size is
    ``k = max{k : 1 + k z_(k) > Σ_{i≤k} z_(i)}`` and ``τ = (Σ_{i≤k} z_(i) − 1)/k``."""
    z = _shifted(xp, x, keep, axis)
    zs, rho, valid = _sorted_prefix_sums(xp, z, axis)
    cond = xp.logical_and(valid, 1.0 + rho * zs > xp.cumulative_sum(zs, axis=axis))
    k = xp.sum(xp.astype(cond, z.dtype), axis=axis, keepdims=True)
    prefix = rho <= k
    total = xp.sum(xp.where(prefix, zs, xp.zeros_like(zs)), axis=axis, keepdims=True)
    tau = (total - 1.0) / xp.where(k > 0, k, xp.ones_like(k))
    return xp.where(keep, xp.maximum(z - tau, 0.0), 0.0)


def _entmax15_kernel(xp: Any, x: Array, keep: Array, axis: int) -> Array:
    """Sort-based 1.5-entmax: ``p = [z − τ]_+²``, ``z = (x − max)/2``, ``Σ_S (z_j − τ)² = 1``.

    The support size is the number of ``k`` with ``τ_k ≤ z_(k)``, ``τ_k`` the root for the top
    ``k`` (Peters et al. 2019); ``τ`` is then re-solved on the support with the centred sum
    of squares ``ss = Σ_S (z_j − mean)²``: ``τ = mean − sqrt((1 − ss)/k)``.
    """
    z = _shifted(xp, x, keep, axis) / 2.0
    zs, rho, valid = _sorted_prefix_sums(xp, z, axis)
    cs = xp.cumulative_sum(zs, axis=axis)
    mean = cs / rho
    ss = xp.cumulative_sum(zs * zs, axis=axis) - cs * mean
    tau_k = mean - xp.sqrt(xp.maximum((1.0 - ss) / rho, 0.0))
    cond = xp.logical_and(valid, tau_k <= zs)
    k = xp.sum(xp.astype(cond, z.dtype), axis=axis, keepdims=True)
    safe_k = xp.where(k > 0, k, xp.ones_like(k))
    prefix = rho <= k
    zero = xp.zeros_like(zs)
    mean = xp.sum(xp.where(prefix, zs, zero), axis=axis, keepdims=True) / safe_k
    centred = xp.where(prefix, zs - mean, zero)
    ss = xp.sum(centred * centred, axis=axis, keepdims=True)
    tau = mean - xp.sqrt(xp.maximum((1.0 - ss) / safe_k, 0.0))
    r = xp.where(keep, xp.maximum(z - tau, 0.0), 0.0)
    return r * r


def _entmax_values(xp: Any, v: Array, eps: Array | float) -> Array:
    """``[1 + ε v]_+^{1/ε}`` as ``exp(log1p(ε v)/ε)`` (``exp(v)`` where ε = 0); ``v ≤ 0``,
    ``-inf`` at masked entries."""
    finite = v > -math.inf
    v = xp.where(finite, v, xp.zeros_like(v))  # no 0·(-inf) where ε = 0
    ev = eps * v
    inside = xp.logical_and(finite, ev > -1.0)
    safe_ev = xp.where(inside, ev, xp.zeros_like(ev))
    if isinstance(eps, float):
        log_p = v if eps == 0.0 else xp.log1p(safe_ev) / eps
    else:
        zero = eps == 0.0
        log_p = xp.where(zero, v, xp.log1p(safe_ev) / xp.where(zero, xp.ones_like(eps), eps))
    return xp.where(inside, xp.exp(xp.where(inside, log_p, xp.zeros_like(log_p))), 0.0)


def _bisect_kernel(xp: Any, x: Array, keep: Array, axis: int, alpha: Array | float) -> Array:
    """Bisection on the shift ``s`` of ``p = [1 + ε(x − m − s)]_+^{1/ε}``, ``Σ p = 1``.

    ``s = 0`` gives ``p_max = 1`` (sum ≥ 1); ``s_hi = (1 − d^{−ε})/ε`` (``log d`` at ε = 0)
    gives every ``p_j ≤ 1/d`` (sum ≤ 1). Halve until the bracket is adjacent floats or narrower
    than ``eps·2⁻¹²``, then normalise ``p(s_lo)`` by its sum.
    """
    z = _shifted(xp, x, keep, axis)  # x − m, -inf at masked entries
    eps = alpha - 1.0
    d = xp.sum(xp.astype(keep, x.dtype), axis=axis, keepdims=True)
    log_d = xp.log(xp.where(d > 0, d, xp.ones_like(d)))
    if isinstance(eps, float):
        hi = log_d if eps == 0.0 else -xp.expm1(-eps * log_d) / eps
    else:
        zero = eps == 0.0
        safe_eps = xp.where(zero, xp.ones_like(eps), eps)
        hi = xp.where(zero, log_d, -xp.expm1(-eps * log_d) / safe_eps)
    lo = xp.zeros_like(hi)
    floor = float(xp.finfo(x.dtype).eps) * 2.0**-12
    for _ in range(MAX_BISECTIONS):
        mid = lo + (hi - lo) / 2.0
        open_ = xp.logical_and(xp.logical_and(mid > lo, mid < hi), hi - lo > floor)
        if not bool(xp.any(open_)):
            break
        above = xp.sum(_entmax_values(xp, z - mid, eps), axis=axis, keepdims=True) >= 1.0
        lo = xp.where(above, mid, lo)
        hi = xp.where(above, hi, mid)
    p = _entmax_values(xp, z - lo, eps)
    total = xp.sum(p, axis=axis, keepdims=True)
    return p / xp.where(total > 0, total, xp.ones_like(total))


def _phi(xp: Any, z: Array) -> Array:
    """``φ(z) = (e^z − 1 − z e^z)/z²`` for ``z ≤ 0``; Taylor series ``−Σ_k (k+1) z^k/(k+2)!``
    for ``|z| < 1`` (18 terms: the remainder is below float64 rounding), the closed form
    elsewhere (no cancellation there: it loses at most a factor ~4 of the result)."""
    small = xp.abs(z) < 1.0
    series = xp.zeros_like(z)
    for k in range(17, -1, -1):
        series = series * z - (k + 1) / math.factorial(k + 2)
    zl = xp.where(small, -1.0, z)
    closed = (xp.expm1(zl) - zl * xp.exp(zl)) / (zl * zl)
    return xp.where(small, series, closed)


def _entmax_vjp(xp: Any, p: Array, dp: Array, alpha: Array | float, axis: int, want_alpha: bool):
    """``(dx, dalpha_per_slice or None)`` from the derivation in the module docstring."""
    on = p > 0.0
    zero = xp.zeros_like(p)
    if isinstance(alpha, float) and alpha == 2.0:
        g = xp.astype(on, p.dtype)
    elif isinstance(alpha, float) and alpha == 1.0:
        g = p
    else:
        g = xp.where(on, xp.pow(xp.where(on, p, 1.0), 2.0 - alpha), zero)
    g_sum = xp.sum(g, axis=axis, keepdims=True)
    g_sum = xp.where(g_sum > 0, g_sum, xp.ones_like(g_sum))
    gdp = g * dp
    mean_dp = xp.sum(gdp, axis=axis, keepdims=True) / g_sum
    dx = gdp - g * mean_dp
    if not want_alpha:
        return dx, None
    log_p = xp.where(on, xp.log(xp.where(on, p, 1.0)), zero)
    c = log_p * log_p * _phi(xp, (alpha - 1.0) * log_p)
    c_bar = xp.sum(g * c, axis=axis, keepdims=True) / g_sum
    dalpha = xp.sum(gdp * c, axis=axis, keepdims=True) - c_bar * xp.sum(
        gdp, axis=axis, keepdims=True
    )
    return dx, dalpha


def _sum_to(xp: Any, a: Array, shape: tuple[int, ...]) -> Array:
    """Sum ``a`` over the axes along which an array of ``shape`` was broadcast to it."""
    lead = a.ndim - len(shape)
    if lead:
        a = xp.sum(a, axis=tuple(range(lead)))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and a.shape[i] != 1)
    return xp.sum(a, axis=axes, keepdims=True) if axes else a


# ----------------------------------------------------------------------------- sparsemax


def _sparsemax_fwd(x: Array, /, *, axis: int = -1, mask: Array | None = None) -> tuple[Array, Any]:
    r"""Sparsemax along ``axis``: the Euclidean projection of ``x`` onto the simplex.

    ``p = [x − τ]_+`` with τ such that ``Σ_j p_j = 1`` (exact, by sorting; see the module
    docstring). Equal to ``refattn.entmax(x, 2.0)``.

    Parameters
    ----------
    x : array (...), real floating
    axis : int
    mask : bool array broadcastable to ``x``, True = keep

    Returns
    -------
    p : array shaped like ``x``, same dtype; exactly 0 off the support, masked entries and fully
        masked slices.
    """
    xp = namespace(x, mask)
    axis = _check_x(xp, "sparsemax", x, axis, mask)
    if x.shape[axis] == 0:
        return xp.zeros_like(x), (xp.zeros_like(x),)
    p = _sparsemax_kernel(xp, x, _keep(xp, x, mask), axis)
    return p, (p,)


def _sparsemax_bwd(
    residuals: Any, dp: Array, /, *, axis: int = -1, mask: Array | None = None
) -> tuple[Array]:
    r"""VJP of sparsemax: ``dx = 1_S ∘ (dp − mean_{j∈S} dp_j)``, ``S = {j : p_j > 0}``
    (the α = 2 case of the entmax VJP)."""
    (p,) = residuals
    xp = namespace(p)
    dx, _ = _entmax_vjp(xp, p, dp, 2.0, axis % p.ndim, want_alpha=False)
    return (dx,)


sparsemax = Op(_sparsemax_fwd, _sparsemax_bwd, name="sparsemax", register=True)


# ----------------------------------------------------------------------------- entmax


def _entmax_fwd(
    x: Array,
    alpha: float | Array = _ALPHA_DEFAULT,
    *,
    axis: int = -1,
    mask: Array | None = None,
) -> tuple[Array, Any]:
    r"""α-entmax along ``axis``: ``p_j = [1 + (α−1)(x_j − m − s)]_+^{1/(α−1)}``, ``Σ p = 1``.

    Parameters
    ----------
    x : array (...), real floating
    alpha : float in [1, 2], or real floating array with values in [1, 2] broadcastable to
        ``x``'s shape with ``axis`` of size 1 (one α per slice, e.g. per head ``(H, 1, 1)``).
        Passed *positionally* as an array it is a primal: ``refattn.vjp(refattn.entmax, x,
        alpha)`` returns ``(dx, dalpha)``, ``dalpha`` shaped like ``alpha``. Passed as the
        keyword ``alpha=`` it is an option, not differentiated.
    axis : int
    mask : bool array broadcastable to ``x``, True = keep

    Returns
    -------
    p : array shaped like ``x``, same dtype; exactly 0 off the support, at masked entries and in
        fully masked slices. α = 1 is softmax, 2 sparsemax, 1.5 sort-based; other floats and
        array α by bisection to float rounding (module docstring).
    """
    xp = namespace(x, mask, alpha if hasattr(alpha, "dtype") else None)
    axis = _check_x(xp, "entmax", x, axis, mask)
    a = _check_alpha(xp, alpha, x, axis)
    if x.shape[axis] == 0:
        p = xp.zeros_like(x)
    elif isinstance(a, float) and a == 1.0:
        p = softmax(x, axis=axis, mask=mask)
    elif isinstance(a, float) and a == 2.0:
        p = _sparsemax_kernel(xp, x, _keep(xp, x, mask), axis)
    elif isinstance(a, float) and a == 1.5:
        p = _entmax15_kernel(xp, x, _keep(xp, x, mask), axis)
    else:
        p = _bisect_kernel(xp, x, _keep(xp, x, mask), axis, a)
    default = alpha is _ALPHA_DEFAULT
    return p, (p, a, alpha if hasattr(alpha, "dtype") else None, default)


def _entmax_bwd(residuals: Any, dp: Array, /, *, axis: int = -1, mask: Array | None = None, **kw):
    r"""VJP of α-entmax: ``dx = g ∘ (dp − ⟨g, dp⟩/Σg)``, ``g = p^{2−α}`` on the support, and,
    for an array α passed positionally, ``dα = Σ_j dp_j g_j (c_j − c̄)`` summed to α's shape
    (derivation in the module docstring)."""
    p, a, alpha_array, default = residuals
    xp = namespace(p)
    positional = "alpha" not in kw and not default
    if positional and alpha_array is None:
        raise TypeError(
            "refattn.vjp(entmax): alpha was passed positionally as a Python float, which has no "
            "gradient; pass it as an array to differentiate it, or as the keyword alpha="
        )
    dx, dalpha = _entmax_vjp(xp, p, dp, a, axis % p.ndim, want_alpha=positional)
    if not positional:
        return (dx,)
    dalpha = _sum_to(xp, dalpha, tuple(alpha_array.shape))
    return dx, xp.astype(xp.reshape(dalpha, alpha_array.shape), alpha_array.dtype)


entmax = Op(_entmax_fwd, _entmax_bwd, name="entmax", register=True)


# ----------------------------------------------------------------------------- SDPA interface

NORMALIZERS = ("softmax", "sparsemax", "entmax")


@dataclass(frozen=True)
class NormalizerResiduals:
    """What :func:`normalize_backward` needs: the normaliser, the weights, α and the options."""

    normalizer: str
    weights: Array
    alpha: Array | float | None
    alpha_is_array: bool
    axis: int


def normalize_forward(
    scores: Array,
    *,
    normalizer: str = "softmax",
    alpha: float | Array | None = None,
    mask: Array | None = None,
    axis: int = -1,
) -> tuple[Array, NormalizerResiduals]:
    """Normalise attention scores along ``axis``: the weights ``P`` of ``O = P V``.

    The contract for attention kernels that hold the full score tensor (materialized SDPA):
    ``weights, res = normalize_forward(scores, normalizer=..., alpha=..., mask=...)`` and later
    ``dscores, dalpha = normalize_backward(res, dweights)``.

    Parameters
    ----------
    scores : array (..., n_q, n_k), real floating (scaled scores plus any bias)
    normalizer : "softmax" | "sparsemax" | "entmax"
    alpha : for "entmax" only (default 1.5): a float in [1, 2], or an array broadcastable to
        ``scores`` with ``axis`` of size 1, e.g. ``(H, 1, 1)`` per head. An array α is
        differentiated (``dalpha`` shaped like it); a float is not.
    mask : bool array broadcastable to ``scores``, True = keep (causal, padding, ...)
    axis : int

    Returns
    -------
    weights : shaped like ``scores``; rows sum to 1, 0 at masked entries; a fully masked row
        is all 0 (as for softmax).
    res : :class:`NormalizerResiduals`, opaque to the caller.

    There is no log-sum-exp for sparsemax and entmax: a kernel asked for ``return_lse`` with
    those normalisers should refuse. The weights are the exact normalised values, so dropout
    is applied to them afterwards exactly as for softmax.
    """
    if normalizer not in NORMALIZERS:
        raise ValueError(f"refattn: normalizer must be one of {NORMALIZERS}, got {normalizer!r}")
    if alpha is not None and normalizer != "entmax":
        raise ValueError(
            f"refattn: alpha is for normalizer='entmax' only, got normalizer={normalizer!r}"
        )
    if normalizer == "softmax":
        weights, _ = softmax.forward(scores, axis=axis, mask=mask)
        a: Any = 1.0
    elif normalizer == "sparsemax":
        weights, _ = sparsemax.forward(scores, axis=axis, mask=mask)
        a = 2.0
    else:
        alpha = 1.5 if alpha is None else alpha
        weights, (_, a, _, _) = entmax.forward(scores, alpha=alpha, axis=axis, mask=mask)
    is_array = hasattr(alpha, "dtype")
    return weights, NormalizerResiduals(
        normalizer, weights, alpha if is_array else a, is_array, axis % scores.ndim
    )


def normalize_backward(res: NormalizerResiduals, dweights: Array) -> tuple[Array, Array | None]:
    """``(dscores, dalpha)`` for :func:`normalize_forward`'s weights given their cotangent.

    ``dscores`` is shaped like the scores (0 at masked entries and off the support); ``dalpha``
    is shaped like an array α and None otherwise. The backward is the VJP of the op itself
    (module docstring): ``dscores = g ∘ (dP − ⟨g, dP⟩/Σg)`` per row, ``g = P`` for softmax,
    ``1_S`` for sparsemax, ``P^{2−α}`` on the support for entmax.
    """
    xp = namespace(res.weights)
    if res.normalizer == "softmax":  # softmax's own backward (blocked on the thread pool)
        (dx,) = softmax.backward((res.weights,), dweights, axis=res.axis)
        return dx, None
    if not res.alpha_is_array:
        dx, _ = _entmax_vjp(xp, res.weights, dweights, res.alpha, res.axis, want_alpha=False)
        return dx, None
    alpha = res.alpha
    a = xp.astype(alpha, res.weights.dtype)
    dx, dalpha = _entmax_vjp(xp, res.weights, dweights, a, res.axis, want_alpha=True)
    dalpha = xp.reshape(_sum_to(xp, dalpha, tuple(alpha.shape)), alpha.shape)
    return dx, xp.astype(dalpha, alpha.dtype)
