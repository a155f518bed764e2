r"""Positional encodings with hand-derived backward passes.

* :func:`sinusoidal_positions` — the constant table of Vaswani et al. (no gradient), and
  :func:`add_sinusoidal_positions`, the op ``x + PE[positions]`` (``dx = dy``).
* :func:`learned_positions` — ``x + table[positions]`` with a learned table; the table's
  gradient is a scatter-add of ``dy`` over the positions. :func:`init_learned_positions` draws
  the table like ``torch.nn.Embedding`` (``N(0, 1)``).
* :func:`rope` — rotary position embedding, in the rotate-half (GPT-NeoX, HF Llama) and the
  interleaved (GPT-J, RoFormer) conventions; its backward is the inverse rotation.
* :func:`relative_position_attention` — Shaw et al. (2018): learned embeddings of the clipped
  relative distance ``j - i`` inside the scores (and, optionally, the values).

Scatter-adds. The array API has no ``add.at``, and ``x[idx] += v`` loses updates where indices
repeat. refattn scatters with a **one-hot contraction**: for indices ``idx (M,)`` into ``R``
rows, ``out = onehot(idx)^T @ values`` where ``onehot[m, r] = [idx_m == r]``. It is a GEMM on
every backend (NumPy, CuPy, array-api-strict), exact (each output entry is a plain sum of the
values that land there) and deterministic (no atomics). Its cost, ``O(R M d)``, is bounded in
memory by chunking over ``M``. Sort-based segment sums were rejected: they need a cumulative sum
and differences, which cancel catastrophically when large and small updates meet.

The derivations are written out in ``docs/positions.md``.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

from .._backend import (
    check_floating,
    default_namespace,
    describe,
    device_of,
    itemsize,
    namespace,
    real_number,
    to_host,
)
from .._op import Op
from ..ops.masks import causal_keep
from ..ops.softmax import check_broadcast, check_mask, masked_softmax_parts, normalize
from .basic import check_size, resolve_dtype
from .rope_scaling import rope_frequencies

__all__ = [
    "add_sinusoidal_positions",
    "init_learned_positions",
    "learned_positions",
    "relative_position_attention",
    "relative_position_index",
    "rope",
    "rope_angles",
    "sinusoidal_positions",
]

Array = Any

#: the one-hot block of a scatter-add is kept below this many bytes (chunked over updates)
_ONEHOT_BYTES = 16 * 2**20


# ----------------------------------------------------------------------------- helpers


def _check_base(op: str, base: Any) -> float:
    try:
        value = float(base)
    except (TypeError, ValueError):
        raise TypeError(f"refattn.{op}: base must be a real number, got {base!r}") from None
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"refattn.{op}: base must be finite and > 0, got {base!r}")
    return value


def _check_array(op: str, xp: ModuleType, name: str, x: Any, *, min_ndim: int) -> None:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"refattn.{op}: {name} must be an array, got {describe(x)}")
    check_floating(xp, f"{op}: {name}", x)
    if x.ndim < min_ndim:
        raise ValueError(
            f"refattn.{op}: {name} must have at least {min_ndim} dimension(s), got {describe(x)}"
        )


def _positions(
    op: str,
    xp: ModuleType,
    positions: Array | None,
    target: tuple[int, ...],
    device: Any,
    *,
    allow_float: bool,
) -> Array:
    """Validated positions broadcastable to ``target`` (``x.shape[:-1]``); ``arange(n)`` default.

    Integer positions are returned as they are; with ``allow_float`` real floating positions
    are accepted too (RoPE with interpolated positions).
    """
    if positions is None:
        return xp.arange(target[-1], device=device)
    if not hasattr(positions, "shape") or not hasattr(positions, "dtype"):
        raise TypeError(
            f"refattn.{op}: positions must be an integer array, got {describe(positions)}"
        )
    kinds = ("integral", "real floating") if allow_float else "integral"
    if not xp.isdtype(positions.dtype, kinds):
        wanted = "an integer or real floating" if allow_float else "an integer"
        raise TypeError(f"refattn.{op}: positions must have {wanted} dtype, got {positions.dtype}")
    check_broadcast(f"{op}: positions (broadcast against x.shape[:-1])", positions, target)
    return positions


def _as_float64(xp: ModuleType, positions: Array) -> Array:
    return xp.astype(positions, xp.float64)


def scatter_add_rows(xp: ModuleType, index: Array, values: Array, n_rows: int) -> Array:
    r"""``out[r] = sum_{m: index[m] = r} values[m]``: a portable, exact scatter-add of rows.

    ``index (M,)`` integers in ``[0, n_rows)``, ``values (M, d)`` -> ``(n_rows, d)``. Computed
    as ``onehot(index)^T @ values`` in chunks of ``M`` so the one-hot block stays below
    :data:`_ONEHOT_BYTES` (see the module docstring for why not ``add.at`` or segment sums).
    """
    m, d = int(values.shape[0]), int(values.shape[1])
    device = device_of(values)
    out = xp.zeros((n_rows, d), dtype=values.dtype, device=device)
    if m == 0 or n_rows == 0:
        return out
    rows = xp.arange(n_rows, dtype=index.dtype, device=device)
    elem_bytes = itemsize(xp, values.dtype)
    chunk = max(1, _ONEHOT_BYTES // (n_rows * elem_bytes))
    for start in range(0, m, chunk):
        stop = min(start + chunk, m)
        onehot = xp.astype(rows[:, None] == index[None, start:stop], values.dtype)
        out = out + onehot @ values[start:stop, :]
    return out


# ----------------------------------------------------------------------------- sinusoidal


def _sinusoidal_table(
    xp: ModuleType, positions: Array, d: int, base: float, dtype: Any, device: Any
) -> Array:
    """``PE (*positions.shape, d)``, computed in float64 and cast to ``dtype``."""
    channels = xp.arange(d, device=device)
    exponent = xp.astype(2 * (channels // 2), xp.float64) / float(d)
    inv_freq = 1.0 / (base**exponent)  # (d,): base^(-2i/d) for channel 2i and 2i+1
    angle = _as_float64(xp, positions)[..., None] * inv_freq
    even = (channels % 2) == 0
    return xp.astype(xp.where(even, xp.sin(angle), xp.cos(angle)), dtype)


def sinusoidal_positions(
    n: int,
    d: int,
    *,
    base: float = 10000.0,
    xp: ModuleType | None = None,
    dtype: Any = "float64",
    device: Any = None,
) -> Array:
    r"""The sinusoidal position table of Vaswani et al. (2017), shape ``(n, d)``.

    .. math::

        PE_{p,\,2i} = \sin\bigl(p / \mathrm{base}^{2i/d}\bigr),\qquad
        PE_{p,\,2i+1} = \cos\bigl(p / \mathrm{base}^{2i/d}\bigr),\qquad p = 0, \dots, n-1 .

    Channel ``c`` uses frequency index ``i = c // 2``. For **odd** ``d`` the last channel
    ``c = d - 1`` is even, so it holds ``sin(p / base^((d-1)/d))`` without its cosine partner:
    the table is the first ``d`` columns of the formula's table for ``d + 1`` channels, with the
    exponents still divided by ``d``. (The reference PyTorch recipe,
    ``pe[:, 1::2] = cos(position * div_term)``, fails with a shape error for odd ``d``.)

    A constant (no gradient). The angles are computed in float64 and the table is cast to
    ``dtype`` ("float32", "float64" or a dtype of ``xp``) on ``xp`` (NumPy by default) and
    ``device``. To add the table to activations differentiably use
    :func:`add_sinusoidal_positions`.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"refattn.sinusoidal_positions: n must be an int >= 0, got {n!r}")
    d = check_size("sinusoidal_positions", "d", d)
    base = _check_base("sinusoidal_positions", base)
    xp = default_namespace() if xp is None else xp
    dt = resolve_dtype(xp, dtype)
    return _sinusoidal_table(xp, xp.arange(n, device=device), d, base, dt, device)


