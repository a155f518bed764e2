r"""Comparing a candidate with refattn's reference: ``assert_close`` and the FlashAttention rule.

* :func:`assert_close` is an ``allclose`` that is strict about everything but the values: the
  two arrays must come from the same array library, have the same dtype and the same shape, and
  a failure names the worst index with both values there.
* :func:`assert_attention_close` is the **FlashAttention rule** for low precision. A kernel that
  runs in bfloat16 cannot match float64 to any fixed tolerance that is both safe and tight, so
  the rule measures the tolerance instead: the candidate's error against the float64 reference
  may be at most ``factor`` times the error of a *plain* implementation in the same dtype,

  .. math::

      \max|c - r| \;\le\; \mathrm{factor}\cdot\max|b - r| \;+\;
      \mathrm{floor\_ulps}\cdot\varepsilon_{\mathrm{dtype}}\cdot\max|r|,

  where ``c`` is the candidate, ``r`` the float64 reference, ``b`` the plain low-precision
  baseline, and :math:`\varepsilon` the dtype's machine epsilon (the gap between 1 and the next
  number: :math:`2^{-52}, 2^{-23}, 2^{-10}, 2^{-7}` for float64, float32, float16, bfloat16).
  ``max|r|`` runs over the finite entries of the reference.

  The second term is the **floor**, the rounding noise at the output's magnitude: rounding a
  number of magnitude ``max|r|`` to the dtype moves it by up to :math:`\tfrac12\varepsilon\max|r|`,
  so the default ``floor_ulps=2`` allows 4 such rounding steps (2 to 4 units in the last place
  of the largest entry). It is added, as in FlashAttention's tests
  (``2 * err_plain + 2 * |(ref + 0.3 - 0.3) - ref|.max()``), for two reasons: when the baseline
  is (nearly) exact, e.g. float64 against float64, ``2 × 0`` would demand bit equality; and on
  small problems the maximum error is a maximum over few entries, so the ratio of two honest
  implementations' maxima fluctuates. Measured on refattn's own float32 backward (which uses the
  ``Delta = rowsum(dO∘O)`` form of flash kernels) against the plain float32 baseline over 100
  random (2, 4, 9, 8) problems with masks: with no floor 5-10% of the checks exceed ``2×``; with
  the default floor none do.

* **float64 candidates.** A float64 reference is no more precise than a float64 candidate, so
  two adjustments apply. The measured error contains the reference's own rounding, so the rule
  allows ``(factor + 1)`` times the baseline error. And a plain float64 baseline computed here
  would share refattn's rounding of the scores, so its error would look too small: estimate it
  with :func:`float64_baseline_error`, the plain float32 error times ``eps64 / eps32``.
* **Quantities that are analytically ~0** (the gradient of a key bias, by the softmax's shift
  invariance) have rounding noise relative to the terms they sum, not to themselves: pass
  ``floor_scale`` (e.g. the largest gradient of the same affine map).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .._backend import describe, namespace
from .dtypes import EPS, dtype_name, is_floating, machine_epsilon

Array = Any

# ----------------------------------------------------------------------------- assert_close


def _library(x: Any) -> str:
    """The array library of ``x`` ("numpy", "torch", "jax", "cupy", "array_api_strict", ...)."""
    return type(x).__module__.split(".", 1)[0]


def assert_close(
    actual: Array,
    desired: Array,
    *,
    rtol: float,
    atol: float,
    equal_nan: bool = True,
    err_msg: str = "",
) -> None:
    """Assert ``|actual - desired| <= atol + rtol * |desired|`` elementwise, strictly.

    Strict means: ``actual`` and ``desired`` must come from the same array library (so a function
    that quietly returns NumPy for CuPy input fails), have the same dtype and the same shape; no
    broadcasting. Infinities must match exactly (same sign, same place); NaN must match NaN when
    ``equal_nan`` (else NaN is always a mismatch).

    On failure the AssertionError names the number of mismatches, the worst index (largest
    excess over the tolerance), ``actual`` and ``desired`` there, and the largest absolute and
    relative errors. Errors are computed in float64 on the arrays' own device; only a handful of
    scalars leave it.
    """
    prefix = f"{err_msg}: " if err_msg else ""
    if _library(actual) != _library(desired):
        raise AssertionError(
            f"{prefix}arrays come from different libraries: actual is "
            f"{type(actual).__module__}.{type(actual).__name__}, desired is "
            f"{type(desired).__module__}.{type(desired).__name__}"
        )
    xp = namespace(actual, desired)
    if getattr(actual, "dtype", None) != getattr(desired, "dtype", None):
        raise AssertionError(
            f"{prefix}dtypes differ: actual {describe(actual)}, desired {describe(desired)}"
        )
    if tuple(actual.shape) != tuple(desired.shape):
        raise AssertionError(
            f"{prefix}shapes differ: actual {describe(actual)}, desired {describe(desired)}"
        )
    if math.prod(actual.shape) == 0:
        return
    if is_floating(actual) or xp.isdtype(actual.dtype, "real floating"):
        a = xp.astype(actual, xp.float64)
        d = xp.astype(desired, xp.float64)
    else:  # integers and booleans: exact equality
        a, d = actual, desired
        bad = a != d
        if bool(xp.any(bad)):
            idx = _first_index(xp, bad)
            raise AssertionError(
                f"{prefix}{int(xp.sum(xp.astype(bad, xp.int64)))} of {math.prod(a.shape)} "
                f"elements differ; first at index {idx}: actual {a[idx]!r}, desired {d[idx]!r}"
            )
        return
    both_nan = xp.logical_and(xp.isnan(a), xp.isnan(d))
    same_inf = xp.logical_and(xp.isinf(d), a == d)
    finite = xp.logical_and(xp.isfinite(a), xp.isfinite(d))
    zero = xp.zeros_like(a)
    a_finite, d_finite = xp.where(finite, a, zero), xp.where(finite, d, zero)
    err = xp.abs(a_finite - d_finite)  # 0 where either is not finite
    allowed = atol + rtol * xp.abs(d_finite)
    ok = xp.logical_or(same_inf, err <= allowed)
    if equal_nan:
        ok = xp.logical_or(ok, both_nan)
    ok = xp.logical_and(ok, xp.logical_or(finite, xp.logical_or(same_inf, both_nan)))
    if equal_nan is False:
        ok = xp.logical_and(ok, xp.logical_not(both_nan))
    if bool(xp.all(ok)):
        return
    bad = xp.logical_not(ok)
    n_bad = int(xp.sum(xp.astype(bad, xp.int64)))
    # worst = the largest excess over the tolerance; non-finite mismatches rank first
    excess = xp.where(bad, err - allowed, xp.full_like(err, -float("inf")))
    excess = xp.where(xp.logical_and(bad, xp.logical_not(finite)), float("inf"), excess)
    idx = _unravel(int(xp.argmax(xp.reshape(excess, (-1,)))), tuple(a.shape))
    nonzero = d_finite != 0
    rel = xp.where(nonzero, err / xp.where(nonzero, xp.abs(d_finite), 1.0 + zero), zero)
    raise AssertionError(
        f"{prefix}not close (rtol={rtol:g}, atol={atol:g}): {n_bad} of {math.prod(a.shape)} "
        f"elements mismatch\n"
        f"  worst at index {idx}: actual {float(a[idx])!r}, desired {float(d[idx])!r}\n"
        f"  max abs error {float(xp.max(err)):.6g}, max rel error {float(xp.max(rel)):.6g}"
    )


def _unravel(flat: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    idx = []
    for size in reversed(shape):
        idx.append(flat % size)
        flat //= size
    return tuple(reversed(idx))


def _first_index(xp: Any, bad: Array) -> tuple[int, ...]:
    flat = xp.reshape(bad, (-1,))
    return _unravel(int(xp.argmax(xp.astype(flat, xp.int8))), tuple(bad.shape))


# ----------------------------------------------------------------------------- FlashAttention rule


def _to_float64(x: Any) -> Any:
    """A host NumPy float64 copy of an array from any library (NumPy, torch, JAX, CuPy, ...).

    Comparisons across libraries (a torch candidate against a NumPy reference) happen on the
    host, in float64. bfloat16 is handled (torch through ``.double()``, NumPy through ml_dtypes).
    """
    import numpy

    library = _library(x)
    if library == "torch":
        import torch

        return x.detach().to(device="cpu", dtype=torch.float64).numpy()
    if library == "cupy":
        x = x.get()
    if isinstance(x, numpy.ndarray):
        return x.astype(numpy.float64)
    try:  # array-api-strict and other DLPack producers on the CPU
        return numpy.from_dlpack(x).astype(numpy.float64)
    except (TypeError, BufferError, RuntimeError, AttributeError):
        return numpy.asarray(x).astype(numpy.float64)  # JAX bfloat16 goes through ml_dtypes


def max_abs_error(candidate: Array, reference: Array) -> float:
    """``max |candidate - reference|`` in float64, for arrays from any library.

    Entries where both are the same infinity (``-inf`` LSE of a fully masked row) or both NaN
    count as exact; a NaN or infinity against a finite reference counts as ``inf``.
    """
    import numpy

    c, r = _to_float64(candidate), _to_float64(reference)
    if c.shape != r.shape:
        raise ValueError(
            f"refattn.testing: shapes differ: candidate {c.shape}, reference {r.shape}"
        )
    if c.size == 0:
        return 0.0
    same = (c == r) | (numpy.isnan(c) & numpy.isnan(r))
    with numpy.errstate(invalid="ignore"):
        err = numpy.where(same, 0.0, numpy.abs(c - r))
    err = numpy.where(numpy.isnan(err), numpy.inf, err)
    return float(err.max())


def _finite_max_abs(x: Any) -> float:
    import numpy

    finite = x[numpy.isfinite(x)]
    return float(numpy.abs(finite).max()) if finite.size else 0.0


@dataclass(frozen=True)
class AttentionTolerance:
    """The FlashAttention rule evaluated for one array (see :func:`attention_tolerance`)."""

    error: float  #: max |candidate - reference|
    baseline_error: float  #: max |baseline - reference|
    floor: float  #: floor_ulps * eps(dtype) * max|reference| (or * floor_scale)
    allowed: float  #: factor * baseline_error + floor (factor + 1 for float64 candidates)
    dtype: str  #: the candidate's dtype name
    worst_index: tuple[int, ...]  #: where |candidate - reference| is largest

    @property
    def passed(self) -> bool:
        return self.error <= self.allowed

    @property
    def ratio(self) -> float:
        """error / allowed (``inf`` when nothing is allowed and the error is not 0)."""
        if self.allowed > 0:
            return self.error / self.allowed
        return 0.0 if self.error == 0 else math.inf


def attention_tolerance(
    candidate: Array,
    reference_fp64: Array,
    baseline_lowp: Array | float,
    *,
    factor: float = 2.0,
    floor_ulps: float = 2.0,
    floor_scale: float | None = None,
) -> AttentionTolerance:
    r"""Evaluate the FlashAttention rule without asserting (see :func:`assert_attention_close`).

    ``allowed = factor * max|baseline - ref| + floor_ulps * eps(dtype) * max|ref|`` where
    ``dtype`` is the candidate's and ``max|ref|`` runs over the finite reference entries.
    ``baseline_lowp`` is the plain implementation's result (an array in the candidate's dtype),
    or its error ``max|baseline - ref|`` when that was measured elsewhere (a float, e.g. from
    :func:`float64_baseline_error`).

    ``floor_scale`` replaces ``max|ref|`` in the floor. Use it for a quantity that is a sum of
    terms much larger than the result, e.g. a gradient that is analytically zero (the key-bias
    gradient of attention, by the softmax's shift invariance): its rounding noise is relative to
    the terms (pass the magnitude of the neighbouring weight gradient), not to its own ~0 value.

    For a **float64 candidate** the reference is no more precise than the candidate, so the
    measured error includes the reference's own rounding, which is as large as a plain
    implementation's: the rule becomes ``(factor + 1) * baseline_error + floor``.
    """
    import numpy

    if getattr(candidate, "dtype", None) is None:
        raise TypeError(
            f"refattn.testing: candidate must be an array, got {type(candidate).__name__}"
        )
    ref_dtype = dtype_name(getattr(reference_fp64, "dtype", None))
    if ref_dtype != "float64":
        raise TypeError(
            f"refattn.testing: reference_fp64 must be float64, got {describe(reference_fp64)}"
        )
    c_dtype = dtype_name(candidate.dtype)
    shapes = {"candidate": tuple(candidate.shape), "reference_fp64": tuple(reference_fp64.shape)}
    if isinstance(baseline_lowp, (int, float)):
        if not baseline_lowp >= 0:
            raise ValueError(
                f"refattn.testing: a baseline error must be >= 0, got {baseline_lowp!r}"
            )
    elif getattr(baseline_lowp, "dtype", None) is None:
        raise TypeError(
            "refattn.testing: baseline_lowp must be an array or a baseline error (float), got "
            f"{type(baseline_lowp).__name__}"
        )
    else:
        b_dtype = dtype_name(baseline_lowp.dtype)
        if c_dtype != b_dtype:
            raise TypeError(
                "refattn.testing: the baseline must be computed in the candidate's dtype, got "
                f"candidate {c_dtype} and baseline_lowp {b_dtype}"
            )
        shapes["baseline_lowp"] = tuple(baseline_lowp.shape)
    eps = machine_epsilon(c_dtype)
    if len(set(shapes.values())) > 1:
        raise ValueError(f"refattn.testing: shapes differ: {shapes}")
    if not factor > 0 or not floor_ulps >= 0:
        raise ValueError(
            f"refattn.testing: factor must be > 0 and floor_ulps >= 0, got {factor}, {floor_ulps}"
        )
    c, r = _to_float64(candidate), _to_float64(reference_fp64)
    error = max_abs_error(c, r)
    if isinstance(baseline_lowp, (int, float)):
        baseline_error = float(baseline_lowp)
    else:
        baseline_error = max_abs_error(baseline_lowp, r)
    scale = _finite_max_abs(r) if floor_scale is None else float(floor_scale)
    floor = floor_ulps * eps * scale
    if c_dtype == "float64":  # the reference's own rounding error is in the measured error too
        factor = factor + 1.0
    worst: tuple[int, ...] = ()
    if c.size:
        same = (c == r) | (numpy.isnan(c) & numpy.isnan(r))
        with numpy.errstate(invalid="ignore"):
            err = numpy.where(same, 0.0, numpy.abs(c - r))
        err = numpy.where(numpy.isnan(err), numpy.inf, err)
        worst = tuple(int(i) for i in numpy.unravel_index(int(numpy.argmax(err)), c.shape))
    return AttentionTolerance(
        error=error,
        baseline_error=baseline_error,
        floor=floor,
        allowed=factor * baseline_error + floor,
        dtype=c_dtype,
        worst_index=worst,
    )


def float64_baseline_error(float32_baseline: Array, reference_of_float32_inputs: Array) -> float:
    r"""Estimate a plain **float64** implementation's error from a float32 one.

    A float64 candidate has no more precise reference to be measured against: refattn's float64
    result carries rounding errors of the same size as the candidate's, and a plain float64
    baseline computed here would share refattn's rounding of the scores (the same ``q * scale @
    k^T`` in the same BLAS), so its measured error would be too small. The error of a
    backward-stable computation is proportional to the unit roundoff, so the plain float64 error
    is estimated as

    .. math:: \max|b_{32} - r_{32}| \cdot arepsilon_{64} / arepsilon_{32}
        = \max|b_{32} - r_{32}| \cdot 2^{-29},

    where ``b32`` is the plain float32 implementation on float32-rounded inputs and ``r32``
    refattn's float64 result for those same inputs. Pass the result as ``baseline_lowp`` to
    :func:`attention_tolerance` / :func:`assert_attention_close`.
    """
    return max_abs_error(float32_baseline, reference_of_float32_inputs) * (
        EPS["float64"] / EPS["float32"]
    )


def assert_attention_close(
    candidate: Array,
    reference_fp64: Array,
    baseline_lowp: Array | float,
    *,
    factor: float = 2.0,
    floor_ulps: float = 2.0,
    floor_scale: float | None = None,
    name: str = "output",
) -> AttentionTolerance:
    r"""Assert the FlashAttention rule: the candidate is at most ``factor`` × as wrong as plain.

    .. math::

        \max|c - r| \le \mathrm{factor}\cdot\max|b - r|
        + \mathrm{floor\_ulps}\cdot\varepsilon_{\mathrm{dtype}}\cdot\max|r|

    Parameters
    ----------
    candidate : array (any library: NumPy, torch, JAX, CuPy), dtype float64/32/16 or bfloat16
        The result under test.
    reference_fp64 : float64 array of the same shape
        refattn's float64 result, ideally computed from the candidate's (rounded) inputs.
    baseline_lowp : array of the same shape, in the candidate's dtype, or a float
        A plain implementation's result in that dtype, e.g. :func:`lowp_attention_baseline`;
        or its error, already measured (a float; :func:`float64_baseline_error` for float64
        candidates).
    factor : float
        How many times the plain implementation's error the candidate may have (2 by default, as
        in FlashAttention's tests).
    floor_ulps : float
        The absolute floor, in units of ``eps(dtype) * max|reference|`` (see the module docstring).
    floor_scale : float, optional
        The magnitude the floor is relative to, instead of ``max|reference|`` (see
        :func:`attention_tolerance`).
    name : str
        What is being compared, for the message ("output", "dq", ...).

    Returns the :class:`AttentionTolerance` on success; raises AssertionError naming the errors,
    the allowed error, and the worst index with both values there.
    """
    tol = attention_tolerance(
        candidate,
        reference_fp64,
        baseline_lowp,
        factor=factor,
        floor_ulps=floor_ulps,
        floor_scale=floor_scale,
    )
    if not tol.passed:
        c, r = _to_float64(candidate), _to_float64(reference_fp64)
        idx = tol.worst_index
        raise AssertionError(
            f"{name}: error {tol.error:.4g} > allowed {tol.allowed:.4g} ({tol.dtype}); "
            f"allowed = {tol.allowed - tol.floor:.4g} ({factor:g}× the baseline error "
            f"{tol.baseline_error:.4g}{', +1× for float64' if tol.dtype == 'float64' else ''}) "
            f"+ floor {tol.floor:.4g} ({floor_ulps:g} × eps × max|reference|)\n"
            f"  worst at index {idx}: candidate {float(c[idx])!r}, reference {float(r[idx])!r}"
        )
    return tol
