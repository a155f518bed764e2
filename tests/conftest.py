"""Shared fixtures: the ``xp`` backend fixture and seeded data helpers.

Every backend-agnostic test takes ``xp`` and runs once per backend that imports: NumPy (through
array-api-compat), array-api-strict (which rejects NumPy-isms on a machine with no GPU), and CuPy
when a CUDA device is present. CuPy is skipped with a reason otherwise.
"""

from __future__ import annotations

import numpy as np
import pytest
from array_api_compat import array_namespace


def _cupy_or_reason():
    try:
        import cupy
    except Exception as exc:  # ImportError, or a CUDA library that fails to load
        return None, f"cupy is not importable ({type(exc).__name__})"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None, "no CUDA device"
    except Exception as exc:
        return None, f"no usable CUDA device ({type(exc).__name__})"
    return array_namespace(cupy.empty(0)), ""


def _strict_or_reason():
    try:
        import array_api_strict
    except ImportError:
        return None, "array-api-strict is not installed"
    return array_namespace(array_api_strict.asarray(0.0)), ""


def _backend_params():
    cupy_xp, cupy_reason = _cupy_or_reason()
    strict_xp, strict_reason = _strict_or_reason()
    return [
        pytest.param(array_namespace(np.empty(0)), id="numpy"),
        pytest.param(
            strict_xp,
            id="array_api_strict",
            marks=pytest.mark.skipif(strict_xp is None, reason=strict_reason),
        ),
        pytest.param(
            cupy_xp,
            id="cupy",
            marks=[pytest.mark.gpu, pytest.mark.skipif(cupy_xp is None, reason=cupy_reason)],
        ),
    ]


@pytest.fixture(params=_backend_params())
def xp(request):
    """The array namespace under test (numpy, array_api_strict, cupy)."""
    return request.param


def to_numpy(x):
    """Host NumPy copy of an array from any backend (tests only)."""
    if hasattr(x, "get"):  # cupy
        return x.get()
    return np.asarray(x)


def rel_err(actual, desired) -> float:
    """``max|actual - desired| / max|desired|`` in float64 on the host (same shapes required)."""
    actual = np.asarray(to_numpy(actual), dtype=np.float64)
    desired = np.asarray(to_numpy(desired), dtype=np.float64)
    assert actual.shape == desired.shape
    return float(np.max(np.abs(actual - desired)) / max(np.max(np.abs(desired)), 1e-300))


def randn(xp, shape, *, seed, dtype="float64"):
    """Seeded standard-normal array on backend ``xp`` (generated on the host with NumPy)."""
    rng = np.random.default_rng(seed)
    host = rng.standard_normal(shape)
    return xp.asarray(host, dtype=getattr(xp, dtype))