def _add_sinusoidal_positions_fwd(
    x: Array, /, *, positions: Array | None = None, base: float = 10000.0
) -> tuple[Array, Any]:
    r"""``x + PE[positions]`` with the sinusoidal table of :func:`sinusoidal_positions`.

    Parameters
    ----------
    x : (..., n, d), real floating
    positions : integer or real floating array broadcastable to ``(..., n)``, optional
        Defaults to ``arange(n)`` (pass ``arange(t0, t0 + n)`` when decoding from a cache).
    base : float

    Returns
    -------
    y : (..., n, d), same dtype as ``x``.
    """
    xp = namespace(x, positions)
    _check_array("add_sinusoidal_positions", xp, "x", x, min_ndim=2)
    base = _check_base("add_sinusoidal_positions", base)
    device = device_of(x)
    pos = _positions(
        "add_sinusoidal_positions", xp, positions, tuple(x.shape[:-1]), device, allow_float=True
    )
    table = _sinusoidal_table(xp, pos, int(x.shape[-1]), base, x.dtype, device)
    return x + table, ()


def _add_sinusoidal_positions_bwd(residuals: Any, dy: Array, /) -> tuple[Array]:
    r"""VJP of ``y = x + PE``: the table is constant, so :math:`dx = dy`."""
    return (dy,)


