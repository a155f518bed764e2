"""Masked softmax and log-softmax, with their backward passes.

Semantics (shared by every op that normalises scores):

* ``mask`` is boolean, True = keep, broadcastable to ``x``. Masked entries, and entries equal to
  ``-inf``, get probability exactly 0.
* A slice whose entries are all masked (or all ``-inf``) gives 0 from ``softmax`` and ``-inf``
  from ``log_softmax``, and its gradient is 0, with no NaN anywhere.
* The maximum is subtracted before ``exp``: logits of +-1e4 and beyond do not overflow.
* An empty ``axis`` gives an empty result (and an empty gradient), as in torch and JAX.
"""

from __future__ import annotations

import math
from typing import Any

from .._backend import (
    check_floating,
    describe,
    device_of,
    exp_inplace,
    is_numpy_namespace,
    itemsize,
    namespace,
)
from .._op import Op
from .._runtime import n_threads, parallel_map

__all__ = ["log_softmax", "softmax"]

Array = Any

#: on NumPy, inputs of at least two such blocks are cut into blocks of about this many bytes,
#: computed on the thread pool
_BLOCK_BYTES = 2**20


def _validate(xp: Any, x: Array, axis: int, mask: Array | None, op: str) -> int:
    check_floating(xp, f"{op}: x", x)
    if x.ndim == 0:
        raise ValueError(f"refattn.{op}: x must have at least one dimension, got a 0-d array")
    if not isinstance(axis, int) or not -x.ndim <= axis < x.ndim:
        raise ValueError(f"refattn.{op}: axis {axis!r} is out of range for x of {describe(x)}")
    if mask is not None:
        check_mask(xp, f"{op}: mask", mask, tuple(x.shape))
    return axis % x.ndim


def check_mask(xp: Any, name: str, mask: Array, target: tuple[int, ...]) -> None:
    """TypeError unless ``mask`` is boolean; ValueError unless it broadcasts to ``target``."""
    if mask.dtype != xp.bool:
        raise TypeError(
            f"refattn.{name} must be boolean (True = keep), got dtype {mask.dtype}; "
            "pass additive float masks as a bias"
        )
    check_broadcast(name, mask, target)


def check_broadcast(name: str, x: Array, target: tuple[int, ...]) -> None:
    """ValueError unless ``x`` broadcasts to exactly ``target``."""
    shape = tuple(x.shape)
    ok = len(shape) <= len(target) and all(
        s in (1, t) for s, t in zip(reversed(shape), reversed(target), strict=False)
    )
    if not ok:
        raise ValueError(f"refattn.{name} of shape {shape} does not broadcast to {target}")


def slice_max(xp: Any, x: Array, *, axis: int) -> Array:
    """``max(x, axis=axis, keepdims=True)``; ``-inf`` when ``axis`` is empty.

    NumPy's ``max`` has no identity and raises on an empty axis; ``-inf`` makes an empty slice
    a fully masked one (shift 0, total 0).
    """
    if x.shape[axis] == 0:
        shape = tuple(1 if i == axis % x.ndim else n for i, n in enumerate(x.shape))
        return xp.full(shape, -float("inf"), dtype=x.dtype, device=device_of(x))
    return xp.max(x, axis=axis, keepdims=True)


def masked_softmax_parts(
    x: Array, *, axis: int, keep: Array | None, xp: Any
) -> tuple[Array, Array, Array]:
    """``(e, total, shift)`` with ``softmax = e / total`` and ``logsumexp = shift + log(total)``.

    ``e = exp(x - shift)`` is 0 at masked entries; ``shift`` is the slice maximum (0 for a fully
    masked slice, whose ``total`` is 0). Shared by softmax, log_softmax and attention.
    """
    neg_inf = -float("inf")
    if keep is not None:
        x = xp.where(keep, x, neg_inf)
    shift = slice_max(xp, x, axis=axis)
    shift = xp.where(xp.isfinite(shift), shift, xp.zeros_like(shift))
    e = exp_inplace(xp, x - shift)  # x - shift is a fresh array: exp it in place
    total = xp.sum(e, axis=axis, keepdims=True)
    return e, total, shift


def normalize(e: Array, total: Array, *, xp: Any) -> Array:
    """``e / total``, with 0 for slices whose total is 0 (fully masked), computed in ``e``.

    ``e`` (from :func:`masked_softmax_parts`, the caller's own array) is overwritten.
    """
    e /= xp.where(total == 0, xp.ones_like(total), total)
    return e


