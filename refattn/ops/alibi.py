r"""ALiBi (Press et al. 2022): per-head slopes and the linear distance bias they scale.

Head ``h`` adds :math:`-m_h \cdot (i + o - j)` to the score of query ``i`` and key ``j``, the
distance to the causal diagonal ``j = i + o`` (``o`` of ``causal_alignment``: 0, or
``n_k - n_q``), or :math:`-m_h \lvert i + o - j\rvert` for a bidirectional model. Pass the
result as SDPA's ``bias``. Under a causal mask it equals BLOOM's ``m_h \cdot j`` up to a
constant per row, which the softmax removes.

The slopes are a geometric sequence, for any head count:

* ``rule="bloom"`` (the paper's reference code, BLOOM; transformers' ``_get_alibi_slopes``):
  with ``c = 2^floor(log2 H)``, the slopes ``2^(-8k/c)`` for ``k = 1..c``, then, when ``H`` is
  not a power of two, ``2^(-4k/c)`` for the odd ``k = 1, 3, ..`` until there are ``H``;
* ``rule="mpt"`` (MosaicML's ``gen_slopes``, ``alibi_bias_max = max_bias``): with
  ``c = 2^ceil(log2 H)``, ``2^(-max_bias k / c)`` for ``k = 1..c``, taken even ``k`` first,
  then odd, the first ``H`` of them.

With ``max_bias = 8`` the two rules give the same slopes, in the same order, for every ``H``
(``2^(-8k/H)`` for a power of two); MPT's rule also takes other ``max_bias``.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from .._backend import default_namespace, namespace, real_number
from .masks import check_alignment

__all__ = ["alibi_bias", "alibi_slopes"]

Array = Any


def alibi_slopes(
    n_heads: int,
    *,
    rule: str = "bloom",
    max_bias: float = 8.0,
    xp: ModuleType | None = None,
    dtype: Any = None,
    device: Any = None,
) -> Array:
    """The ``(n_heads,)`` ALiBi slopes of ``rule`` ("bloom" or "mpt", module docstring), in
    ``dtype`` (default float64) on ``xp`` (NumPy by default). ``max_bias`` is MPT's
    ``alibi_bias_max`` (the BLOOM rule fixes it at 8)."""
    op = "alibi_slopes"
    if isinstance(n_heads, bool) or not isinstance(n_heads, int) or n_heads < 1:
        raise ValueError(f"refattn.{op}: n_heads must be an int >= 1, got {n_heads!r}")
    if rule not in ("bloom", "mpt"):
        raise ValueError(f"refattn.{op}: rule must be 'bloom' or 'mpt', got {rule!r}")
    max_bias = real_number(op, "max_bias", max_bias)
    if not max_bias > 0:
        raise ValueError(f"refattn.{op}: max_bias must be > 0, got {max_bias!r}")
    if rule == "bloom":
        if max_bias != 8.0:
            raise ValueError(f"refattn.{op}: max_bias is MPT's option (rule='mpt')")
        c = 1 << (n_heads.bit_length() - 1)  # 2^floor(log2 H), exact
        slopes = [2.0 ** (-8.0 * k / c) for k in range(1, c + 1)]
        slopes += [2.0 ** (-4.0 * k / c) for k in range(1, 2 * (n_heads - c), 2)]
    else:
        c = 1 << (n_heads - 1).bit_length()  # 2^ceil(log2 H), exact
        every = [2.0 ** (-max_bias * k / c) for k in range(1, c + 1)]
        slopes = (every[1::2] + every[::2])[:n_heads] if c != n_heads else every
    xp = default_namespace() if xp is None else xp
    return xp.asarray(slopes, dtype=xp.float64 if dtype is None else dtype, device=device)


def alibi_bias(
    slopes: Array,
    n_q: int,
    n_k: int,
    *,
    causal_alignment: str = "upper_left",
    symmetric: bool = False,
) -> Array:
    r"""The ``(H, n_q, n_k)`` bias :math:`-m_h (i + o - j)` (``symmetric``: :math:`-m_h
    \lvert i + o - j\rvert`) for SDPA's ``bias``, in the slopes' dtype and namespace.

    ``slopes`` is ``(H,)`` (:func:`alibi_slopes`, or learned). ``o`` is the diagonal offset of
    ``causal_alignment`` ("upper_left": 0, "lower_right": ``n_k - n_q``, the KV-cache case:
    new query ``i`` is at position ``n_k - n_q + i``); pass the same alignment to SDPA.
    """
    op = "alibi_bias"
    xp = namespace(slopes)
    if slopes.ndim != 1 or not xp.isdtype(slopes.dtype, "real floating"):
        raise ValueError(
            f"refattn.{op}: slopes must be a 1-D floating array (one slope per head), got "
            f"shape {tuple(slopes.shape)} and dtype {slopes.dtype}"
        )
    for name, n in (("n_q", n_q), ("n_k", n_k)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"refattn.{op}: {name} must be an int >= 0, got {n!r}")
    check_alignment(causal_alignment)
    offset = 0 if causal_alignment == "upper_left" else n_k - n_q
    device = getattr(slopes, "device", None)
    i = xp.reshape(xp.arange(n_q, dtype=slopes.dtype, device=device), (1, n_q, 1))
    j = xp.reshape(xp.arange(n_k, dtype=slopes.dtype, device=device), (1, 1, n_k))
    distance = i + float(offset) - j
    if symmetric:
        distance = xp.abs(distance)
    return -xp.reshape(slopes, (-1, 1, 1)) * distance