add_sinusoidal_positions = Op(
    _add_sinusoidal_positions_fwd,
    _add_sinusoidal_positions_bwd,
    name="add_sinusoidal_positions",
    register=True,
)


# ----------------------------------------------------------------------------- learned


def init_learned_positions(
    max_len: int,
    d: int,
    *,
    seed: int = 0,
    xp: ModuleType | None = None,
    dtype: Any = "float64",
) -> Array:
    """A learned position table ``(max_len, d)`` drawn like ``torch.nn.Embedding``: ``N(0, 1)``.

    Drawn on the host with ``numpy.random.default_rng(seed)`` and moved to ``xp`` (NumPy by
    default) with ``dtype``: reproducible per seed, not torch's own numbers. (BERT and GPT-2
    rescale to ``N(0, 0.02^2)``; multiply the result if you want that.) The same function makes
    the tables of :func:`relative_position_attention`:
    ``init_learned_positions(2 * max_distance + 1, d_head)``.
    """
    import numpy as np  # host RNG for initial values only

    max_len = check_size("init_learned_positions", "max_len", max_len)
    d = check_size("init_learned_positions", "d", d)
    xp = default_namespace() if xp is None else xp
    dt = resolve_dtype(xp, dtype)
    return xp.asarray(np.random.default_rng(seed).standard_normal((max_len, d)), dtype=dt)


def _learned_positions_fwd(
    table: Array, x: Array, /, *, positions: Array | None = None
) -> tuple[Array, Any]:
    r"""Learned absolute position embedding: ``y = x + table[positions]``.

    Parameters
    ----------
    table : (max_len, d), real floating, same dtype as ``x``
        The learned embeddings, one row per position.
    x : (..., n, d)
    positions : integer array broadcastable to ``(..., n)``, values in ``[0, max_len)``
        Defaults to ``arange(n)`` (then ``n <= max_len`` is required). Positions may repeat.

    Returns
    -------
    y : (..., n, d)

    ``refattn.vjp(learned_positions, table, x)`` returns ``(dtable, dx)``. Checking that
    explicit positions lie in range reads one bit back from the device (a sync on CuPy).
    """
    xp = namespace(table, x, positions)
    op = "learned_positions"
    _check_array(op, xp, "table", table, min_ndim=2)
    _check_array(op, xp, "x", x, min_ndim=2)
    if table.ndim != 2 or table.shape[1] != x.shape[-1] or table.dtype != x.dtype:
        raise ValueError(
            f"refattn.{op}: table must have shape (max_len, d) with x's d and dtype, got table "
            f"{describe(table)} and x {describe(x)}"
        )
    max_len, n = int(table.shape[0]), int(x.shape[-2])
    device = device_of(x)
    pos = _positions(op, xp, positions, tuple(x.shape[:-1]), device, allow_float=False)
    if positions is None:
        if n > max_len:
            raise ValueError(
                f"refattn.{op}: x has n={n} positions but the table only {max_len} rows "
                f"(table {describe(table)}, x {describe(x)})"
            )
    elif pos.size and (bool(xp.any(pos < 0)) or bool(xp.any(pos >= max_len))):
        raise ValueError(
            f"refattn.{op}: positions must lie in [0, {max_len}) for a table of {max_len} rows, "
            f"got values in [{int(xp.min(pos))}, {int(xp.max(pos))}]"
        )
    rows = xp.take(table, xp.reshape(pos, (-1,)), axis=0)
    y = x + xp.reshape(rows, (*tuple(pos.shape), int(table.shape[1])))
    return y, (xp, pos if positions is not None else None, max_len, tuple(x.shape))


