r"""The work of one task: a (query block, key block) pair, and the merges of its partials.

Plain array code, no Dask: each function takes and returns chunks (NumPy, CuPy or any array-API
array), so that a task's arithmetic is refattn's own tiled kernel
(:mod:`refattn.ops.sdpa.tiled`) and can be tested without a cluster. The pair functions fix
glibc's mmap threshold in the process that runs them, once
(:func:`refattn._runtime.fix_malloc_thresholds`: Dask's workers otherwise map and fault every
temporary).

Notation: the whole problem has ``n_q`` queries and ``n_k`` keys; a pair is query rows
``[r_0, r_0 + b_q)`` against keys ``[c_0, c_0 + b_k)``. The causal rule "key ``j`` is visible to
query ``i`` iff ``j - i <= o``" (``o = 0`` upper-left, ``o = n_k - n_q`` lower-right) reads, in
the pair's local indices,

.. math::

    j_{loc} - i_{loc} \le \delta, \qquad \delta = o + r_0 - c_0,

which is the tiled kernel's :class:`~refattn.ops.sdpa.plan.Pattern` with ``causal = δ``. With
key lengths ``k_b`` the pair is a padded batch (:class:`~refattn.ops.sdpa.plan.Lengths`): batch
element ``b`` sees the pair's keys ``j_loc < k_b - c_0`` on its own diagonal
``δ_b = o_b + r_0 - c_0``, where ``o_b = k_b - n_q`` under "lower_right" (each sequence aligned
on its own length, as the core op's ``key_lengths``) and 0 under "upper_left"; ``δ`` is then the
largest ``δ_b`` (a pair is scheduled when any sequence sees it), and ``shifts[b] = δ - δ_b``.
A pair's partial is its own attention,
normalized over its keys only:

.. math::

    O_{rc} = \mathrm{softmax}(S_{rc})\, V_c, \qquad
    \ell_{rc} = \log \textstyle\sum_{j \in c} e^{S_{ij}},

and partials of the same rows over disjoint key sets merge exactly (the LSE combine):

.. math::

    \ell = \log\bigl(e^{\ell_1} + e^{\ell_2}\bigr), \qquad
    O = e^{\ell_1 - \ell}\, O_1 + e^{\ell_2 - \ell}\, O_2 .

Backward. With the *global* ``O_r`` and ``lse_r`` of the rows (from the forward),
``P = e^{S - lse}`` is the global softmax restricted to the pair, and
``Δ_r = rowsum(dO_r ∘ O_r)`` is the global row term, so the tiled backward run on the pair with
those residuals returns exactly the pair's terms of

.. math::

    dQ_r = \sum_c \mathrm{scale}\, dS_{rc} K_c, \qquad
    dK_c = \sum_r \mathrm{scale}\, dS_{rc}^\top Q_r, \qquad
    dV_c = \sum_r P_{rc}^\top dO_r,

which the graph sums over key blocks (``dQ``) and query blocks (``dK``, ``dV``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .._backend import namespace
from .._runtime import fix_malloc_thresholds, serial
from ..ops.sdpa import tiled
from ..ops.sdpa.plan import EMPTY, FULL, Lengths, Pattern
from ..ops.sdpa.problem import Problem, prepare

__all__ = [
    "causal_offset",
    "empty_partial",
    "merge_partials",
    "pair_backward",
    "pair_forward",
    "pair_state",
    "sum_blocks",
]

Array = Any
OP = "distributed.scaled_dot_product_attention"


def causal_offset(alignment: str, n_q: int, n_k: int) -> int:
    """The diagonal ``o`` of the causal rule ``j - i <= o``: 0 or ``n_k - n_q``."""
    return 0 if alignment == "upper_left" else n_k - n_q


def pair_state(
    delta: int | None, rows: int, cols: int, c0: int, key_lengths: Sequence[int] | None
) -> tuple[int, bool]:
    """``(state, needs_key_mask)`` of the pair whose causal offset is ``delta`` (None: not
    causal; with key lengths the loosest sequence's): state is EMPTY (never scheduled), FULL or
    PARTIAL (``plan`` constants), and the key mask is needed when some batch element's length
    ends inside the keys ``c0:c0 + cols``.
    """
    if rows == 0 or cols == 0:
        return EMPTY, False
    longest = None if key_lengths is None else max(key_lengths, default=0)
    if longest is not None and c0 >= longest:
        return EMPTY, False
    masked = key_lengths is not None and min(key_lengths) < c0 + cols
    state = FULL if delta is None else Pattern(causal=delta).tile_state(0, rows, 0, cols)
    return state, masked


def _fresh(*arrays: Array) -> list[Array]:
    """Copies of ``arrays`` in new memory: contiguous and aligned.

    A chunk that came from another worker can be a view at any byte offset of the message it
    arrived in, not even aligned to its itemsize, and a chunk of ``dask.array.from_array`` a
    strided view; NumPy computes such arrays on other loops than fresh ones, with other
    roundings. Copying (``O(b d)`` against the pair's ``O(b^2 d)``) makes a task's result
    depend on its inputs' values only, so that a re-run task, anywhere, gives the same bits.
    """
    xp = namespace(*arrays)
    return [xp.asarray(x, copy=True) for x in arrays]


def _problem(
    q: Array,
    k: Array,
    v: Array,
    *,
    delta: int | None,
    c0: int,
    key_lengths: Sequence[int] | None,
    shifts: Sequence[int] | None,
    scale: float,
    block_size: tuple[int, int] | None,
) -> Problem:
    """The pair as a tiled-kernel problem: the shifted causal rule, and with key lengths each
    sequence's local keys and diagonal (module docstring)."""
    q, k, v = _fresh(q, k, v)
    pb = prepare(q, k, v, scale=scale, implementation="tiled", block_size=block_size, op=OP)
    if key_lengths is not None and min(key_lengths) < c0 + pb.n_k:
        local = tuple(min(max(n - c0, 0), pb.n_k) for n in key_lengths)
        shifts = (0,) * len(local) if shifts is None else tuple(shifts)
        diagonals = tuple((0 if delta is None else delta) - s for s in shifts)
        pb.lengths = Lengths(
            (pb.n_q,) * len(local), local, diagonals, delta is not None, None, None
        )
        pb.pattern = Pattern(causal=delta, rows=pb.n_q, keys=max(local))
    elif delta is not None:
        state = Pattern(causal=delta).tile_state(0, pb.n_q, 0, pb.n_k)
        pb.pattern = None if state == FULL else Pattern(causal=delta)
    return pb


def pair_forward(
    q: Array,
    k: Array,
    v: Array,
    *,
    delta: int | None = None,
    c0: int = 0,
    key_lengths: Sequence[int] | None = None,
    shifts: Sequence[int] | None = None,
    scale: float,
    block_size: tuple[int, int] | None = None,
) -> tuple[Array, Array]:
    """The pair's partial ``(O_rc (..., Hq, b_q, d_v), lse_rc (..., Hq, b_q))``.

    ``q (..., Hq, b_q, d_k)``, ``k (..., Hkv, b_k, d_k)``, ``v (..., Hkv, b_k, d_v)``; ``delta``
    the local causal offset (None: not causal), ``c0`` the first key's global index (for
    ``key_lengths``, one length per batch element, flattened), ``shifts`` how far each
    sequence's diagonal sits below ``delta`` (None: all on it). Rows that see no key of the pair
    have ``O = 0`` and ``lse = -inf``.
    """
    fix_malloc_thresholds()
    pb = _problem(
        q, k, v, delta=delta, c0=c0, key_lengths=key_lengths, shifts=shifts, scale=scale,
        block_size=block_size,
    )  # fmt: skip
    with serial():
        o, _, lse, _ = tiled.forward(pb, want_weights=False)
    return pb.result(o, None, lse, return_lse=True)


def empty_partial(q: Array, d_v: int) -> tuple[Array, Array]:
    """The partial of rows that see no key at all: ``O = 0``, ``lse = -inf``."""
    xp = namespace(q)
    device = getattr(q, "device", None)
    o = xp.zeros((*q.shape[:-1], d_v), dtype=q.dtype, device=device)
    lse = xp.full(tuple(q.shape[:-1]), -xp.inf, dtype=q.dtype, device=device)
    return o, lse


def merge_partials(*partials: tuple[Array, Array]) -> tuple[Array, Array]:
    """LSE-combine partials of the same rows over disjoint keys (see the module docstring).

    Rows with ``lse = -inf`` in every partial stay ``O = 0``, ``lse = -inf``; the weights are
    taken against a finite stand-in there so that no ``-inf - (-inf)`` is formed.
    """
    if len(partials) == 1:
        return partials[0]
    partials = [tuple(_fresh(o_i, l_i)) for o_i, l_i in partials]
    o0, l0 = partials[0]
    xp = namespace(o0)
    lse = l0
    for _, l_i in partials[1:]:
        lse = xp.logaddexp(lse, l_i)
    anchor = xp.where(xp.isfinite(lse), lse, xp.zeros_like(lse))
    out = xp.zeros_like(o0)
    for o_i, l_i in partials:
        out = out + xp.exp(l_i - anchor)[..., None] * o_i
    return out, lse


def pair_backward(
    q: Array,
    k: Array,
    v: Array,
    o: Array,
    lse: Array,
    d_o: Array,
    *,
    delta: int | None = None,
    c0: int = 0,
    key_lengths: Sequence[int] | None = None,
    shifts: Sequence[int] | None = None,
    scale: float,
    block_size: tuple[int, int] | None = None,
) -> tuple[Array, Array, Array]:
    """The pair's terms ``(dQ_r, dK_c, dV_c)`` from the rows' *global* ``o`` and ``lse``.

    Shapes as in :func:`pair_forward`, with ``o``, ``d_o`` like the rows' output and ``lse``
    like their LSE. The tiled backward recomputes ``P = exp(S - lse)`` tile by tile and takes
    ``Δ = rowsum(d_o ∘ o)`` from ``o`` (module docstring).
    """
    fix_malloc_thresholds()
    pb = _problem(
        q, k, v, delta=delta, c0=c0, key_lengths=key_lengths, shifts=shifts, scale=scale,
        block_size=block_size,
    )  # fmt: skip
    xp = pb.xp
    o, lse, d_o = _fresh(o, lse, d_o)
    rows = tuple(pb.q.shape[:4])
    o_c = xp.reshape(o, (*rows, int(pb.v.shape[-1])))
    lse_c = xp.reshape(lse, rows)
    d_o_c = xp.reshape(d_o, (*rows, int(pb.v.shape[-1])))
    with serial():
        grads = tiled.tiled_backward(pb, tiled.make_plan(pb), o_c, lse_c, d_o_c)
    return pb.gradients(*grads)


def sum_blocks(*blocks: Array) -> Array:
    """The sum of same-shaped gradient terms, left to right (a fixed order: reproducible)."""
    total = blocks[0]
    for block in blocks[1:]:
        total = total + block
    return total
