r"""Packed variable-length attention: many sequences in one token axis, as ``cu_seqlens``.

FlashAttention's ``flash_attn_varlen_func`` layout: the sequences are concatenated along the
token axis, ``q (total_q, Hq, d_k)``, ``k (total_k, Hkv, d_k)``, ``v (total_k, Hkv, d_v)``, and
sequence ``b`` owns the query tokens ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` and the key tokens
``cu_seqlens_k[b]:cu_seqlens_k[b+1]``. No token attends outside its own sequence:

.. math::

    O[s^q_b : s^q_{b+1}] = \mathrm{SDPA}\bigl(Q[s^q_b : s^q_{b+1}],\,
    K[s^k_b : s^k_{b+1}],\, V[s^k_b : s^k_{b+1}]\bigr),

each call on that sequence's own lengths, so ``causal_alignment="lower_right"`` puts the
diagonal at ``n^k_b - n^q_b`` per sequence (FlashAttention's rule; its varlen kernels are always
lower-right). The backward is each sequence's SDPA backward, written into its own token ranges
of ``dQ, dK, dV``: the Jacobian is block diagonal over sequences.

Why a loop over sequences and not a padded batch with lengths
(:func:`~refattn.scaled_dot_product_attention`'s ``query_lengths``/``key_lengths``): a loop costs
``sum_b n^q_b n^k_b`` scores, not ``B max n^q max n^k``, copies no padding, and shows the
definition as it is read.
"""

from __future__ import annotations

from typing import Any

from .._backend import device_of, namespace, to_host
from .._op import Op, vjp
from .sdpa import refuse_options, scaled_dot_product_attention

__all__ = ["varlen_attention"]

Array = Any

_OP = "varlen_attention"


def _boundaries(name: str, value: Any, total: int) -> list[int]:
    """``cu_seqlens`` as host ints: 1-D, integer, from 0, non-decreasing, ending at ``total``."""
    import numpy as np  # host-side index data only, like the block-sparse layout

    host = to_host(value)  # sequences too
    if host.ndim != 1 or host.size < 1:
        raise ValueError(
            f"refattn.{_OP}: {name} must be 1-D with one entry more than the number of "
            f"sequences, got shape {tuple(host.shape)}"
        )
    if host.dtype == np.bool_ or not np.issubdtype(host.dtype, np.integer):
        raise TypeError(f"refattn.{_OP}: {name} must hold integers, got dtype {host.dtype}")
    cu = [int(x) for x in host]
    if cu[0] != 0:
        raise ValueError(f"refattn.{_OP}: {name} must start at 0, got {cu[0]}")
    drops = [b for b in range(len(cu) - 1) if cu[b + 1] < cu[b]]
    if drops:
        b = drops[0]
        raise ValueError(
            f"refattn.{_OP}: {name} must be non-decreasing (sequence lengths >= 0), got "
            f"{cu[b]} then {cu[b + 1]} at entries {b} and {b + 1}"
        )
    if cu[-1] != total:
        raise ValueError(
            f"refattn.{_OP}: {name} must end at the number of tokens {total} (cover the packed "
            f"axis), got {cu[-1]}"
        )
    return cu