def _learned_positions_bwd(
    residuals: Any, dy: Array, /, *, positions: Array | None = None
) -> tuple[Array, Array]:
    r"""VJP of ``y = x + table[pos]``.

    .. math::

        dx = dy, \qquad
        d\,\mathrm{table}_r = \sum_{t\,:\,\mathrm{pos}_t = r} dy_t ,

    where ``t`` runs over every leading index ``(..., i)`` of ``x``: each row of the table
    receives the cotangents of all the tokens that read it (repeated positions accumulate).
    With the default ``positions = arange(n)`` this is the sum of ``dy`` over the leading axes
    in rows ``0..n-1`` and zero below; explicit positions go through :func:`scatter_add_rows`.
    """
    xp, pos, max_len, x_shape = residuals
    d = int(x_shape[-1])
    if pos is None:
        n = int(x_shape[-2])
        used = xp.sum(xp.reshape(dy, (-1, n, d)), axis=0)
        rest = xp.zeros((max_len - n, d), dtype=dy.dtype, device=device_of(dy))
        d_table = xp.concat([used, rest], axis=0)
    else:
        index = xp.reshape(xp.broadcast_to(pos, x_shape[:-1]), (-1,))
        d_table = scatter_add_rows(xp, index, xp.reshape(dy, (-1, d)), max_len)
    return d_table, dy


learned_positions = Op(
    _learned_positions_fwd, _learned_positions_bwd, name="learned_positions", register=True
)


# ----------------------------------------------------------------------------- RoPE


def rope_angles(
    xp: ModuleType,
    positions: Array,
    d: int,
    base: float,
    dtype: Any,
    inv_freq: list[float] | None = None,
    attention_factor: float = 1.0,
) -> tuple[Array, Array]:
    r"""``(cos, sin)`` of the rotation angles, shape ``(*positions.shape, d // 2)``.

    Pair ``i`` at position ``p`` turns by :math:`p\,\theta_i`, with
    :math:`\theta_i = \mathrm{base}^{-2i/d}` (computed in float64, cast to ``dtype``), or the
    given ``inv_freq`` (:func:`~refattn.layers.rope_scaling.rope_frequencies`); both are
    multiplied by ``attention_factor`` (YaRN's).
    """
    device = device_of(positions)
    if inv_freq is None:
        exponent = xp.arange(0, d, 2, dtype=xp.float64, device=device) / float(d)
        theta = 1.0 / (base**exponent)
    else:
        theta = xp.asarray(inv_freq, dtype=xp.float64, device=device)
    angle = _as_float64(xp, positions)[..., None] * theta
    cos, sin = xp.cos(angle), xp.sin(angle)
    if attention_factor != 1.0:
        cos, sin = cos * attention_factor, sin * attention_factor
    return xp.astype(cos, dtype), xp.astype(sin, dtype)


def _rotate(xp: ModuleType, x: Array, cos: Array, sin: Array, interleaved: bool) -> Array:
    r"""Turn each pair ``(a, b)`` of ``x`` to ``(a cos - b sin, b cos + a sin)``.

    Pairs are ``(x_i, x_{i + d/2})`` (rotate-half) or ``(x_{2i}, x_{2i+1})`` (interleaved).
    """
    d = int(x.shape[-1])
    half = d // 2
    if interleaved:
        pairs = xp.reshape(x, (*tuple(x.shape[:-1]), half, 2))
        a, b = pairs[..., 0], pairs[..., 1]
        turned = xp.stack([a * cos - b * sin, b * cos + a * sin], axis=-1)
        return xp.reshape(turned, tuple(x.shape))
    a, b = x[..., :half], x[..., half:]
    return xp.concat([a * cos - b * sin, b * cos + a * sin], axis=-1)


