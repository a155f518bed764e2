"""Finite-difference gradient checking for any :class:`refattn.Op`.

``gradcheck(op, *primals, **options)`` compares the op's registered backward with central finite
differences, in float64, and raises :class:`GradcheckError` on a mismatch.

Full mode (default) builds both Jacobians and compares them entry by entry::

    numerical  J[o, i] = (f(x + eps e_i)[o] - f(x - eps e_i)[o]) / (2 eps)
    analytical J[o, i] = pullback(e_o)[i]
    |analytical - numerical| <= atol + rtol * |numerical|      for every (o, i)

The defaults (``eps=1e-6, atol=1e-8, rtol=1e-6``) are far tighter than torch's (``atol=1e-5,
rtol=1e-3``): central differences in float64 are accurate to about ``eps**2 * |f'''| +
1e-16 * |f| / eps ~ 1e-10`` for inputs and outputs of order one, so a backward that is wrong by
1e-5 relative is caught, and one wrong by 1e-3 fails by a wide margin.

Fast mode (``fast=True``) checks random projections instead, for every input: with a random
output direction ``u`` and input direction ``v``, ``<u, J v>`` by finite differences against
``<pullback(u), v>`` (torch's fast mode; JAX's dot-product test). It costs two forwards and one
backward per input instead of one forward pair per input entry and one backward per output entry.

Output entries that are not finite at the evaluation point (the ``-inf`` log-sum-exp of a fully
masked row) are skipped: their derivative does not exist. Integer and boolean inputs cannot be
perturbed and are rejected.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from . import _tree
from ._backend import host_float64 as _host
from ._backend import namespace, real_number
from ._op import Op, vjp

__all__ = ["GradcheckError", "gradcheck"]


class GradcheckError(AssertionError):
    """The backward of an op disagrees with finite differences.

    Attributes
    ----------
    op, input, output : str
        The op's name, the input (primal name and tree path) and the output that disagree.
    index, output_index : tuple of int
        The worst entry of the input and of the output (``output_index`` is None in fast mode).
    numerical, analytical : float
        The two values at the worst entry.
    """

    def __init__(
        self,
        message: str,
        *,
        op: str,
        input: str,
        output: str,
        index: tuple[int, ...] | None,
        output_index: tuple[int, ...] | None,
        numerical: float,
        analytical: float,
    ) -> None:
        super().__init__(message)
        self.op = op
        self.input = input
        self.output = output
        self.index = index
        self.output_index = output_index
        self.numerical = numerical
        self.analytical = analytical


def gradcheck(
    op: Op,
    *primals: Any,
    eps: float = 1e-6,
    atol: float = 1e-8,
    rtol: float = 1e-6,
    fast: bool = False,
    seed: int = 0,
    op_options: dict[str, Any] | None = None,
    **options: Any,
) -> bool:
    """Check ``op``'s backward against central finite differences in float64.

    Parameters
    ----------
    op : refattn.Op
        The op to check.
    *primals : arrays or trees of arrays
        The point to check at. Floating inputs of any precision are converted to float64 on
        their own backend; the op is evaluated only in float64.
    eps, atol, rtol : float
        Step of the central difference and the tolerances of
        ``|analytical - numerical| <= atol + rtol * |numerical|``.
    fast : bool
        Check random projections ``<u, J v>`` per input instead of the full Jacobian.
    seed : int
        Seed of the random directions (fast mode) and nothing else.
    op_options : dict, optional
        Options for the op whose names clash with gradcheck's own (``eps``, ``atol``, ...),
        e.g. ``gradcheck(refattn.layer_norm, params, x, op_options={"eps": 1e-3})``.
    **options
        Keyword options passed to the op (masks, flags).

    Returns
    -------
    True on success.

    Raises
    ------
    GradcheckError
        With the op, the input, the output, the worst index, and the numerical and analytical
        values.
    TypeError
        For inputs that are not floating point.
    ValueError
        For ``eps <= 0`` or a negative tolerance.
    """
    if not isinstance(op, Op):
        raise TypeError(f"refattn.gradcheck: op must be a refattn.Op, got {type(op).__name__}")
    if not primals:
        raise ValueError(f"refattn.gradcheck({op.name}): no primal inputs were given")
    eps = real_number("gradcheck", "eps", eps)
    atol = real_number("gradcheck", "atol", atol)
    rtol = real_number("gradcheck", "rtol", rtol)
    if not (eps > 0.0 and atol >= 0.0 and rtol >= 0.0):
        raise ValueError(
            f"refattn.gradcheck: eps must be > 0 and atol, rtol >= 0, got eps={eps!r}, "
            f"atol={atol!r}, rtol={rtol!r}"
        )
    options = {**options, **(op_options or {})}
    primals64 = tuple(_to_float64(op, i, p) for i, p in enumerate(primals))
    names = _input_names(op, primals64)
    out, pullback = vjp(op, *primals64, **options)
    out_leaves = _output_leaves(out)

    def evaluate(new_primals: tuple[Any, ...]) -> list[Any]:
        return _output_leaves(op(*new_primals, **options))

    if fast:
        _check_fast(op, primals64, names, out_leaves, pullback, evaluate, eps, atol, rtol, seed)
    else:
        _check_full(op, primals64, names, out, out_leaves, pullback, evaluate, eps, atol, rtol)
    return True


# ----------------------------------------------------------------------------- helpers


def _to_float64(op: Op, i: int, primal: Any) -> Any:
    def convert(leaf: Any) -> Any:
        if leaf is None:  # an absent optional primal
            return None
        xp = namespace(leaf)
        if not xp.isdtype(leaf.dtype, "real floating"):
            raise TypeError(
                f"refattn.gradcheck({op.name}): primal {i} must be real floating to be "
                f"perturbed, got dtype {leaf.dtype}"
            )
        return xp.asarray(leaf, dtype=xp.float64, copy=True)

    return _tree.map_leaves(convert, primal)


def _input_names(op: Op, primals: tuple[Any, ...]) -> list[list[str]]:
    """For each primal, the display name of each of its leaves: ``'q'``, ``'params.query.bias'``."""
    declared = op.primal_names
    names = []
    for i, p in enumerate(primals):
        base = declared[i] if i < len(declared) else f"primal {i}"
        names.append(
            [
                f"{base}.{path}" if path else base
                for path, leaf in _tree.leaves_with_paths(p)
                if leaf is not None
            ]
        )
    return names


def _output_leaves(out: Any) -> list[Any]:
    return list(out) if isinstance(out, tuple) else [out]


def _flat(xp: Any, x: Any) -> Any:
    return xp.reshape(x, (-1,))


def _perturbed(primals: tuple[Any, ...], p: int, leaf: int, new_leaf: Any) -> tuple[Any, ...]:
    leaves = _tree.leaves(primals[p])
    leaves[leaf] = new_leaf
    new = list(primals)
    new[p] = _tree.replace_leaves(primals[p], leaves)
    return tuple(new)


def _unravel(index: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    out = []
    for size in reversed(shape):
        out.append(index % size if size else 0)
        index = index // size if size else 0
    return tuple(reversed(out))


def _cotangent_basis(xp: Any, out: Any, out_leaves: list[Any], which: int, flat_index: int) -> Any:
    """The cotangent that is 1 at one entry of one output and None for the other outputs."""
    flat = xp.zeros((math.prod(out_leaves[which].shape),), dtype=out_leaves[which].dtype)
    flat[flat_index] = 1.0
    ct_leaf = xp.reshape(flat, out_leaves[which].shape)
    if isinstance(out, tuple):
        return tuple(ct_leaf if k == which else None for k in range(len(out)))
    return ct_leaf


def _fail(
    op: Op,
    *,
    input_name: str,
    output_name: str,
    index: tuple[int, ...] | None,
    output_index: tuple[int, ...] | None,
    numerical: float,
    analytical: float,
    atol: float,
    rtol: float,
    fast: bool,
) -> GradcheckError:
    bound = atol + rtol * abs(numerical)
    where = (
        f"the projection <u, J v> of {output_name} on {input_name}"
        if fast
        else f"d {output_name}{list(output_index or ())} / d {input_name}{list(index or ())}"
    )
    message = (
        f"gradcheck failed for op '{op.name}': {where}: numerical {numerical:.12g}, "
        f"analytical {analytical:.12g}, |difference| {abs(numerical - analytical):.3g} > "
        f"atol + rtol*|numerical| = {bound:.3g}"
    )
    return GradcheckError(
        message,
        op=op.name,
        input=input_name,
        output=output_name,
        index=index,
        output_index=output_index,
        numerical=numerical,
        analytical=analytical,
    )


def _output_names(out_leaves: list[Any]) -> list[str]:
    return ["output"] if len(out_leaves) == 1 else [f"output[{k}]" for k in range(len(out_leaves))]


def _all_leaves(grads: tuple[Any, ...]) -> list[Any]:
    return [leaf for g in grads for leaf in _tree.leaves(g) if leaf is not None]


def _input_leaves(primals: tuple[Any, ...]) -> list[tuple[int, int, Any]]:
    """``(primal position, leaf position, leaf)`` for every leaf of every primal."""
    return [
        (p, j, leaf)
        for p, pr in enumerate(primals)
        for j, leaf in enumerate(_tree.leaves(pr))
        if leaf is not None
    ]


def _check_full(
    op: Op,
    primals: tuple[Any, ...],
    names: list[list[str]],
    out: Any,
    out_leaves: list[Any],
    pullback: Callable[[Any], tuple[Any, ...]],
    evaluate: Callable[[tuple[Any, ...]], list[Any]],
    eps: float,
    atol: float,
    rtol: float,
) -> None:
    import numpy as np  # host-side Jacobian bookkeeping

    out_names = _output_names(out_leaves)
    flat_names = [n for ns in names for n in ns]
    inputs = _input_leaves(primals)
    finite = [np.isfinite(_host(o)).reshape(-1) for o in out_leaves]
    # Analytical Jacobians: one pullback per finite output entry gives one row for every input.
    analytical = [
        [np.zeros((f.size, math.prod(leaf.shape))) for (_, _, leaf) in inputs] for f in finite
    ]
    for k, o_leaf in enumerate(out_leaves):
        xp = namespace(o_leaf)
        for j in np.flatnonzero(finite[k]):
            grads = _all_leaves(pullback(_cotangent_basis(xp, out, out_leaves, k, int(j))))
            for leaf_index, g in enumerate(grads):
                analytical[k][leaf_index][j, :] = _host(g).reshape(-1)
    # Numerical Jacobians: one pair of forwards per input entry gives one column for every output.
    for leaf_index, (p, leaf_pos, leaf) in enumerate(inputs):
        lxp = namespace(leaf)
        base = _flat(lxp, leaf)
        n_in = base.shape[0]
        numerical = [np.zeros((f.size, n_in)) for f in finite]
        for i in range(n_in):
            sides: list[list[Any]] = []
            for sign in (1.0, -1.0):
                moved = lxp.asarray(base, copy=True)
                moved[i] = base[i] + sign * eps
                new = _perturbed(primals, p, leaf_pos, lxp.reshape(moved, leaf.shape))
                sides.append([_host(o).reshape(-1) for o in evaluate(new)])
            with np.errstate(invalid="ignore"):  # inf - inf at non-finite outputs, skipped
                for k in range(len(out_leaves)):
                    column = (sides[0][k] - sides[1][k]) / (2.0 * eps)
                    numerical[k][:, i] = np.where(finite[k], column, 0.0)
        for k, o_leaf in enumerate(out_leaves):
            num, ana = numerical[k], analytical[k][leaf_index]
            excess = np.abs(ana - num) - (atol + rtol * np.abs(num))
            if excess.size == 0:
                continue
            worst = int(np.argmax(excess))
            if not excess.flat[worst] <= 0.0:
                j, i = divmod(worst, n_in)
                raise _fail(
                    op,
                    input_name=flat_names[leaf_index],
                    output_name=out_names[k],
                    index=_unravel(i, tuple(leaf.shape)),
                    output_index=_unravel(j, tuple(o_leaf.shape)),
                    numerical=float(num[j, i]),
                    analytical=float(ana[j, i]),
                    atol=atol,
                    rtol=rtol,
                    fast=False,
                )


def _check_fast(
    op: Op,
    primals: tuple[Any, ...],
    names: list[list[str]],
    out_leaves: list[Any],
    pullback: Callable[[Any], tuple[Any, ...]],
    evaluate: Callable[[tuple[Any, ...]], list[Any]],
    eps: float,
    atol: float,
    rtol: float,
    seed: int,
) -> None:
    import numpy as np  # host-side random directions, moved to each backend below

    rng = np.random.default_rng(seed)
    out_names = _output_names(out_leaves)
    finite = [np.isfinite(_host(o)) for o in out_leaves]
    u_host = [np.where(f, rng.standard_normal(f.shape), 0.0) for f in finite]
    u = [namespace(o).asarray(uh, dtype=o.dtype) for o, uh in zip(out_leaves, u_host, strict=True)]
    analytical_grads = _all_leaves(pullback(tuple(u) if len(u) > 1 else u[0]))

    flat_names = [n for ns in names for n in ns]
    for leaf_index, (p, leaf_pos, leaf) in enumerate(_input_leaves(primals)):
        xp = namespace(leaf)
        v_host = rng.standard_normal(tuple(leaf.shape))
        v = xp.asarray(v_host, dtype=leaf.dtype)
        plus = evaluate(_perturbed(primals, p, leaf_pos, leaf + eps * v))
        minus = evaluate(_perturbed(primals, p, leaf_pos, leaf - eps * v))
        numerical = 0.0
        for k in range(len(out_leaves)):
            with np.errstate(invalid="ignore"):
                diff = (_host(plus[k]) - _host(minus[k])) / (2.0 * eps)
            numerical += float(np.sum(np.where(finite[k], diff, 0.0) * u_host[k]))
        analytical = float(np.sum(_host(analytical_grads[leaf_index]) * v_host))
        if not abs(analytical - numerical) <= atol + rtol * abs(numerical):
            raise _fail(
                op,
                input_name=flat_names[leaf_index],
                output_name=", ".join(out_names),
                index=None,
                output_index=None,
                numerical=numerical,
                analytical=analytical,
                atol=atol,
                rtol=rtol,
                fast=True,
            )
