r"""Block layouts for :func:`~refattn.ops.block_sparse.block_sparse_attention` (host NumPy bool).

Every builder works on *block* indices ``i`` (query block) and ``j`` (key block), as the papers'
kernels do; with ``block_size=1`` the layouts are the papers' element-level patterns. The
layouts are index data (which tiles exist), built on the host with NumPy like the tile plans.

Sparse Transformer (Child et al. 2019, section 4.3), stride ``l``, causal by default::

    strided l=3 (n=8)        fixed l=3, c=1 (n=8)
    x . . . . . . .          x . . . . . . .
    x x . . . . . .          x x . . . . . .
    x x x . . . . .          x x x . . . . .
    x x x x . . . .          . . x x . . . .
    . x x x x . . .          . . x x x . . .
    . . x x x x . .          . . x x x x . .
    x . . x x x x .          . . x . . x x .
    . x . . x x x x          . . x . . x x x

* strided: :math:`A^{(1)}_i = \{j : 0 \le i - j \le l\}`, :math:`A^{(2)}_i = \{j : (i - j)
  \bmod l = 0\}`;
* fixed: :math:`A^{(1)}_i = \{j : \lfloor j/l \rfloor = \lfloor i/l \rfloor\}`,
  :math:`A^{(2)}_i = \{j : j \bmod l \in \{l - c, \dots, l - 1\}\}` (the paper writes
  ``{l - c, ..., l}``; ``j mod l`` never reaches ``l``, so the ``c`` last positions of each
  block are the summaries).

``component`` picks ``A1``, ``A2`` or their union (the paper's "merged head");
:func:`combine_patterns` makes the union of any layouts or stacks them into per-head layouts
(the paper's multi-head attention, one pattern per head).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "bigbird_pattern",
    "combine_patterns",
    "fixed_pattern",
    "longformer_dilated_pattern",
    "strided_pattern",
]


def _grid(n_blocks: int) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(n_blocks, bool) or not isinstance(n_blocks, int) or n_blocks < 1:
        raise ValueError(f"refattn: n_blocks must be an int >= 1, got {n_blocks!r}")
    i = np.arange(n_blocks)[:, None]
    return i, np.arange(n_blocks)[None, :]


def _positive(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"refattn: {name} must be an int >= 1, got {value!r}")
    return value


def _pick(a1: np.ndarray, a2: np.ndarray, component: str) -> np.ndarray:
    if component == "both":
        return a1 | a2
    if component == "A1":
        return a1
    if component == "A2":
        return a2
    raise ValueError(f"refattn: component must be 'A1', 'A2' or 'both', got {component!r}")


def strided_pattern(
    n_blocks: int,
    l: int,
    *,
    component: str = "both",
    causal: bool = True,
) -> np.ndarray:
    """Child et al.'s strided pattern ``(n_blocks, n_blocks)``; non-causal mirrors ``A1``."""
    i, j = _grid(n_blocks)
    _positive("l", l)
    a1 = (i - j >= 0) & (i - j <= l) if causal else np.abs(i - j) <= l
    a2 = (i - j) % l == 0
    keep = _pick(a1, a2, component)
    return keep & (j <= i) if causal else keep


def fixed_pattern(
    n_blocks: int,
    l: int,
    c: int,
    *,
    component: str = "both",
    causal: bool = True,
) -> np.ndarray:
    """Child et al.'s fixed pattern: own stride block, plus the ``c`` summary columns of each."""
    i, j = _grid(n_blocks)
    _positive("l", l)
    if isinstance(c, bool) or not isinstance(c, int) or not 1 <= c <= l:
        raise ValueError(f"refattn: c must be an int in [1, l={l}], got {c!r}")
    a1 = (j // l) == (i // l)
    a2 = np.broadcast_to((j % l) >= l - c, a1.shape)
    keep = _pick(a1, a2, component)
    return keep & (j <= i) if causal else keep


def combine_patterns(layouts: Sequence[np.ndarray], how: str = "union") -> np.ndarray:
    """``"union"``: one layout attending the union; ``"heads"``: ``(h, nqb, nkb)``, one each."""
    arrays = [np.asarray(x, dtype=bool) for x in layouts]
    if not arrays or any(a.shape != arrays[0].shape or a.ndim != 2 for a in arrays):
        raise ValueError("refattn: combine_patterns needs 2-D layouts of one shape")
    if how == "union":
        return np.logical_or.reduce(arrays)
    if how == "heads":
        return np.stack(arrays)
    raise ValueError(f"refattn: how must be 'union' or 'heads', got {how!r}")


def bigbird_pattern(
    n_blocks: int, window: int, n_global: int, n_random: int, seed: int
) -> np.ndarray:
    """BigBird (Zaheer et al. 2020, ITC): window ``|i - j| <= window``, the first ``n_global``
    blocks as global rows and columns, and per other row ``n_random`` random key blocks drawn
    without replacement among those not already kept (fewer when fewer remain)::

        n=8, window=1, n_global=1, n_random=1, seed=0
        x x x x x x x x
        x x x . . . . x
        x x x x . . x .
        x . x x x . x .
        x . x x x x . .
        ...
    """
    i, j = _grid(n_blocks)
    if min(window, n_global, n_random) < 0:
        raise ValueError("refattn: window, n_global and n_random must be >= 0")
    keep = (np.abs(i - j) <= window) | (i < n_global) | (j < n_global)
    rng = np.random.default_rng(seed)
    for row in range(n_global, n_blocks):
        free = np.flatnonzero(~keep[row])
        take = rng.choice(free, size=min(n_random, free.size), replace=False)
        keep[row, take] = True
    return keep


def longformer_dilated_pattern(
    n_blocks: int,
    window: int,
    dilation: int | Sequence[int] = 1,
    n_global: int = 0,
    *,
    causal: bool = False,
) -> np.ndarray:
    """Longformer's dilated sliding window (Beltagy et al. 2020): keys ``i + d t``,
    ``|t| <= window`` (``t <= 0`` when causal), plus ``n_global`` global blocks. A sequence of
    dilations gives one layout per head ``(h, n, n)`` (the paper varies ``d`` across heads)::

        n=8, window=1, dilation=2
        x . x . . . . .
        . x . x . . . .
        x . x . x . . .
        . x . x . x . .
        . . x . x . x .
    """
    if not isinstance(dilation, int):
        return np.stack(
            [
                longformer_dilated_pattern(n_blocks, window, d, n_global, causal=causal)
                for d in dilation
            ]
        )
    i, j = _grid(n_blocks)
    _positive("dilation", dilation)
    diff = j - i
    band = (np.abs(diff) <= window * dilation) & (diff % dilation == 0)
    if causal:
        band &= diff <= 0
    keep = band | (i < n_global) | (j < n_global)
    return keep & (j <= i) if causal else keep