def _rope_fwd(
    x: Array,
    /,
    *,
    positions: Array | None = None,
    base: float = 10000.0,
    interleaved: bool = False,
    scaling: dict[str, Any] | None = None,
    rotary_dim: int | None = None,
) -> tuple[Array, Any]:
    r"""Rotary position embedding (Su et al., RoFormer).

    Each pair of channels :math:`(a, b)` of the token at position :math:`p` is rotated by the
    angle :math:`p\,\theta_i`, :math:`\theta_i = \mathrm{base}^{-2i/d}`,
    :math:`i = 0, \dots, d/2 - 1`:

    .. math::

        \begin{pmatrix} a' \\ b' \end{pmatrix} =
        \begin{pmatrix} \cos p\theta_i & -\sin p\theta_i \\
                        \sin p\theta_i & \cos p\theta_i \end{pmatrix}
        \begin{pmatrix} a \\ b \end{pmatrix} .

    * ``interleaved=False`` (rotate-half; GPT-NeoX, HF Llama): pair ``i`` is
      ``(x_i, x_{i+d/2})``, i.e. ``y = x * cos + rotate_half(x) * sin`` with
      ``rotate_half(x) = [-x_2, x_1]`` and ``cos = [cos θ, cos θ]``.
    * ``interleaved=True`` (pairwise; GPT-J, the original RoFormer, Meta's Llama code with
      complex numbers): pair ``i`` is ``(x_{2i}, x_{2i+1})``.

    The two conventions differ only by a permutation of the channels (see ``docs/positions.md``).
    Since rotations compose by adding angles, ``<rope(q, m), rope(k, n)>`` depends on the
    positions only through ``m - n``.

    Parameters
    ----------
    x : (..., n, d), real floating, ``d`` even
        Queries or keys, e.g. ``(batch, heads, n, d_head)``.
    positions : integer or real floating array broadcastable to ``(..., n)``, optional
        Defaults to ``arange(n)``. For per-batch positions with heads, pass
        ``positions[:, None, :]``.
    base : float
        ``rope_theta``.
    interleaved : bool
    scaling : dict, optional
        transformers' ``rope_parameters`` (without ``rope_theta``): ``{"rope_type": "linear" |
        "dynamic" | "yarn" | "llama3", "factor": ..., ...}``, the frequencies of
        :func:`~refattn.layers.rope_scaling.rope_frequencies`; YaRN's ``attention_factor``
        multiplies cos and sin (so the logits of rotated q and k scale by its square).
        "dynamic" reads the sequence length as ``max(positions) + 1`` unless ``seq_len`` is
        given (transformers' ``dynamic_rope_update``).
    rotary_dim : int, optional
        Partial rotary (GPT-NeoX's ``rotary_ndims``, transformers' ``partial_rotary_factor``
        times ``d``): only the first ``rotary_dim`` channels rotate, with that width's
        frequencies, in the chosen pairing; the rest pass through. Default ``d``.

    Returns
    -------
    y : (..., n, d), same dtype as ``x``. The angles are computed in float64.
    """
    xp = namespace(x, positions)
    _check_array("rope", xp, "x", x, min_ndim=2)
    d = int(x.shape[-1])
    if rotary_dim is None and d % 2:
        raise ValueError(
            f"refattn.rope: the last dimension of x must be even (channels are rotated in "
            f"pairs), got {describe(x)}"
        )
    d_rot = d if rotary_dim is None else rotary_dim
    if isinstance(d_rot, bool) or not isinstance(d_rot, int) or not 2 <= d_rot <= d or d_rot % 2:
        raise ValueError(
            f"refattn.rope: rotary_dim must be an even int in [2, {d}] (channels are rotated "
            f"in pairs), got {d_rot!r} for x {describe(x)}"
        )
    if not isinstance(interleaved, bool):
        raise TypeError(f"refattn.rope: interleaved must be a bool, got {interleaved!r}")
    base = _check_base("rope", base)
    pos = _positions("rope", xp, positions, tuple(x.shape[:-1]), device_of(x), allow_float=True)
    inv_freq, factor = None, 1.0
    if scaling is not None:
        scaling = dict(scaling)
        if scaling.get("rope_type") == "dynamic" and "seq_len" not in scaling:
            scaling["seq_len"] = int(to_host(xp.max(pos))) + 1 if pos.size else 0
        inv_freq, factor = rope_frequencies(d_rot, base=base, scaling=scaling)
    cos, sin = rope_angles(xp, pos, d_rot, base, x.dtype, inv_freq, factor)
    if d_rot == d:
        return _rotate(xp, x, cos, sin, interleaved), (xp, cos, sin, d_rot)
    turned = _rotate(xp, x[..., :d_rot], cos, sin, interleaved)
    return xp.concat([turned, x[..., d_rot:]], axis=-1), (xp, cos, sin, d_rot)