def _blockwise(xp: Any, fn: Any, x: Array, axis: int, *others: Array | None) -> Array:
    """``fn(x, *others)``, computed in blocks along an axis other than ``axis``.

    ``fn`` maps ``x`` (and ``others``, each broadcastable to ``x`` or None) to an array shaped
    like ``x``, every slice along ``axis`` on its own; so blocks of slices give the same result.
    On NumPy with two or more threads, an ``x`` of at least two :data:`_BLOCK_BYTES` blocks is
    split along its first other axis of size > 1, and the blocks run on the thread pool: NumPy's
    ufuncs use one core, so blocks on the pool's threads use them all (the measured gain is in
    ``docs/benchmarks.md``). Otherwise ``fn`` runs once, on the whole arrays.
    """
    split = next((i for i in range(x.ndim) if i != axis and x.shape[i] > 1), None)
    n_bytes = math.prod(x.shape) * itemsize(xp, x.dtype)
    parallel = is_numpy_namespace(xp) and n_threads() > 1 and n_bytes >= 2 * _BLOCK_BYTES
    if split is None or not parallel:
        return fn(x, *others)
    n = int(x.shape[split])
    step = max(1, n * _BLOCK_BYTES // n_bytes)
    out = xp.empty_like(x)

    def run(start: int) -> None:
        rows = slice(start, min(start + step, n))
        block = (slice(None),) * split + (rows,)
        out[block] = fn(x[block], *(_rows_of(a, x.ndim, split, rows) for a in others))

    parallel_map(xp, run, range(0, n, step))
    return out


def _rows_of(a: Array | None, ndim: int, split: int, rows: slice) -> Array | None:
    """Rows ``rows`` along axis ``split`` of an ``ndim``-d array that ``a`` broadcasts to."""
    if a is None:
        return None
    axis = split - (ndim - a.ndim)  # a's dimensions align with the last ones
    if axis < 0 or a.shape[axis] == 1:
        return a
    return a[(slice(None),) * axis + (rows,)]


def _softmax_fwd(x: Array, /, *, axis: int = -1, mask: Array | None = None) -> tuple[Array, Any]:
    r"""Softmax along ``axis``, with an optional boolean keep-mask.

    ``y_i = exp(x_i) / sum_{j kept} exp(x_j)`` for kept ``i``, 0 for masked ``i``.

    Parameters
    ----------
    x : array (...), real floating
    axis : int
    mask : bool array broadcastable to ``x``, True = keep

    Returns
    -------
    y : array shaped like ``x``, same dtype. Rows of a fully masked slice are 0.
    """
    xp = namespace(x, mask)
    axis = _validate(xp, x, axis, mask, "softmax")

    def forward(x: Array, mask: Array | None) -> Array:
        e, total, _ = masked_softmax_parts(x, axis=axis, keep=mask, xp=xp)
        return normalize(e, total, xp=xp)

    y = _blockwise(xp, forward, x, axis, mask)
    return y, (y,)


def _softmax_bwd(
    residuals: Any, dy: Array, /, *, axis: int = -1, mask: Array | None = None
) -> tuple[Array]:
    r"""VJP of softmax.

    .. math::

        \frac{\partial y_j}{\partial x_i} = y_j(\delta_{ij} - y_i)
        \quad\Rightarrow\quad
        dx_i = \sum_j dy_j\, y_j(\delta_{ij} - y_i) = y_i\,(dy_i - \textstyle\sum_j dy_j y_j).

    Masked entries have ``y = 0``, so their gradient is 0; a fully masked slice has ``y = 0``
    everywhere and gets 0.
    """
    (y,) = residuals
    xp = namespace(y)
    axis = axis % y.ndim

    def backward(y: Array, dy: Array) -> Array:
        return y * (dy - xp.sum(dy * y, axis=axis, keepdims=True))

    return (_blockwise(xp, backward, y, axis, dy),)


softmax = Op(_softmax_fwd, _softmax_bwd, name="softmax", register=True)


def _log_softmax_fwd(
    x: Array, /, *, axis: int = -1, mask: Array | None = None
) -> tuple[Array, Any]:
    r"""Log-softmax along ``axis``, with an optional boolean keep-mask.

    ``y_i = x_i - log sum_{j kept} exp(x_j)`` for kept ``i``; ``-inf`` for masked ``i`` and for
    every entry of a fully masked slice.

    Parameters
    ----------
    x : array (...), real floating
    axis : int
    mask : bool array broadcastable to ``x``, True = keep
    """
    xp = namespace(x, mask)
    axis = _validate(xp, x, axis, mask, "log_softmax")

    def forward(x: Array, mask: Array | None) -> Array:
        _e, total, shift = masked_softmax_parts(x, axis=axis, keep=mask, xp=xp)
        keep = x > -float("inf")
        if mask is not None:
            keep = xp.logical_and(keep, mask)
        safe_total = xp.where(total == 0, xp.ones_like(total), total)
        return xp.where(keep, x - shift - xp.log(safe_total), -float("inf"))

    y = _blockwise(xp, forward, x, axis, mask)
    return y, (y,)


def _log_softmax_bwd(
    residuals: Any, dy: Array, /, *, axis: int = -1, mask: Array | None = None
) -> tuple[Array]:
    r"""VJP of log-softmax.

    .. math::

        \frac{\partial y_j}{\partial x_i} = \delta_{ij} - p_i,\quad p = \mathrm{softmax}(x)
        \quad\Rightarrow\quad
        dx_i = dy_i - p_i \textstyle\sum_{j\,\mathrm{kept}} dy_j .

    Masked entries (``y = -inf``) do not depend on ``x``: their cotangent is ignored and their
    gradient is 0. Note ``p_i = exp(y_i)`` may underflow to 0 for a kept entry far below the
    maximum; its gradient ``dy_i`` is still exact.
    """
    (y,) = residuals
    xp = namespace(y)
    axis = axis % y.ndim

    def backward(y: Array, dy: Array) -> Array:
        keep = y > -float("inf")
        zero = xp.zeros_like(y)
        dy = xp.where(keep, dy, zero)
        p = xp.exp(y)
        return xp.where(keep, dy - p * xp.sum(dy, axis=axis, keepdims=True), zero)

    return (_blockwise(xp, backward, y, axis, dy),)


log_softmax = Op(_log_softmax_fwd, _log_softmax_bwd, name="log_softmax", register=True)