def _varlen_fwd(
    q: Array,
    k: Array,
    v: Array,
    /,
    *,
    cu_seqlens_q: Any,
    cu_seqlens_k: Any,
    return_lse: bool = False,
    **options: Any,
) -> tuple[Any, Any]:
    r"""Attention over packed sequences (``flash_attn_varlen_func``'s layout).

    Parameters
    ----------
    q : (total_q, Hq, d_k)
    k : (total_k, Hkv, d_k)
    v : (total_k, Hkv, d_v)
        Tokens of all sequences, concatenated. ``Hq`` a multiple of ``Hkv`` (GQA).
    cu_seqlens_q, cu_seqlens_k : (B + 1,) ints
        Cumulative sequence lengths: ``0``, non-decreasing, ending at ``total_q`` resp.
        ``total_k``; read on the host (any backend's array, or a sequence). Empty sequences
        are allowed (a sequence with queries and no keys gives output 0).
    return_lse : bool
        Also return the log-sum-exp per query, ``(Hq, total_q)`` as FlashAttention's
        ``softmax_lse``; ``-inf`` for rows that see no key.
    **options
        Any option of :func:`~refattn.scaled_dot_product_attention` that is not an array of
        the padded shape: ``is_causal``, ``causal_alignment`` (default "upper_left" as
        everywhere in refattn; FlashAttention's varlen kernels are "lower_right"), ``window``,
        ``scale``, ``softcap``, ``implementation``, ``block_size``, ``memory_budget``. They
        apply to every sequence on its own lengths.

    Returns
    -------
    out : (total_q, Hq, d_v), or ``(out, lse)``
    """
    xp = namespace(q, k, v)
    refuse_options(
        _OP,
        options,
        ("mask", "bias", "dropout_mask", "query_lengths", "key_lengths"),
        "it is shaped like a padded batch: pad the sequences and call "
        "scaled_dot_product_attention instead",
        "ragged weights",
    )
    if q.ndim != 3 or k.ndim != 3 or v.ndim != 3:
        raise ValueError(
            f"refattn.{_OP}: q, k and v must be packed (tokens, heads, features), got q "
            f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    cu_q = _boundaries("cu_seqlens_q", cu_seqlens_q, int(q.shape[0]))
    cu_k = _boundaries("cu_seqlens_k", cu_seqlens_k, int(k.shape[0]))
    if len(cu_q) != len(cu_k):
        raise ValueError(
            f"refattn.{_OP}: cu_seqlens_q and cu_seqlens_k must describe the same number of "
            f"sequences, got {len(cu_q) - 1} and {len(cu_k) - 1}"
        )

    def heads_first(x: Array, lo: int, hi: int) -> Array:
        return xp.permute_dims(x[lo:hi, ...], (1, 0, 2))

    outs, lses, pullbacks = [], [], []
    for b in range(len(cu_q) - 1):
        (qs, qe), (ks, ke) = cu_q[b : b + 2], cu_k[b : b + 2]
        (o_b, l_b), pullback = vjp(
            scaled_dot_product_attention,
            heads_first(q, qs, qe),
            heads_first(k, ks, ke),
            heads_first(v, ks, ke),
            return_lse=True,
            **options,
        )
        outs.append(xp.permute_dims(o_b, (1, 0, 2)))
        lses.append(l_b)
        pullbacks.append(pullback)
    if not outs:  # no sequences (cu_seqlens == [0]): empty results
        out = xp.zeros((0, q.shape[1], v.shape[2]), dtype=q.dtype, device=device_of(q))
        lse = xp.zeros((q.shape[1], 0), dtype=q.dtype, device=device_of(q))
        return ((out, lse) if return_lse else out), (cu_q, cu_k, [], xp, (q, k, v))
    out = xp.concat(outs, axis=0)  # (total_q, Hq, d_v)
    lse = xp.concat(lses, axis=1)  # (Hq, total_q)
    residuals = (cu_q, cu_k, pullbacks, xp, (q, k, v))
    return ((out, lse) if return_lse else out), residuals


def _varlen_bwd(residuals: Any, cotangent: Any, /, *, return_lse: bool = False) -> tuple:
    """Each sequence's SDPA backward on its token ranges (a block-diagonal Jacobian)."""
    cu_q, _, pullbacks, xp, primals = residuals
    if not pullbacks:
        return tuple(xp.zeros_like(x) for x in primals)
    d_out, d_lse = cotangent if return_lse else (cotangent, None)
    d_q, d_k, d_v = [], [], []
    for b, pullback in enumerate(pullbacks):
        qs, qe = cu_q[b : b + 2]
        d_o = None if d_out is None else xp.permute_dims(d_out[qs:qe, ...], (1, 0, 2))
        d_l = None if d_lse is None else d_lse[:, qs:qe]
        g_q, g_k, g_v = pullback((d_o, d_l))
        d_q.append(xp.permute_dims(g_q, (1, 0, 2)))
        d_k.append(xp.permute_dims(g_k, (1, 0, 2)))
        d_v.append(xp.permute_dims(g_v, (1, 0, 2)))
    return xp.concat(d_q, axis=0), xp.concat(d_k, axis=0), xp.concat(d_v, axis=0)


varlen_attention = Op(_varlen_fwd, _varlen_bwd, name="varlen_attention", register=True)