def _rope_bwd(residuals: Any, dy: Array, /, *, interleaved: bool = False) -> tuple[Array]:
    r"""VJP of RoPE: the transpose of a rotation is the inverse rotation.

    ``y = R x`` with ``R`` block-diagonal (one 2x2 rotation per pair), so ``dx = R^T dy``, and

    .. math::

        R(\phi)^\top = \begin{pmatrix} \cos\phi & \sin\phi \\ -\sin\phi & \cos\phi \end{pmatrix}
        = R(-\phi)
        \quad\Rightarrow\quad
        da = db'\sin\phi + da'\cos\phi,\quad db = db'\cos\phi - da'\sin\phi,

    i.e. the forward rotation with ``sin`` negated, on the same channel pairs (scaled by the
    same attention factor). Channels past ``rotary_dim`` pass through: ``dx = dy`` there.
    """
    xp, cos, sin, d_rot = residuals
    if d_rot == int(dy.shape[-1]):
        return (_rotate(xp, dy, cos, -sin, interleaved),)
    turned = _rotate(xp, dy[..., :d_rot], cos, -sin, interleaved)
    return (xp.concat([turned, dy[..., d_rot:]], axis=-1),)


rope = Op(_rope_fwd, _rope_bwd, name="rope", register=True)


# ----------------------------------------------------------------------------- Shaw et al.


def relative_position_index(
    n_q: int, n_k: int, max_distance: int, *, xp: ModuleType | None = None, device: Any = None
) -> Array:
    """``(n_q, n_k)`` integer table row: ``clip(j - i, -K, K) + K`` with ``K = max_distance``.

    Row ``r`` of a relative table holds the embedding of distance ``r - K``; distances beyond
    ``K`` either way share the end rows.
    """
    xp = default_namespace() if xp is None else xp
    rows = xp.arange(n_q, device=device)
    cols = xp.arange(n_k, device=device)
    return xp.clip(cols[None, :] - rows[:, None], -max_distance, max_distance) + max_distance


def _check_max_distance(max_distance: Any) -> int:
    if isinstance(max_distance, bool) or not isinstance(max_distance, int) or max_distance < 0:
        raise ValueError(
            "refattn.relative_position_attention: max_distance must be an int >= 0, "
            f"got {max_distance!r}"
        )
    return max_distance


