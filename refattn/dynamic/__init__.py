r"""Exact dynamic attention: ``softmax(scale·QKᵀ)V`` maintained under small updates.

:class:`DynamicAttention` keeps the output of attention exact (to rounding) while entries of K,
V and Q change one at a time or in batches, and appends and removes key/value tokens. Updates to
K and V are deferred into pending batches (COO on the host, summed into CSR with ``scipy.sparse``
or ``cupyx.scipy.sparse``) and applied lazily by :meth:`DynamicAttention.flush`, which recomputes
only the columns of ``A`` whose keys changed. :meth:`DynamicAttention.query` is exact while
updates are pending: it corrects the one requested entry from the pending batches in
``O(pending·d)``, without flushing.

Maintained state, with ``n_q`` queries, ``n_k`` keys and a per-query-row shift ``c`` (an upper
bound on that row's scores)::

    Aᵀ[r, i] = exp(scale·<Q[i], K[r]> - c[i])      (n_k, n_q)  column-contiguous A
    D[i]     = Σ_r A[i, r]                          (n_q,)
    AVᵀ[j, i] = Σ_r A[i, r]·V[r, j]                 (d_v, n_q)  transposed AV
    output   = (AVᵀ / D)ᵀ = D⁻¹·A·V                 (n_q, d_v)

The derivations, the drift bound and the cost model of the adaptive threshold are in
``docs/dynamic.md``.

The package: :mod:`.attention` (the public class, which owns a :class:`~.state.State` and an
:class:`~.tuning.UpdatePolicy`), :mod:`.state` (the fields above and the pending batches),
functions of the state in :mod:`.queries`, :mod:`.flush` and :mod:`.drift`, and :mod:`.pending`,
:mod:`.tuning`, :mod:`.magnitudes`, :mod:`.validation`, :mod:`.arrays`.
"""

from .attention import DynamicAttention

__all__ = ["DynamicAttention"]
