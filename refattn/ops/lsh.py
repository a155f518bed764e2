r"""Reformer's LSH attention (Kitaev et al. 2020), shared-QK, with its bucket assignment given.

**Hash.** Round ``r`` of ``n_hashes`` rotates every vector, ``y = x R_r`` with ``R_r`` of shape
``(d, n_buckets / 2)``, and takes the bucket :math:`h_r(x) = \arg\max [y, -y]` (angular LSH,
Andoni et al. 2015). The rotations are an argument, ``(d, n_hashes, n_buckets / 2)`` as in
reformer_pytorch and trax, so the op draws no random numbers.

**Sort and chunk.** Each round sorts the positions by ``(bucket, position)`` (ties by position:
the sort key ``bucket * n + t`` is unique). The ``n_hashes`` sorted rounds are laid end to end
(``n_hashes * n`` slots) and cut in chunks of ``c = chunk_size`` slots. A query attends to the
keys of its own chunk and of the chunk before it, cyclically over the *whole* concatenation:
the first chunk of round ``r`` looks back into the last chunk of round ``r - 1`` (and the very
first chunk into the last one). This is what trax and reformer_pytorch do (``look_one_back``);
a key can therefore appear twice in a window, and then counts twice.

**Shared QK.** Queries are ``qk``, keys are ``qk / ||qk||`` (per position): trax and
reformer_pytorch normalise the keys so that hash locality matches the attention score. A
position's score with itself is replaced by the constant ``self_logit`` (default ``-5e4``,
reformer_pytorch's ``TOKEN_SELF_ATTN_VALUE``): since ``q . q/||q||`` is the largest score a
shared-QK query can have, a position would otherwise mostly attend to itself. With ``-5e4`` a
position attends to itself only when nothing else is visible (the first position under causal
masking); its weight is otherwise ``exp(-5e4 - max)``, which is 0 in float32 and float64 for
scores of ordinary size. ``is_causal`` removes keys after the query (``j > i``) exactly.

**Rounds.** Round ``r`` gives ``o_r`` and its logsumexp ``lse_r``; the output is
:math:`\sum_r \mathrm{softmax}_r(\mathrm{lse})\, o_r`. This equals one softmax over all
``(round, key)`` entries, i.e. dense attention with the multiplicity ``M = sum_r M_r`` of each
pair as a log-bias (:func:`lsh_attention_mask` returns ``M_r``):

.. math::

    O_i = \sum_j \frac{M_{ij}\, e^{s_{ij}}}{\sum_{j'} M_{ij'}\, e^{s_{ij'}}}\, v_j, \qquad
    s_{ij} = \mathrm{scale}\; q_i \cdot \frac{q_j}{\lVert q_j \rVert}\ (i \ne j), \quad
    s_{ii} = \mathrm{self\_logit}.

Pairs seen in several rounds count several times (reformer_pytorch's default
``allow_duplicate_attention=True``). Cost per round: ``n / c`` chunks of ``c x 2c`` scores,
``O(n c d)`` time; the scores are computed per block of
chunks (recomputed in the backward), so the memory beyond inputs and outputs is the sorted
windows, ``O(n_hashes n d)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .._backend import device_of, namespace, real_number
from .._op import Op

__all__ = ["lsh_attention", "lsh_attention_mask", "lsh_buckets"]

Array = Any

_OP = "lsh_attention"
#: reformer_pytorch's TOKEN_SELF_ATTN_VALUE
SELF_LOGIT = -5e4


def _check(
    op: str, qk: Array, v: Array | None, rotations: Array, chunk_size: Any
) -> tuple[Any, int, int, int]:
    """Validate; return ``(xp, n_hashes, n_buckets, chunk_size)``."""
    xp = namespace(qk, rotations) if v is None else namespace(qk, v, rotations)
    if qk.ndim < 2:
        raise ValueError(f"refattn.{op}: qk must be (..., n, d), got shape {tuple(qk.shape)}")
    if qk.dtype not in (xp.float32, xp.float64):
        raise TypeError(f"refattn.{op}: qk must be float32 or float64, got {qk.dtype}")
    n, d = int(qk.shape[-2]), int(qk.shape[-1])
    if v is not None and (
        v.ndim != qk.ndim or tuple(v.shape[:-1]) != tuple(qk.shape[:-1]) or v.dtype != qk.dtype
    ):
        raise ValueError(
            f"refattn.{op}: v must be (..., n, d_v) with qk's leading shape {tuple(qk.shape[:-1])}"
            f" and dtype {qk.dtype}, got {tuple(v.shape)} {v.dtype}"
        )
    if rotations.ndim != 3 or int(rotations.shape[0]) != d or int(rotations.shape[2]) < 1:
        raise ValueError(
            f"refattn.{op}: rotations must be (d, n_hashes, n_buckets / 2) = ({d}, n_hashes, "
            f"n_buckets / 2) with n_buckets / 2 >= 1 (reformer_pytorch's layout without its "
            f"leading batch axis), got {tuple(rotations.shape)}"
        )
    if int(rotations.shape[1]) < 1:
        raise ValueError(
            f"refattn.{op}: rotations needs n_hashes >= 1, got {tuple(rotations.shape)}"
        )
    if rotations.dtype != qk.dtype:
        raise TypeError(
            f"refattn.{op}: rotations must have qk's dtype {qk.dtype}, got {rotations.dtype}"
        )
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"refattn.{op}: chunk_size must be a positive int, got {chunk_size!r}")
    if n % chunk_size:
        raise ValueError(
            f"refattn.{op}: the sequence length n={n} must be a multiple of chunk_size="
            f"{chunk_size} (chunks are cut from the sorted sequence; pad the input)"
        )
    return xp, int(rotations.shape[1]), 2 * int(rotations.shape[2]), chunk_size


def _buckets(xp: Any, qk: Array, rotations: Array) -> Array:
    """``(B, n, d) -> (B, n_hashes, n)``: ``argmax [x R_r, -x R_r]`` per round."""
    rounds = []
    for r in range(int(rotations.shape[1])):
        y = qk @ rotations[:, r, :]  # (B, n, n_buckets / 2)
        rounds.append(xp.argmax(xp.concat([y, -y], axis=-1), axis=-1))
    return xp.stack(rounds, axis=1)


def _sort(xp: Any, buckets: Array) -> tuple[Array, Array]:
    """``(st, undo)``, both ``(B, n_hashes * n)``.

    ``st[s]`` is the position in slot ``s`` of the concatenated sorted rounds; ``undo`` maps
    ``(round r, position t)``, flattened as ``r n + t``, back to its slot.
    """
    b, h, n = (int(s) for s in buckets.shape)
    dev = device_of(buckets)
    t = xp.arange(n, dtype=xp.int64, device=dev)
    key = xp.astype(buckets, xp.int64) * n + t  # unique per round: ties broken by position
    perm = xp.argsort(key, axis=-1, stable=True)  # (B, H, n) positions in sorted order
    offsets = xp.reshape(xp.arange(h, dtype=xp.int64, device=dev) * n, (1, h, 1))
    undo = xp.argsort(perm, axis=-1, stable=True) + offsets
    return xp.reshape(perm, (b, h * n)), xp.reshape(undo, (b, h * n))


def _gather(xp: Any, x: Array, idx: Array) -> Array:
    """``x[b, idx[b, s], :]``: ``(B, m, e)`` from ``(B, n, e)`` and ``(B, m)``."""
    return xp.take_along_axis(x, idx[:, :, None], axis=1)


def _look_back(xp: Any, x: Array) -> Array:
    """``(B, n_c, c, ...) -> (B, n_c, 2c, ...)``: each chunk followed by the one before it."""
    return xp.concat([x, xp.roll(x, 1, axis=1)], axis=2)


def _fold_back(xp: Any, x: Array, c: int) -> Array:
    """Adjoint of :func:`_look_back`: the look-back half goes back to the chunk it came from."""
    return x[:, :, :c, ...] + xp.roll(x[:, :, c:, ...], -1, axis=1)


#: a block of chunks has score tiles of about this many entries (forward and backward)
_BLOCK_ENTRIES = 2**19


def _blocks(b: int, n_c: int, c: int) -> list[tuple[int, int]]:
    """Runs of chunks whose ``(B, g, c, 2c)`` scores hold about :data:`_BLOCK_ENTRIES`."""
    g = max(1, _BLOCK_ENTRIES // max(1, b * c * 2 * c))
    return [(g0, min(g0 + g, n_c)) for g0 in range(0, n_c, g)]


@dataclass
class _Windows:
    """The sorted, chunked queries and their key/value windows, and the score rule.

    ``bq (B, n_c, c, d)``, ``bk (B, n_c, 2c, d)`` (normalised keys), ``bv (B, n_c, 2c, d_v)``;
    ``tq (B, n_c, c)`` and ``tk (B, n_c, 2c)`` the positions in the slots. Scores are
    recomputed per block of chunks in the backward, so nothing of size ``n c`` is kept.
    """

    bq: Array
    bk: Array
    bv: Array
    tq: Array
    tk: Array
    scale: float
    is_causal: bool
    self_logit: float

    def is_self(self, g0: int, g1: int) -> Array:
        tq, tk = self.tq[:, g0:g1, ...], self.tk[:, g0:g1, ...]
        return tq[..., :, None] == tk[..., None, :]

    def scores(self, xp: Any, g0: int, g1: int) -> Array:
        """``(B, g, c, 2c)``: scaled scores, ``self_logit`` on self pairs, ``-inf`` where causal."""
        s = (self.bq[:, g0:g1, ...] @ xp.matrix_transpose(self.bk[:, g0:g1, ...])) * self.scale
        fill = xp.asarray(self.self_logit, dtype=s.dtype, device=device_of(s))
        s = xp.where(self.is_self(g0, g1), fill, s)
        if self.is_causal:
            tq, tk = self.tq[:, g0:g1, ...], self.tk[:, g0:g1, ...]
            s = xp.where(tk[..., None, :] > tq[..., :, None], -xp.inf, s)
        return s


def _lsh_fwd(
    qk: Array,
    v: Array,
    /,
    *,
    rotations: Array,
    chunk_size: int,
    scale: float | None = None,
    is_causal: bool = False,
    self_logit: float = SELF_LOGIT,
) -> tuple[Array, Any]:
    r"""Reformer LSH self-attention with shared QK.

    Parameters
    ----------
    qk : (..., n, d)
        Shared queries/keys (reformer_pytorch merges heads into the batch: any leading axes).
    v : (..., n, d_v)
    rotations : (d, n_hashes, n_buckets / 2)
        Random rotations, one ``d x n_buckets/2`` matrix per hash round (an option: the hash is
        piecewise constant, so its gradient is 0 almost everywhere).
    chunk_size : int
        Slots per chunk, ``c`` (reformer_pytorch's ``bucket_size``); ``n`` must be a multiple of
        it. reformer_pytorch uses ``n_buckets = n / c`` (and ``n`` a multiple of ``2c``); here
        ``n_buckets`` comes from ``rotations`` and is independent of ``c``.
    scale : float, optional
        Defaults to ``1 / sqrt(d)``.
    is_causal : bool
        Hide keys after the query.
    self_logit : float
        The logit of a position with itself (replaces its score). ``-inf`` would leave the first
        position of a causal sequence with nothing to attend to; the default ``-5e4`` is
        reformer_pytorch's.

    Returns
    -------
    out : (..., n, d_v)
    """
    xp, n_hashes, _, c = _check(_OP, qk, v, rotations, chunk_size)
    if not isinstance(is_causal, bool):
        raise TypeError(f"refattn.{_OP}: is_causal must be a bool, got {is_causal!r}")
    self_logit = real_number(_OP, "self_logit", self_logit)
    *lead, n, d = (int(s) for s in qk.shape)
    dv = int(v.shape[-1])
    scale = 1.0 / math.sqrt(d) if scale is None else real_number(_OP, "scale", scale)
    b = math.prod(lead)
    qk3, v3 = xp.reshape(qk, (b, n, d)), xp.reshape(v, (b, n, dv))
    st, undo = _sort(xp, _buckets(xp, qk3, rotations))
    n_c = n_hashes * n // c
    bq = xp.reshape(_gather(xp, qk3, st), (b, n_c, c, d))
    norm = xp.sqrt(xp.sum(bq * bq, axis=-1, keepdims=True))
    bk = _look_back(xp, bq / norm)  # (B, n_c, 2c, d)
    bv = _look_back(xp, xp.reshape(_gather(xp, v3, st), (b, n_c, c, dv)))
    tq = xp.reshape(st, (b, n_c, c))
    tk = _look_back(xp, tq)
    windows = _Windows(bq, bk, bv, tq, tk, scale, is_causal, self_logit)
    o_blocks, lse_blocks = [], []
    for g0, g1 in _blocks(b, n_c, c):
        s = windows.scores(xp, g0, g1)
        m = xp.max(s, axis=-1, keepdims=True)  # finite: the query itself is always in its chunk
        lse = m + xp.log(xp.sum(xp.exp(s - m), axis=-1, keepdims=True))
        o_blocks.append(xp.exp(s - lse) @ bv[:, g0:g1, ...])
        lse_blocks.append(lse)
    o = xp.reshape(xp.concat(o_blocks, axis=1), (b, n_hashes * n, dv))
    lse = xp.reshape(xp.concat(lse_blocks, axis=1), (b, n_hashes * n, 1))
    # back to (round, position) order, then the rounds combined by their logsumexp
    o = xp.reshape(_gather(xp, o, undo), (b, n_hashes, n, dv))
    lse_r = xp.reshape(_gather(xp, lse, undo), (b, n_hashes, n))
    big = xp.max(lse_r, axis=1, keepdims=True)
    total = big + xp.log(xp.sum(xp.exp(lse_r - big), axis=1, keepdims=True))  # (B, 1, n)
    w = xp.exp(lse_r - total)
    out = xp.sum(w[..., None] * o, axis=1)  # (B, n, d_v)
    saved = (xp, tuple(qk.shape), tuple(v.shape), st, undo, norm, windows)
    return xp.reshape(out, (*lead, n, dv)), (saved, out, total)


def _lsh_bwd(residuals: Any, d_out: Array, /) -> tuple[Array, Array]:
    r"""VJP of LSH attention for the fixed bucket assignment.

    The hash and the sort are piecewise constant in ``qk``: away from a bucket change they have
    zero derivative, and the op is a softmax over the entries ``(r, j)`` of each query's windows,
    :math:`O_i = \sum_{r,j} P_{rij} v_j` with :math:`P_{rij} = e^{s_{rij} - L_i}`,
    :math:`L_i = \log\sum_r e^{\mathrm{lse}_{ri}}` (so :math:`P = w_r\, p_r`, the round weight
    times the in-chunk softmax). In the sorted chunked layout:

    .. math::

        \Delta_i = dO_i \cdot O_i, \qquad dV_j \mathrel{+}= \textstyle\sum P_{rij}\, dO_i, \qquad
        dS_{rij} = P_{rij}\,(dO_i \cdot v_j - \Delta_i)\ \text{(0 on the self entries, whose
        logit is a constant)}, \\
        dq_i = \mathrm{scale} \textstyle\sum dS_{rij}\, \hat k_j, \qquad
        d\hat k_j = \mathrm{scale} \textstyle\sum dS_{rij}\, q_i, \qquad
        dk_j = \bigl(d\hat k_j - \hat k_j (\hat k_j \cdot d\hat k_j)\bigr) / \lVert q_j \rVert .

    The look-back halves of the key windows fold back onto the chunk they were copied from
    (the adjoint of the cyclic shift), and ``undo`` takes every slot's gradient back to its
    position; ``dqk = sum over rounds of (dq + dk)``, since ``qk`` is both query and key.
    """
    saved, out, total = residuals
    xp, qk_shape, v_shape, st, undo, norm, win = saved
    b, n_c, c, d = (int(s) for s in win.bq.shape)
    n = int(out.shape[1])
    n_hashes = n_c * c // n
    dv = int(win.bv.shape[-1])
    d_o = xp.reshape(d_out, (b, n, dv))
    delta = xp.sum(d_o * out, axis=-1, keepdims=True)  # (B, n, 1)
    # L_i of each slot's position: P_rij = exp(s_rij - L_i) with the scores recomputed
    total_s = xp.reshape(_gather(xp, xp.reshape(total, (b, n, 1)), st), (b, n_c, c, 1))
    d_o_s = xp.reshape(_gather(xp, d_o, st), (b, n_c, c, dv))
    delta_s = xp.reshape(_gather(xp, delta, st), (b, n_c, c, 1))
    d_q_blocks, d_kw_blocks, d_vw_blocks = [], [], []
    for g0, g1 in _blocks(b, n_c, c):
        pw = xp.exp(win.scores(xp, g0, g1) - total_s[:, g0:g1, ...])  # (B, g, c, 2c)
        d_o_g = d_o_s[:, g0:g1, ...]
        d_vw_blocks.append(xp.matrix_transpose(pw) @ d_o_g)  # (B, g, 2c, d_v)
        d_s = pw * (d_o_g @ xp.matrix_transpose(win.bv[:, g0:g1, ...]) - delta_s[:, g0:g1, ...])
        d_s = xp.where(win.is_self(g0, g1), xp.zeros_like(d_s), d_s)
        d_q_blocks.append((d_s @ win.bk[:, g0:g1, ...]) * win.scale)
        d_kw_blocks.append((xp.matrix_transpose(d_s) @ win.bq[:, g0:g1, ...]) * win.scale)
    d_q = xp.concat(d_q_blocks, axis=1)
    d_kh = _fold_back(xp, xp.concat(d_kw_blocks, axis=1), c)
    d_bv = xp.concat(d_vw_blocks, axis=1)
    kh = win.bk[:, :, :c, :]
    d_k = (d_kh - kh * xp.sum(kh * d_kh, axis=-1, keepdims=True)) / norm
    d_qk = xp.reshape(d_q + d_k, (b, n_hashes * n, d))
    d_v = xp.reshape(_fold_back(xp, d_bv, c), (b, n_hashes * n, dv))
    d_qk = xp.sum(xp.reshape(_gather(xp, d_qk, undo), (b, n_hashes, n, d)), axis=1)
    d_v = xp.sum(xp.reshape(_gather(xp, d_v, undo), (b, n_hashes, n, dv)), axis=1)
    return xp.reshape(d_qk, qk_shape), xp.reshape(d_v, v_shape)


lsh_attention = Op(_lsh_fwd, _lsh_bwd, name=_OP, register=True)


def lsh_buckets(qk: Array, *, rotations: Array) -> Array:
    """The bucket of every position per round: ``(..., n, d) -> (..., n_hashes, n)`` (int64)."""
    xp, n_hashes, _, _ = _check("lsh_buckets", qk, None, rotations, 1)
    *lead, n, d = (int(s) for s in qk.shape)
    buckets = _buckets(xp, xp.reshape(qk, (math.prod(lead), n, d)), rotations)
    return xp.reshape(xp.astype(buckets, xp.int64), (*lead, n_hashes, n))


def lsh_attention_mask(
    qk: Array, *, rotations: Array, chunk_size: int, is_causal: bool = False
) -> Array:
    r"""The dense form of :func:`lsh_attention`'s assignment: ``M_r[i, j]``, (..., n_hashes, n, n).

    ``M_r[i, j]`` is how many times key ``j`` is in the window (own chunk and the one before) of
    query ``i`` in round ``r``: 0, 1 or 2 (2 only where a window wraps into the previous round
    over the same positions), and 0 for ``j > i`` when causal. Self pairs ``(i, i)`` are counted
    like any other (their *logit* is ``self_logit``). Then, with ``M = sum_r M_r``,

    ``lsh_attention(qk, v, ...) == softmax(s + log M) v``, ``s_ij = scale qk_i . qk_j/||qk_j||``
    off the diagonal and ``s_ii = self_logit``; ``log 0 = -inf`` hides a pair.

    Integer (int64) counts. It builds ``n x n`` arrays per round: for looking at the bucket
    structure and for tests, not for long sequences.
    """
    xp, n_hashes, _, c = _check("lsh_attention_mask", qk, None, rotations, chunk_size)
    if not isinstance(is_causal, bool):
        raise TypeError(f"refattn.lsh_attention_mask: is_causal must be a bool, got {is_causal!r}")
    *lead, n, d = (int(s) for s in qk.shape)
    b = math.prod(lead)
    st, _ = _sort(xp, _buckets(xp, xp.reshape(qk, (b, n, d)), rotations))
    n_c = n_hashes * n // c
    tq = xp.reshape(st, (b, n_c, c))
    tk = _look_back(xp, tq)
    pos = xp.arange(n, dtype=xp.int64, device=device_of(st))
    dtype = qk.dtype
    # per chunk: which positions are its queries (0/1) and how often each is among its keys
    q_count = xp.sum(xp.astype(tq[..., None] == pos, dtype), axis=2)  # (B, n_c, n)
    k_count = xp.sum(xp.astype(tk[..., None] == pos, dtype), axis=2)
    q_count = xp.reshape(q_count, (b, n_hashes, n // c, n))
    k_count = xp.reshape(k_count, (b, n_hashes, n // c, n))
    m = xp.matrix_transpose(q_count) @ k_count  # sum over the round's chunks: (B, H, n, n)
    if is_causal:
        m = xp.where(pos[None, :] > pos[:, None], xp.zeros_like(m), m)
    return xp.reshape(xp.astype(xp.round(m), xp.int64), (*lead, n_hashes, n, n))