def _check_scale(scale: Any, d_k: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(d_k)
    return real_number("relative_position_attention", "scale", scale)


def _swap01(xp: ModuleType, x: Array) -> Array:
    """``(a, b, c) -> (b, a, c)``: puts the query axis first for per-query batched GEMMs."""
    return xp.permute_dims(x, (1, 0, 2))


def _per_query(xp: ModuleType, x: Array, e: Array) -> Array:
    r"""``out[b, i, :] = x[b, i, :] @ e[i]`` for ``x (B, n_q, a)`` and ``e (n_q, a, c)``."""
    return _swap01(xp, _swap01(xp, x) @ e)


def _relative_attention_fwd(
    q: Array,
    k: Array,
    v: Array,
    rel_k: Array,
    rel_v: Array | None = None,
    /,
    *,
    max_distance: int,
    mask: Array | None = None,
    is_causal: bool = False,
    scale: float | None = None,
) -> tuple[Array, Any]:
    r"""Self-attention with relative position representations (Shaw, Uszkoreit, Vaswani 2018).

    With :math:`r(i, j) = \mathrm{clip}(j - i, -K, K) + K` the row of the relative tables,
    :math:`a^K_{ij} = \mathrm{rel\_k}[r(i,j)]` and :math:`a^V_{ij} = \mathrm{rel\_v}[r(i,j)]`:

    .. math::

        S_{ij} = \mathrm{scale}\cdot q_i \cdot (k_j + a^K_{ij}),\qquad
        P = \mathrm{softmax}_{\mathrm{kept}}(S),\qquad
        o_i = \textstyle\sum_j P_{ij}\,(v_j + a^V_{ij}) .

    Parameters
    ----------
    q : (..., n_q, d_k)
        E.g. ``(batch, heads, n_q, d_k)``; the leading axes of q, k and v must be equal.
    k : (..., n_k, d_k)
    v : (..., n_k, d_v)
    rel_k : (2 * max_distance + 1, d_k)
        Learned key embeddings of the relative distances ``-K..K`` (row ``r`` is distance
        ``r - K``), shared by every batch entry and head, as in the paper.
    rel_v : (2 * max_distance + 1, d_v), optional
        Learned value embeddings. Omit it (do not pass None positionally) for keys-only relative
        attention; ``refattn.vjp`` then returns four gradients.
    max_distance : int >= 0
        ``K``: distances beyond it are clipped.
    mask : bool, broadcastable to (..., n_q, n_k), True = attend
    is_causal : bool
        Also mask keys ``j > i``. Positions are ``i = 0..n_q-1`` and ``j = 0..n_k-1``.
    scale : float, optional
        Defaults to ``1 / sqrt(d_k)``.

    Returns
    -------
    out : (..., n_q, d_v). A fully masked query row gives 0 (the ``refattn.softmax`` rule),
    with zero gradients.

    ``refattn.vjp(relative_position_attention, q, k, v, rel_k, rel_v, max_distance=K)`` returns
    ``(dq, dk, dv, drel_k, drel_v)``.

    Implementation: the clipped-distance lookups are contractions with the one-hot tensor
    ``E[i, r, j] = [r(i, j) = r]`` of shape ``(n_q, 2K+1, n_k)``, shared across the batch:
    ``q_i . a^K_ij = sum_r (q rel_k^T)[i, r] E[i, r, j]``, a batched GEMM with the query axis as
    the batch. Memory is ``O(n_q n_k (2K+1))`` for ``E`` plus the usual ``O(B n_q n_k)`` scores.
    """
    xp = namespace(q, k, v, rel_k, rel_v, mask)
    op = "relative_position_attention"
    for name, arr in (("q", q), ("k", k), ("v", v)):
        _check_array(op, xp, name, arr, min_ndim=2)
    tables = {"rel_k": rel_k} if rel_v is None else {"rel_k": rel_k, "rel_v": rel_v}
    for name, arr in tables.items():
        _check_array(op, xp, name, arr, min_ndim=2)
    dtypes = {name: arr.dtype for name, arr in (("q", q), ("k", k), ("v", v), *tables.items())}
    if len(set(dtypes.values())) > 1:
        seen = ", ".join(f"{n}: {d}" for n, d in dtypes.items())
        raise TypeError(f"refattn.{op}: inputs must share one floating dtype, got {seen}")
    lead = tuple(q.shape[:-2])
    if (
        q.ndim != k.ndim
        or q.ndim != v.ndim
        or tuple(k.shape[:-2]) != lead
        or (tuple(v.shape[:-2]) != lead)
    ):
        raise ValueError(
            f"refattn.{op}: q, k and v must share their leading axes (..., n, d), got "
            f"q {describe(q)}, k {describe(k)}, v {describe(v)}"
        )
    n_q, d_k = int(q.shape[-2]), int(q.shape[-1])
    n_k, d_v = int(k.shape[-2]), int(v.shape[-1])
    if k.shape[-1] != d_k or v.shape[-2] != n_k:
        raise ValueError(
            f"refattn.{op}: expected q (..., n_q, d_k), k (..., n_k, d_k), v (..., n_k, d_v); "
            f"got q {describe(q)}, k {describe(k)}, v {describe(v)}"
        )
    kmax = _check_max_distance(max_distance)
    n_rel = 2 * kmax + 1
    for name, arr, width in (("rel_k", rel_k, d_k), ("rel_v", rel_v, d_v)):
        if arr is not None and tuple(arr.shape) != (n_rel, width):
            raise ValueError(
                f"refattn.{op}: {name} must have shape (2 * max_distance + 1, "
                f"{'d_k' if name == 'rel_k' else 'd_v'}) = ({n_rel}, {width}) for "
                f"max_distance={kmax}, got {describe(arr)}"
            )
    if not isinstance(is_causal, bool):
        raise TypeError(f"refattn.{op}: is_causal must be a bool, got {is_causal!r}")
    if mask is not None:
        check_mask(xp, f"{op}: mask", mask, (*lead, n_q, n_k))
    scale = _check_scale(scale, d_k)

    device = device_of(q)
    b = math.prod(lead)
    qf = xp.reshape(q, (b, n_q, d_k))
    kf = xp.reshape(k, (b, n_k, d_k))
    vf = xp.reshape(v, (b, n_k, d_v))
    keep = None
    if mask is not None:
        keep = xp.reshape(xp.broadcast_to(mask, (*lead, n_q, n_k)), (b, n_q, n_k))
    if is_causal:
        causal = causal_keep(xp, n_q, n_k, "upper_left", device)  # key j visible iff j <= i
        keep = causal[None, ...] if keep is None else xp.logical_and(keep, causal)
    index = relative_position_index(n_q, n_k, kmax, xp=xp, device=device)
    rel_rows = xp.arange(n_rel, dtype=index.dtype, device=device)
    onehot = xp.astype(index[:, None, :] == rel_rows[None, :, None], q.dtype)  # (n_q, R, n_k)

    scores = qf @ xp.matrix_transpose(kf) + _per_query(xp, qf @ xp.matrix_transpose(rel_k), onehot)
    e, total, _ = masked_softmax_parts(scores * scale, axis=-1, keep=keep, xp=xp)
    p = normalize(e, total, xp=xp)
    out = p @ vf
    w = None
    if rel_v is not None:
        w = _per_query(xp, p, xp.matrix_transpose(onehot))  # (b, n_q, R): weight per distance
        out = out + w @ rel_v
    shapes = (tuple(q.shape), tuple(k.shape), tuple(v.shape))
    residuals = (xp, qf, kf, vf, rel_k, rel_v, onehot, p, w, scale, shapes)
    return xp.reshape(out, (*lead, n_q, d_v)), residuals


def _relative_attention_bwd(residuals: Any, d_out: Array, /) -> tuple[Array, ...]:
    r"""VJP of Shaw et al.'s relative attention, per flattened batch entry.

    With :math:`E_{irj} = [r(i,j) = r]`, :math:`W = P \star E^\top` (the weight each query puts on
    each distance) and :math:`s = \mathrm{scale}`:

    .. math::

        O &= P V + W A^V, \qquad S = s\,(Q K^\top + (Q A^{K\top}) \star E), \\
        dV &= P^\top dO, \qquad dA^V = \textstyle\sum_b W^\top dO, \qquad
        dW = dO\,A^{V\top}, \\
        dP &= dO\,V^\top + dW \star E, \qquad
        dS = P \circ \bigl(dP - \mathrm{rowsum}(P \circ dP)\bigr), \\
        dQ &= s\,(dS\,K + (dS \star E^\top)\,A^K), \qquad dK = s\,dS^\top Q, \qquad
        dA^K = s \textstyle\sum_b (dS \star E^\top)^\top Q,

    where ``X ⋆ E`` contracts per query row (:math:`(X \star E)_{bij} = \sum_r X_{bir}
    E_{irj}`, and :math:`E^\top` the other way). The products with ``E`` are the scatter-adds
    over clipped distances: :math:`dA^K_r = s \sum_{b,i,j:\,r(i,j)=r} dS_{bij}\, q_{bi}` and
    :math:`dA^V_r = \sum_{b,i,j:\,r(i,j)=r} P_{bij}\, dO_{bi}`. Masked entries have ``P = 0``
    and so ``dS = 0``; a fully masked row contributes nothing.
    """
    xp, qf, kf, vf, rel_k, rel_v, onehot, p, w, scale, shapes = residuals
    q_shape, k_shape, v_shape = shapes
    b, n_q, _ = qf.shape
    d_o = xp.reshape(d_out, (b, n_q, -1))
    d_v = xp.matrix_transpose(p) @ d_o
    d_p = d_o @ xp.matrix_transpose(vf)
    grads_tail: tuple[Array, ...] = ()
    if rel_v is not None:
        d_w = d_o @ xp.matrix_transpose(rel_v)
        d_p = d_p + _per_query(xp, d_w, onehot)
        d_rel_v = xp.matrix_transpose(xp.reshape(w, (b * n_q, -1))) @ xp.reshape(d_o, (b * n_q, -1))
        grads_tail = (d_rel_v,)
    d_s = p * (d_p - xp.sum(p * d_p, axis=-1, keepdims=True)) * scale
    d_qa = _per_query(xp, d_s, xp.matrix_transpose(onehot))  # (b, n_q, R)
    d_q = d_s @ kf + d_qa @ rel_k
    d_k = xp.matrix_transpose(d_s) @ qf
    d_rel_k = xp.matrix_transpose(xp.reshape(d_qa, (b * n_q, -1))) @ xp.reshape(qf, (b * n_q, -1))
    return (
        xp.reshape(d_q, q_shape),
        xp.reshape(d_k, k_shape),
        xp.reshape(d_v, v_shape),
        d_rel_k,
        *grads_tail,
    )


relative_position_attention = Op(
    _relative_attention_fwd,
    _relative_attention_bwd,
    name="relative_position_attention",
    register=True,
)
