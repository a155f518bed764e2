"""Check cases: small seeded inputs per op, used by ``refattn check`` (and golden vectors).

A :class:`Case` builds the primals and options of one op call on any backend. Optional
``torch_ref`` / ``jax_ref`` callables compute the same outputs with the framework's own autodiff,
so ``refattn check`` can compare outputs and gradients when the framework is installed.

Each area of the library registers its cases in a module of this package (``core``,
``layers``, ``efficient``, ...); :func:`all_cases` imports them all.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np  # cases are generated on the host, then moved to the backend

__all__ = ["Case", "all_cases", "register_case"]


@dataclass(frozen=True)
class Case:
    """One op call to check.

    Attributes
    ----------
    op : refattn.Op
    name : str
        Short label, unique per op ("gqa_causal_lower_right").
    make : callable ``(rng) -> (primals, options)``
        Host NumPy float64 primals (arrays or dicts of arrays) and keyword options (host NumPy
        masks etc.). :func:`to_backend` moves them to a namespace.
    torch_ref : callable ``(torch, primals, options) -> output(s)``, optional
        The same computation written with torch ops on float64 tensors (primals are leaf tensors
        with ``requires_grad``; options hold tensors where arrays were given).
    jax_ref : callable ``(jnp, primals, options) -> output(s)``, optional
        The same with ``jax.numpy`` (differentiated with ``jax.vjp``).
    tolerance : float
        Relative tolerance for framework comparisons in float64.
    fast : bool
        Use gradcheck's fast mode (large parameter trees).
    """

    op: Any
    name: str
    make: Callable[[np.random.Generator], tuple[tuple[Any, ...], dict[str, Any]]]
    torch_ref: Callable[..., Any] | None = None
    jax_ref: Callable[..., Any] | None = None
    tolerance: float = 1e-10
    fast: bool = False
    tags: tuple[str, ...] = field(default=())

    @property
    def label(self) -> str:
        return f"{self.op.name}[{self.name}]"


_CASES: list[Case] = []


def register_case(case: Case) -> Case:
    """Add a case to the registry (labels must be unique)."""
    if any(c.label == case.label for c in _CASES):
        raise ValueError(f"refattn.checks: duplicate case {case.label}")
    _CASES.append(case)
    return case


def all_cases() -> list[Case]:
    """Every registered case, importing each module of this package once."""
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")
    return list(_CASES)


def to_backend(xp: Any, tree: Any) -> Any:
    """Move a tree of host NumPy arrays (and plain values) to namespace ``xp``."""
    if isinstance(tree, dict):
        return {k: to_backend(xp, v) for k, v in tree.items()}
    if isinstance(tree, (tuple, list)):
        return type(tree)(to_backend(xp, v) for v in tree)
    if isinstance(tree, np.ndarray):
        return xp.asarray(tree)
    return tree
