"""The op machinery: :class:`Op`, :func:`vjp` and the registry of ops.

An op is three things kept together: a forward that returns ``(output, residuals)``, a backward
that takes ``(residuals, cotangent)`` and returns one gradient per primal, and a docstring with the
shapes and the derivation. There is no tape: a composite op calls its primitives' forwards, then
their backwards in reverse order, in plain code.

Contract (the ``jax.vjp`` contract applied to a refattn op)::

    out, pullback = refattn.vjp(op, *primals, **options)
    grads = pullback(cotangent)        # a tuple, one gradient per primal

* ``primals`` are the differentiable positional inputs: arrays, or nested dicts/tuples/lists of
  arrays (a layer's parameters). Each gradient has the structure and shapes of its primal.
* ``options`` are keyword-only and never differentiated (masks, flags, sizes), like the
  ``nondiff_argnames`` of ``jax.custom_vjp``. The backward receives only the options it names
  in its signature (all of them if it takes ``**kwargs``), so it declares what it depends on.
* Optional primals: a forward may end its positional parameters with defaults (SDPA's
  ``bias`` and ``sinks``). Given positionally they are primals and get gradients; given as
  keywords they are options. A backward that names ``n_primals`` in its signature is told how
  many primals the call had, and returns that many gradients.
* When the output is a tuple (extra outputs were requested), the cotangent is a tuple of the same
  length; ``None`` marks an output that is not differentiated.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from . import _tree
from ._backend import describe

__all__ = ["Op", "registered_ops", "vjp"]

Forward = Callable[..., tuple[Any, Any]]
Backward = Callable[..., tuple[Any, ...]]

_REGISTRY: dict[str, Op] = {}


class Op:
    """A differentiable operation with a hand-written backward.

    Parameters
    ----------
    forward : callable
        ``forward(*primals, **options) -> (output, residuals)``.
    backward : callable
        ``backward(residuals, cotangent, **options) -> tuple`` of one gradient per primal. It
        receives the forward's keyword options that its signature names (every option if it
        takes ``**kwargs``); anything else the backward needs belongs in the residuals.
    name : str, optional
        Defaults to the forward's ``__name__`` with a leading ``_`` and a trailing ``_fwd``
        removed.
    register : bool
        Add the op to the registry that ``refattn check`` walks (only built-in ops and ops that
        come with check cases need this).

    Calling the op runs the forward and returns the output only. ``refattn.vjp(op, ...)`` also
    returns the pullback, and ``refattn.gradcheck(op, ...)`` checks the backward.

    Examples
    --------
    >>> import numpy as np, refattn
    >>> def square_fwd(x):
    ...     return x * x, (x,)
    >>> def square_bwd(res, dy):
    ...     (x,) = res
    ...     return (2.0 * x * dy,)
    >>> square = refattn.Op(square_fwd, square_bwd, name="square")
    >>> refattn.gradcheck(square, np.linspace(-1.0, 1.0, 5))
    True
    """

    def __init__(
        self,
        forward: Forward,
        backward: Backward,
        *,
        name: str | None = None,
        register: bool = False,
    ) -> None:
        if not callable(forward) or not callable(backward):
            raise TypeError("refattn.Op: forward and backward must be callable")
        self.forward = forward
        self.backward = backward
        self.name = name or _default_name(forward)
        self.__name__ = self.name
        self.__qualname__ = self.name
        self.__doc__ = forward.__doc__
        self.__module__ = getattr(forward, "__module__", __name__)
        try:
            self.__signature__ = inspect.signature(forward)
        except (TypeError, ValueError):  # builtins without signatures
            pass
        self._backward_options = _keyword_names(backward)
        if register:
            if self.name in _REGISTRY:
                raise ValueError(f"refattn.Op: an op named {self.name!r} is already registered")
            _REGISTRY[self.name] = self

    def __call__(self, *primals: Any, **options: Any) -> Any:
        out, _ = self.forward(*primals, **options)
        return out

    def __repr__(self) -> str:
        return f"<refattn.Op {self.name}>"

    def apply_backward(self, residuals: Any, cotangent: Any, **options: Any) -> tuple[Any, ...]:
        """Call the backward with the forward's ``options``, keeping those it declares.

        For composite ops, which call their primitives' backwards by hand; :func:`vjp` uses it
        too, and also checks the cotangent and the gradients.
        """
        if self._backward_options is not None:
            options = {k: v for k, v in options.items() if k in self._backward_options}
        return self.backward(residuals, cotangent, **options)

    @property
    def counts_primals(self) -> bool:
        """Whether the backward takes ``n_primals`` (the op has optional primals)."""
        return self._backward_options is not None and "n_primals" in self._backward_options

    @property
    def primal_names(self) -> list[str]:
        """Names of the forward's positional parameters (used in error messages)."""
        try:
            params = inspect.signature(self.forward).parameters.values()
        except (TypeError, ValueError):
            return []
        return [
            p.name
            for p in params
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
        ]


