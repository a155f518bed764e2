r"""Linear attention (Katharopoulos et al., 2020): a kernel feature map instead of the softmax.

.. math::

    O_i = \frac{\phi(q_i)^\top S_i}{\phi(q_i)^\top z_i + \varepsilon},\qquad
    S_i = \sum_{j \in J(i)} \phi(k_j)\, v_j^\top \in \mathbb{R}^{d_k \times d_v},\qquad
    z_i = \sum_{j \in J(i)} \phi(k_j) \in \mathbb{R}^{d_k},

with ``J(i)`` all keys, or ``j <= i`` when causal, and :math:`\phi(x) = \mathrm{elu}(x) + 1`
(``x + 1`` for ``x > 0``, ``e^x`` otherwise), which is positive so that the denominator is too.
``eps`` is added to the denominator :math:`\phi(q_i)^\top z_i` (as in the paper's reference
code): it only matters when that sum is tiny.

Non-causal: ``S`` and ``z`` are one sum, ``O(n d_k d_v)``. Causal: ``S_i, z_i`` are prefix sums.
Keeping every ``S_i`` would cost ``n d_k d_v`` numbers (512 MiB at n = 16384, d = 64 in
float64), so the sequence is cut in chunks of ``C`` positions: chunk ``c`` sees the prefix state
of the chunks before it (an *exclusive cumulative sum* of per-chunk states, ``n d_k d_v / C``
numbers) plus its own causal part as a small masked ``C x C`` product:

.. math::

    O_I = \frac{(\Phi_I K_I^\top \circ L) V_I + \Phi_I S_{<c}}
               {(\Phi_I K_I^\top \circ L) \mathbf 1 + \Phi_I z_{<c} + \varepsilon},

``L`` the lower-triangular ones. Time ``O(n C d + n d^2)``, all in batched GEMMs (no Python
loop over positions or chunks).

Chunks are processed in *groups* (about :data:`_GROUP_BYTES` of ``C x C`` blocks each), in two
passes that are both parallel over the groups: pass 1 sums each group's ``phi(K)^T V`` and
``phi(K)^T 1``, whose exclusive prefix sums are the states the groups start from; pass 2 runs
each group on its own. A group's working set stays in cache, so the time grows linearly in
``n``, and the memory beyond inputs and outputs is ``O(group x C)`` per thread plus one
``d_k x d_v`` state per group. The backward does the same with *suffix* sums.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from array_api_compat import is_numpy_namespace

from .._backend import device_of, namespace, real_number
from .._op import Op
from .._runtime import n_threads, parallel_map
from .sdpa.problem import prepare

__all__ = ["FEATURE_MAPS", "linear_attention"]

Array = Any

FEATURE_MAPS = ("elu+1", "identity")
_OP = "linear_attention"
#: positions per chunk of the causal form
_CHUNK = 64
#: causal form: chunks are processed in groups whose C x C blocks take about this many bytes
_GROUP_BYTES = 2**18
#: and at most this many chunks
_MAX_GROUP_CHUNKS = 64


def _phi(xp: Any, x: Array, feature_map: str) -> tuple[Array, Array]:
    """``(phi(x), phi'(x))``.

    ``elu+1``: with ``e = exp(min(x, 0))`` (never overflows), ``phi = e + max(x, 0)`` is
    ``x + 1`` for ``x > 0`` and ``e^x`` otherwise, and ``phi' = e`` is ``1`` and ``e^x``.
    """
    if feature_map == "identity":
        return x, xp.ones_like(x)
    zero = xp.zeros_like(x)
    e = xp.exp(xp.minimum(x, zero))
    return e + xp.maximum(x, zero), e


def _pad_chunks(xp: Any, x: Array, n_pad: int, chunk: int) -> Array:
    """``(..., n, d) -> (..., n_c, C, d)``, zero-padded at the end."""
    if n_pad:
        shape = (*x.shape[:-2], n_pad, x.shape[-1])
        x = xp.concat([x, xp.zeros(shape, dtype=x.dtype, device=device_of(x))], axis=-2)
    return xp.reshape(x, (*x.shape[:-2], x.shape[-2] // chunk, chunk, x.shape[-1]))


def _exclusive_prefix(xp: Any, x: Array, reverse: bool = False) -> Array:
    """``y_c = sum_{c' < c} x_c'`` (``c' > c`` when ``reverse``) over the chunk axis ``-3``.

    ``x`` is ``(..., n_c, a, b)``. The sums are one GEMM with the strictly lower (upper)
    triangular ones, ``(n_c, n_c) @ (n_c, a b)``: a group has at most
    :data:`_MAX_GROUP_CHUNKS` chunks, and a cumulative sum along a strided axis is slower.
    """
    *lead, n_c, a, b = x.shape
    i = xp.arange(n_c, device=device_of(x))
    before = i[None, :] > i[:, None] if reverse else i[None, :] < i[:, None]
    y = xp.astype(before, x.dtype) @ xp.reshape(x, (*lead, n_c, a * b))
    return xp.reshape(y, tuple(x.shape))


def _linear_attention_fwd(
    q: Array,
    k: Array,
    v: Array,
    /,
    *,
    feature_map: str = "elu+1",
    is_causal: bool = False,
    eps: float = 1e-6,
    chunk_size: int | None = None,
) -> tuple[Array, Any]:
    r"""Linear attention, :math:`O_i = \phi(q_i)^\top S_i / (\phi(q_i)^\top z_i + \varepsilon)`.

    Parameters
    ----------
    q : (..., Hq, n_q, d_k)
        Queries; ``(n_q, d_k)`` works too.
    k : (..., Hkv, n_k, d_k)
    v : (..., Hkv, n_k, d_v)
        ``Hq`` a multiple of ``Hkv`` (query head ``h`` uses kv head ``h // (Hq // Hkv)``).
    feature_map : {"elu+1", "identity"}
        :math:`\phi`. "identity" (:math:`\phi(x) = x`) gives plain unnormalised-kernel linear
        attention; its denominator can be 0 or negative, so prefer "elu+1".
    is_causal : bool
        Prefix sums over ``j <= i`` (needs ``n_q == n_k``), in ``O(n d^2)``.
    eps : float >= 0
        Added to the denominator :math:`\phi(q_i)^\top z_i`.
    chunk_size : int, optional
        Positions per chunk of the causal form (default 64); results do not depend on it.

    Returns
    -------
    out : (..., Hq, n_q, d_v)
    """
    if feature_map not in FEATURE_MAPS:
        raise ValueError(
            f"refattn.{_OP}: feature_map must be one of {', '.join(map(repr, FEATURE_MAPS))}, "
            f"got {feature_map!r}"
        )
    if not isinstance(is_causal, bool):
        raise TypeError(f"refattn.{_OP}: is_causal must be a bool, got {is_causal!r}")
    eps = real_number(_OP, "eps", eps)
    if not eps >= 0.0:
        raise ValueError(f"refattn.{_OP}: eps must be finite and >= 0, got {eps!r}")
    if chunk_size is None:
        chunk_size = _CHUNK
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"refattn.{_OP}: chunk_size must be a positive int, got {chunk_size!r}")
    pb = prepare(q, k, v, op=_OP)
    if is_causal and pb.n_q != pb.n_k:
        raise ValueError(
            f"refattn.{_OP}: is_causal=True needs as many queries as keys (axis -2), got "
            f"q {tuple(q.shape)} and k {tuple(k.shape)}"
        )
    xp = pb.xp
    # (B, Hkv, 1, n, d): broadcasts over the GQA group axis. A reshape, not ``[:, :, None]``:
    # NumPy's matmul leaves BLAS for a slow loop on the zero stride such an axis gets.
    k5 = xp.reshape(pb.k, (*pb.k.shape[:2], 1, *pb.k.shape[2:]))
    v5 = xp.reshape(pb.v, (*pb.v.shape[:2], 1, *pb.v.shape[2:]))
    if is_causal:
        out, saved = _causal_forward(xp, pb.q, k5, v5, feature_map, eps, chunk_size)
    else:
        out, saved = _global_forward(xp, pb.q, k5, v5, feature_map, eps)
    return xp.reshape(out, pb.out_shape), (pb, out, saved)


def _global_forward(
    xp: Any, q: Array, k: Array, v: Array, feature_map: str, eps: float
) -> tuple[Array, Any]:
    qf, dqf = _phi(xp, q, feature_map)  # (B, Hkv, g, n_q, d_k)
    kf, dkf = _phi(xp, k, feature_map)  # (B, Hkv, 1, n_k, d_k)
    s = xp.matrix_transpose(kf) @ v  # (B, Hkv, 1, d_k, d_v)
    z = xp.sum(kf, axis=-2)[..., None]  # (B, Hkv, 1, d_k, 1)
    den = qf @ z + eps  # (B, Hkv, g, n_q, 1)
    return (qf @ s) / den, (qf, dqf, kf, dkf, v, s, z, den)


@dataclass
class _CausalState:
    """Saved by the causal forward: the groups, each group's incoming prefix state, ``den``."""

    qf: list[Array]  # per group: phi(q), phi'(q) (B, Hkv, g, n_group, d_k)
    dqf: list[Array]
    kf: list[Array]  # per group: phi(k), phi'(k) (B, Hkv, 1, n_group, d_k)
    dkf: list[Array]
    v: Array  # (B, Hkv, 1, n, d_v)
    chunk: int
    groups: list[tuple[int, int]]
    s0: list[Array]  # per group: sum_{j < g0} phi(k_j) v_j^T, (B, Hkv, 1, d_k, d_v)
    z0: list[Array]  # per group: sum_{j < g0} phi(k_j), (B, Hkv, 1, d_k, 1)
    den: Array  # (B, Hkv, g, n, 1)


def _make_groups(n: int, chunk: int, qf: Array) -> list[tuple[int, int]]:
    """Runs of whole chunks whose ``C x C`` blocks take at most :data:`_GROUP_BYTES`.

    On NumPy there are also at least two groups per thread when the chunks allow it, so that
    the groups (not a multi-threaded BLAS on small matrices) use the cores.
    """
    heads = math.prod(int(s) for s in qf.shape[:3])
    itemsize = 4 if qf.dtype == _float32(qf) else 8
    chunks = max(
        1, min(_MAX_GROUP_CHUNKS, _GROUP_BYTES // max(1, heads * chunk * chunk * itemsize))
    )
    if is_numpy_namespace(namespace(qf)):
        chunks = min(chunks, max(1, math.ceil(n / chunk / (2 * n_threads()))))
    size = chunks * chunk
    return [(g0, min(g0 + size, n)) for g0 in range(0, n, size)]


def _float32(x: Array) -> Any:
    return namespace(x).float32


def _positions(x: Array, g0: int, g1: int) -> Array:
    return x[..., g0:g1, :]


def _prefix(xp: Any, parts: list[Array], reverse: bool = False) -> list[Array]:
    """Exclusive running sums of a list of arrays (from the end when ``reverse``)."""
    order = range(len(parts) - 1, -1, -1) if reverse else range(len(parts))
    out: list[Array] = [None] * len(parts)
    total = xp.zeros_like(parts[0]) if parts else None
    for i in order:
        out[i] = total
        total = total + parts[i]
    return out


def _causal_forward(
    xp: Any, q: Array, k: Array, v: Array, feature_map: str, eps: float, chunk_size: int
) -> tuple[Array, _CausalState]:
    """Two passes over groups of chunks, each parallel over the groups.

    Pass 1 sums every group's ``phi(K)^T V`` and ``phi(K)^T 1``; their exclusive prefix sums are
    the state each group starts from. Pass 2 runs every group on its own. All the elementwise
    work (``phi``, the division) happens inside a group, on data that is in cache.
    """
    n = int(q.shape[-2])
    chunk = min(chunk_size, max(n, 1))
    groups = _make_groups(n, chunk, q)

    def sums(group: tuple[int, int]) -> tuple[Array, Array, Array, Array]:
        kf, dkf = _phi(xp, _positions(k, *group), feature_map)
        kv = xp.matrix_transpose(kf) @ _positions(v, *group)
        return kf, dkf, kv, xp.sum(kf, axis=-2)[..., None]

    parts = parallel_map(xp, sums, groups)
    kf = [p[0] for p in parts]
    dkf = [p[1] for p in parts]
    s0 = _prefix(xp, [p[2] for p in parts])
    z0 = _prefix(xp, [p[3] for p in parts])
    tril = _tril(xp, chunk, q)

    # each group writes its rows of the outputs in place (no concatenation pass)
    out = xp.zeros((*q.shape[:-1], int(v.shape[-1])), dtype=q.dtype, device=device_of(q))
    den = xp.ones_like(out[..., :1])

    def run(i: int) -> tuple[Array, Array]:
        g0, g1 = groups[i]
        qf, dqf = _phi(xp, _positions(q, g0, g1), feature_map)
        vc = _positions(v, g0, g1)
        out_g, den_g = _group_forward(xp, qf, kf[i], vc, s0[i], z0[i], eps, chunk, tril)
        out[..., g0:g1, :] = out_g
        den[..., g0:g1, :] = den_g
        return qf, dqf

    results = parallel_map(xp, run, range(len(groups)))
    qf = [r[0] for r in results]
    dqf = [r[1] for r in results]
    return out, _CausalState(qf, dqf, kf, dkf, v, chunk, groups, s0, z0, den)


def _chunks(xp: Any, x: Array, chunk: int) -> Array:
    return _pad_chunks(xp, x, -int(x.shape[-2]) % chunk, chunk)


def _unchunk(xp: Any, x: Array, n: int) -> Array:
    """``(..., n_c, C, d) -> (..., n, d)`` (drops the padding)."""
    return xp.reshape(x, (*x.shape[:-3], -1, x.shape[-1]))[..., :n, :]


def _group_states(xp: Any, kc: Array, vc: Array, s0: Array, z0: Array) -> tuple[Array, Array]:
    """State before each chunk of a group: ``S_{<c}``, ``z_{<c}`` (chunk axis -3)."""
    s_prev = _exclusive_prefix(xp, xp.matrix_transpose(kc) @ vc) + s0[..., None, :, :]
    z_prev = _exclusive_prefix(xp, xp.sum(kc, axis=-2)[..., None]) + z0[..., None, :, :]
    return s_prev, z_prev


def _group_forward(
    xp: Any,
    qf: Array,
    kf: Array,
    v: Array,
    s0: Array,
    z0: Array,
    eps: float,
    chunk: int,
    tril: Array,
) -> tuple[Array, Array]:
    """One group: ``(out, den)`` of its positions, from the state ``s0, z0`` before it."""
    n = int(qf.shape[-2])
    qc, kc, vc = _chunks(xp, qf, chunk), _chunks(xp, kf, chunk), _chunks(xp, v, chunk)
    a = (qc @ xp.matrix_transpose(kc)) * tril  # (B, Hkv, g, n_c, C, C)
    s_prev, z_prev = _group_states(xp, kc, vc, s0, z0)
    den = xp.sum(a, axis=-1, keepdims=True) + qc @ z_prev + eps  # (..., n_c, C, 1)
    out = (a @ vc + qc @ s_prev) / den
    return _unchunk(xp, out, n), _unchunk(xp, den, n)


def _tril(xp: Any, chunk: int, like: Array) -> Array:
    i = xp.arange(chunk, device=device_of(like))
    return xp.astype(i[None, :] <= i[:, None], like.dtype)


def _linear_attention_bwd(
    residuals: Any,
    d_out: Array,
    /,
    *,
    is_causal: bool = False,
) -> tuple[Array, Array, Array]:
    r"""VJP of linear attention.

    With :math:`\mathrm{num}_i = \phi(q_i)^\top S_i`, :math:`\mathrm{den}_i = \phi(q_i)^\top
    z_i + \varepsilon` and :math:`O_i = \mathrm{num}_i / \mathrm{den}_i`:

    .. math::

        d\mathrm{num}_i = dO_i / \mathrm{den}_i, \qquad
        d\mathrm{den}_i = -\,dO_i \cdot O_i / \mathrm{den}_i, \\
        d\phi(q_i) = S_i\, d\mathrm{num}_i + d\mathrm{den}_i\, z_i, \qquad
        G_j = \sum_{i : j \in J(i)} \phi(q_i)\, d\mathrm{num}_i^\top, \qquad
        g_j = \sum_{i : j \in J(i)} d\mathrm{den}_i\, \phi(q_i), \\
        d\phi(k_j) = G_j v_j + g_j, \qquad dv_j = G_j^\top \phi(k_j), \qquad
        dq = d\phi(q) \circ \phi'(q), \quad dk = d\phi(k) \circ \phi'(k).

    Non-causal, ``G`` and ``g`` are one sum over all queries. Causal, they are *suffix* sums
    over ``i >= j``: per chunk, the queries of later chunks enter through a reverse exclusive
    cumulative sum of per-chunk ``Phi_I^T dnum_I``, and the chunk's own queries through the
    masked ``C x C`` matrix ``dA = (dnum V^T + dden 1^T) o L``:
    ``dPhi_Q += dA K``, ``dPhi_K += dA^T Phi_Q``, ``dV += A^T dnum``. GQA groups (axis ``g``)
    share ``k, v``, so their gradients are summed over the group.
    """
    pb, out, saved = residuals
    xp = pb.xp
    d_o = xp.reshape(d_out, tuple(out.shape))
    if is_causal:
        d_q, d_k, d_v = _causal_backward(xp, out, d_o, saved)
    else:
        d_q, d_k, d_v = _global_backward(xp, out, d_o, saved)
    # d_k, d_v: (B, Hkv, 1, n_k, ·), the GQA group's sum already taken
    return pb.gradients(d_q, d_k, d_v)


def _global_backward(xp: Any, out: Array, d_o: Array, saved: Any) -> tuple[Array, Array, Array]:
    qf, dqf, kf, dkf, v, s, z, den = saved
    d_num = d_o / den
    d_den = -xp.sum(d_o * out, axis=-1, keepdims=True) / den  # (B, Hkv, g, n, 1)
    d_qf = d_num @ xp.matrix_transpose(s) + d_den @ xp.matrix_transpose(z)
    big_g = xp.sum(xp.matrix_transpose(qf) @ d_num, axis=2, keepdims=True)  # (.., 1, d_k, d_v)
    small_g = xp.sum(xp.matrix_transpose(qf) @ d_den, axis=2, keepdims=True)  # (.., 1, d_k, 1)
    d_kf = v @ xp.matrix_transpose(big_g) + xp.matrix_transpose(small_g)
    d_v = kf @ big_g
    return d_qf * dqf, d_kf * dkf, d_v


def _causal_backward(
    xp: Any, out: Array, d_o: Array, state: _CausalState
) -> tuple[Array, Array, Array]:
    """Two passes over the forward's groups, like the forward, with suffix sums instead."""
    groups, v = state.groups, state.v
    dev = device_of(d_o)
    if not groups:
        d_q = xp.zeros((*d_o.shape[:-1], 0), dtype=d_o.dtype, device=device_of(d_o))
        return d_q, xp.zeros_like(d_q[:, :, :1, ...]), xp.zeros_like(v)

    def cotangents(g0: int, g1: int) -> tuple[Array, Array]:
        """``dnum = dO / den`` and ``dden = -(dO . O) / den`` of positions ``g0:g1``."""
        den = _positions(state.den, g0, g1)
        d_o_g = _positions(d_o, g0, g1)
        d_den = -xp.sum(d_o_g * _positions(out, g0, g1), axis=-1, keepdims=True) / den
        return d_o_g / den, d_den

    def sums(i: int) -> tuple[Array, Array, Array, Array]:
        d_num, d_den = cotangents(*groups[i])
        q_t = xp.matrix_transpose(state.qf[i])
        big = xp.sum(q_t @ d_num, axis=2, keepdims=True)
        small = xp.sum(q_t @ d_den, axis=2, keepdims=True)
        return d_num, d_den, big, small

    parts = parallel_map(xp, sums, range(len(groups)))
    big_after = _prefix(xp, [p[2] for p in parts], reverse=True)
    small_after = _prefix(xp, [p[3] for p in parts], reverse=True)
    tril = _tril(xp, state.chunk, d_o)

    d_q = xp.zeros((*d_o.shape[:-1], int(state.qf[0].shape[-1])), dtype=d_o.dtype, device=dev)
    d_k = xp.zeros((*v.shape[:-1], int(state.kf[0].shape[-1])), dtype=d_o.dtype, device=dev)
    d_v = xp.zeros_like(v)

    def run(i: int) -> None:
        g0, g1 = groups[i]
        d_qf, d_kf, d_v_g = _group_backward(
            xp,
            state.qf[i],
            state.kf[i],
            _positions(v, g0, g1),
            parts[i][0],
            parts[i][1],
            state.s0[i],
            state.z0[i],
            big_after[i],
            small_after[i],
            state.chunk,
            tril,
        )
        d_q[..., g0:g1, :] = d_qf * state.dqf[i]
        d_k[..., g0:g1, :] = d_kf * state.dkf[i]
        d_v[..., g0:g1, :] = d_v_g

    parallel_map(xp, run, range(len(groups)))
    return d_q, d_k, d_v


def _group_backward(
    xp: Any,
    qf: Array,
    kf: Array,
    v: Array,
    d_num: Array,
    d_den: Array,
    s0: Array,
    z0: Array,
    big_after: Array,
    small_after: Array,
    chunk: int,
    tril: Array,
) -> tuple[Array, Array, Array]:
    """One group: ``(dphi(q), dphi(k), dv)`` of its positions (the last two summed over g).

    ``big_after, small_after`` are the sums of ``phi(q_i) dnum_i^T`` and ``dden_i phi(q_i)``
    over the queries of the later groups.
    """
    n = int(qf.shape[-2])
    qc, kc, vc = _chunks(xp, qf, chunk), _chunks(xp, kf, chunk), _chunks(xp, v, chunk)
    d_num_c, d_den_c = _chunks(xp, d_num, chunk), _chunks(xp, d_den, chunk)
    a = (qc @ xp.matrix_transpose(kc)) * tril
    s_prev, z_prev = _group_states(xp, kc, vc, s0, z0)
    # the chunk's own (masked) part
    d_a = (d_num_c @ xp.matrix_transpose(vc) + d_den_c) * tril  # (..., n_c, C, C)
    d_qc = d_a @ kc + d_num_c @ xp.matrix_transpose(s_prev) + d_den_c @ xp.matrix_transpose(z_prev)
    d_kc = xp.sum(xp.matrix_transpose(d_a) @ qc, axis=2, keepdims=True)  # sum over the group
    d_vc = xp.sum(xp.matrix_transpose(a) @ d_num_c, axis=2, keepdims=True)
    # the later chunks of this group, then the later groups
    q_t = xp.matrix_transpose(qc)
    big = xp.sum(q_t @ d_num_c, axis=2, keepdims=True)  # (B, Hkv, 1, n_c, d_k, d_v)
    small = xp.sum(q_t @ d_den_c, axis=2, keepdims=True)  # (B, Hkv, 1, n_c, d_k, 1)
    big = _exclusive_prefix(xp, big, reverse=True) + big_after[..., None, :, :]
    small = _exclusive_prefix(xp, small, reverse=True) + small_after[..., None, :, :]
    d_kc = d_kc + vc @ xp.matrix_transpose(big) + xp.matrix_transpose(small)
    d_vc = d_vc + kc @ big
    return _unchunk(xp, d_qc, n), _unchunk(xp, d_kc, n), _unchunk(xp, d_vc, n)


linear_attention = Op(
    _linear_attention_fwd, _linear_attention_bwd, name="linear_attention", register=True
)
