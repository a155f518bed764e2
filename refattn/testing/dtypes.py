"""Floating dtypes across array libraries: names, machine epsilons, rounding.

Names are normalized so that one precision compares equal across NumPy, torch, JAX and CuPy
(``dtype_name``); ``round_to_dtype`` rounds to nearest even into float64, float32, float16 or
bfloat16 (the last through ``ml_dtypes`` on NumPy).
"""

from __future__ import annotations

from typing import Any

from .._backend import namespace

Array = Any

EPS = {
    "float64": 2.0**-52,
    "float32": 2.0**-23,
    "float16": 2.0**-10,
    "bfloat16": 2.0**-7,
}
#: the dtypes the low-precision helpers take
LOWP_DTYPES = ("float64", "float32", "float16", "bfloat16")


# ----------------------------------------------------------------------------- dtype helpers


def dtype_name(dtype: Any) -> str:
    """``"float32"`` for ``numpy.float32``, ``torch.float32``, ``jnp.float32``, ``"float32"``...

    Names are normalized so that the same precision compares equal across libraries.
    """
    name = getattr(dtype, "name", None)
    if not isinstance(name, str):
        name = str(dtype)
    name = name.rsplit(".", 1)[-1]  # "torch.bfloat16" -> "bfloat16"
    name = name.removeprefix("<class '").removesuffix("'>")
    return {"half": "float16", "double": "float64", "float": "float32"}.get(name, name)


def machine_epsilon(dtype: Any) -> float:
    """The gap between 1 and the next representable number, for a floating dtype (any library)."""
    name = dtype_name(dtype)
    if name not in EPS:
        raise TypeError(
            f"refattn.testing: no machine epsilon for dtype {dtype!r}; expected one of "
            f"{', '.join(EPS)}"
        )
    return EPS[name]


def lowp_dtype(xp: Any, name: str) -> Any:
    """The dtype object for ``name`` in namespace ``xp`` (TypeError when it has none)."""
    from array_api_compat import is_cupy_namespace, is_numpy_namespace

    if name in ("float32", "float64"):
        return getattr(xp, name)
    if name == "float16" and (is_numpy_namespace(xp) or is_cupy_namespace(xp)):
        return xp.float16
    if name == "bfloat16" and is_numpy_namespace(xp):
        try:
            import ml_dtypes
        except ImportError:
            raise TypeError(
                "refattn.testing: bfloat16 on NumPy needs the ml_dtypes package "
                "(pip install ml_dtypes)"
            ) from None
        return ml_dtypes.bfloat16
    if name not in LOWP_DTYPES:
        raise ValueError(
            f"refattn.testing: dtype must be one of {', '.join(LOWP_DTYPES)}, got {name!r}"
        )
    raise TypeError(
        f"refattn.testing: {name} is not available for arrays of {xp.__name__}; float16 needs "
        "NumPy or CuPy, bfloat16 needs NumPy with ml_dtypes"
    )


def is_floating(x: Array) -> bool:
    return dtype_name(getattr(x, "dtype", None)) in EPS


def round_to_dtype(x: Array, dtype: Any) -> Array:
    """``x`` rounded (to nearest even) to ``dtype`` ("float64", "float32", "float16", "bfloat16").

    The result keeps ``x``'s array library; it is stored in ``dtype``.
    """
    xp = namespace(x)
    return xp.astype(x, lowp_dtype(xp, dtype_name(dtype)))