def _keyword_names(fn: Callable[..., Any]) -> frozenset[str] | None:
    """The keyword options ``fn`` takes, or None if it takes ``**kwargs`` (or has no signature)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return frozenset(p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))


def _default_name(fn: Callable[..., Any]) -> str:
    name = getattr(fn, "__name__", "op")
    name = name.removeprefix("_")
    return name.removesuffix("_fwd").removesuffix("_forward")


def registered_ops() -> dict[str, Op]:
    """The registry: op name -> :class:`Op`, for ``refattn check``."""
    return dict(_REGISTRY)


def vjp(op: Op, *primals: Any, **options: Any) -> tuple[Any, Callable[[Any], tuple[Any, ...]]]:
    """Run ``op`` forward and return ``(output, pullback)``.

    ``pullback(cotangent)`` returns a tuple with one gradient per primal, each shaped like its
    primal (nested dicts for parameter trees). The cotangent must have the output's structure and
    shapes: a tuple for tuple outputs, with ``None`` for outputs that are not differentiated.
    A wrong cotangent raises ValueError/TypeError before the backward runs.
    """
    if not isinstance(op, Op):
        raise TypeError(f"refattn.vjp: op must be a refattn.Op, got {type(op).__name__}")
    out, residuals = op.forward(*primals, **options)
    counted = {"n_primals": len(primals)} if op.counts_primals else {}

    def pullback(cotangent: Any) -> tuple[Any, ...]:
        _check_cotangent(op, out, cotangent)
        grads = op.apply_backward(residuals, cotangent, **options, **counted)
        return _check_grads(op, primals, grads)

    return out, pullback


def _check_cotangent(op: Op, out: Any, cotangent: Any) -> None:
    if isinstance(out, tuple):
        if not isinstance(cotangent, tuple) or len(cotangent) != len(out):
            got = (
                f"a tuple of length {len(cotangent)}"
                if isinstance(cotangent, tuple)
                else type(cotangent).__name__
            )
            raise ValueError(
                f"refattn.vjp({op.name}): the output is a tuple of {len(out)} arrays, so the "
                f"cotangent must be a tuple of {len(out)} (None for an output that is not "
                f"differentiated); got {got}"
            )
        pairs = list(zip(out, cotangent, strict=True))
    else:
        if cotangent is None:
            raise ValueError(f"refattn.vjp({op.name}): the cotangent must be an array, got None")
        pairs = [(out, cotangent)]
    for i, (o, ct) in enumerate(pairs):
        if ct is None:
            continue
        where = f"cotangent[{i}]" if isinstance(out, tuple) else "cotangent"
        if tuple(getattr(ct, "shape", ())) != tuple(o.shape):
            raise ValueError(
                f"refattn.vjp({op.name}): {where} must have the output's shape {tuple(o.shape)}, "
                f"got {describe(ct)}"
            )
        if getattr(ct, "dtype", None) != o.dtype:
            raise TypeError(
                f"refattn.vjp({op.name}): {where} must have the output's dtype {o.dtype}, "
                f"got {describe(ct)}"
            )


def _check_grads(op: Op, primals: tuple[Any, ...], grads: Any) -> tuple[Any, ...]:
    """The driver's check: one gradient per primal, with its primal's structure, shapes, dtypes
    and array library."""
    if not isinstance(grads, tuple) or len(grads) != len(primals):
        n = len(grads) if isinstance(grads, tuple) else type(grads).__name__
        raise RuntimeError(
            f"refattn.vjp({op.name}): the backward must return a tuple of {len(primals)} "
            f"gradients (one per primal), got {n}"
        )
    for i, (p, g) in enumerate(zip(primals, grads, strict=True)):
        if _tree.structure(p) != _tree.structure(g):
            raise RuntimeError(
                f"refattn.vjp({op.name}): gradient {i} does not have its primal's structure"
            )
        for (path, pl), gl in zip(_tree.leaves_with_paths(p), _tree.leaves(g), strict=True):
            if pl is None or gl is None:  # an absent optional primal has no gradient
                if pl is not gl:
                    raise RuntimeError(
                        f"refattn.vjp({op.name}): gradient {i}{'.' + path if path else ''} must "
                        "be None exactly where its primal is None"
                    )
                continue
            where = f"gradient {i}{'.' + path if path else ''}"
            if isinstance(pl, (int, float)):  # a Python number (a learnable softcap): its
                if tuple(gl.shape) != ():  # gradient is a 0-d array of the call's dtype
                    raise RuntimeError(
                        f"refattn.vjp({op.name}): {where} has shape {tuple(gl.shape)}, its "
                        "primal is a number"
                    )
                continue
            if tuple(pl.shape) != tuple(gl.shape):
                raise RuntimeError(
                    f"refattn.vjp({op.name}): {where} has shape {tuple(gl.shape)}, its primal "
                    f"{tuple(pl.shape)}"
                )
            if gl.dtype != pl.dtype:
                raise RuntimeError(
                    f"refattn.vjp({op.name}): {where} has dtype {gl.dtype}, its primal {pl.dtype}"
                )
            if _library(gl) != _library(pl):
                raise RuntimeError(
                    f"refattn.vjp({op.name}): {where} is a {_library(gl)} array, its primal a "
                    f"{_library(pl)} array (gradients stay on the primal's backend)"
                )
    return grads


def _library(x: Any) -> str:
    """The top-level module of an array's type (``numpy``, ``cupy``, ``array_api_strict``)."""
    return type(x).__module__.split(".", 1)[0]
