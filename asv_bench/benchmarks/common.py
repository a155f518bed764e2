"""Shared seeded data and backend helpers for the asv suites."""

from __future__ import annotations

import numpy as np

SEED = 20261123


def rng(offset: int = 0) -> np.random.Generator:
    return np.random.default_rng(SEED + offset)


def namespace(backend: str):
    """The array namespace for ``backend`` ("numpy" or "cupy"); NotImplementedError skips."""
    from array_api_compat import array_namespace

    if backend == "numpy":
        return array_namespace(np.empty(0))
    if backend == "cupy":
        try:
            import cupy

            if cupy.cuda.runtime.getDeviceCount() < 1:
                raise NotImplementedError("no CUDA device")
        except Exception as exc:
            raise NotImplementedError(f"cupy unavailable: {exc}") from None
        return array_namespace(cupy.empty(0))
    raise NotImplementedError(backend)


def synchronize(xp) -> None:
    """Wait for the device (CuPy) so that timings include the work."""
    if "cupy" in getattr(xp, "__name__", ""):
        import cupy

        cupy.cuda.get_current_stream().synchronize()


def torch_or_skip():
    try:
        import torch
    except ImportError:
        raise NotImplementedError("torch is not installed") from None
    return torch


def randn(shape, dtype="float64", offset: int = 0) -> np.ndarray:
    return rng(offset).standard_normal(shape).astype(dtype)
