"""The overflow guard: running bounds of ``|Q|``, ``|K|``, ``|V|`` and ``|scale·QKᵀ|`` that let
an update be rejected, in O(1) per update, before it would leave the float range."""

from __future__ import annotations

import math
from typing import Any

from .tuning import MULTIPLICATIVE_EXPONENT
from .validation import host_input

Array = Any


class Magnitudes:
    r"""Host-side upper bounds on ``max_r |X[r, c]|`` per column of Q, K and V.

    They make "an update whose result is not finite is rejected before any state changes"
    cheap: an update is checked against the bounds it would leave (:meth:`admit`, ``O(1)`` per
    delta), never against the device arrays. With :math:`\bar q_c, \bar k_c, \bar v_c` the
    bounds,

    .. math::

        |(Q K^\top)_{ir}| = |\textstyle\sum_c Q_{ic} K_{rc}| \le \sum_c \bar q_c \bar k_c = B,

    and the state is admitted when :math:`\max(1, |\mathrm{scale}|)\, B \le \sqrt{\mathrm{max}}`
    (``K Q^T`` is formed before it is scaled, and the state multiplies scores by deltas and
    subtracts shifts from them, which then stays finite; softmax weights are exactly 0 or 1 long
    before such scores), every :math:`\bar q_c, \bar k_c \le \mathrm{max}`, and
    :math:`n_k e^{16} \max_c \bar v_c \le \mathrm{max}/2` (the unnormalised sums ``AV``,
    whose weights the lazy shifts let grow to ``e^16``, stay finite). A delta grows its column's
    bound by ``|delta|`` (and ``B`` by ``|delta|`` times the other matrix's bound there); an
    appended row raises the bounds to its entries. Bounds only grow (removals keep them): they
    are upper bounds, so they can reject a state whose exact scores would fit only when the
    bounds come within a few factors of ``sqrt(max)``, far beyond what attention inputs hold.
    """

    def __init__(
        self, q: list[float], k: list[float], v: list[float], scale: float, max_abs: float
    ) -> None:
        self.q, self.k, self.v = q, k, v
        self.scale_factor = max(1.0, abs(scale))
        self.max_abs = max_abs
        self.raw = math.fsum(a * b for a, b in zip(q, k, strict=True))
        self.v_max = max(v)
        #: the limits of :meth:`_check`, for the per-update fast paths
        self.raw_limit = math.sqrt(max_abs) / self.scale_factor
        self.v_limit = max_abs / (2.0 * math.exp(MULTIPLICATIVE_EXPONENT))

    def admit_key(self, where: str, n_k: int, c: int, delta: float) -> None:
        """:meth:`admit` for one K delta in column ``c``: a few float operations when it fits."""
        a = abs(delta)
        raw = self.raw + a * self.q[c]
        if raw <= self.raw_limit and self.k[c] + a <= self.max_abs:
            self.k[c] += a
            self.raw = raw
        else:
            self.admit(where, "delta", n_k, k=[(c, delta)])  # raises with the message

    def admit_value(self, where: str, n_k: int, c: int, delta: float) -> None:
        """:meth:`admit` for one V delta in column ``c``."""
        bound = self.v[c] + abs(delta)
        if bound * n_k <= self.v_limit:
            self.v[c] = bound
            if bound > self.v_max:
                self.v_max = bound
        else:
            self.admit(where, "delta", n_k, v=[(c, delta)])

    @classmethod
    def of(cls, xp: Any, Q: Array, K: Array, V: Array, scale: float, max_abs: float) -> Magnitudes:
        def col_max(x: Array) -> list[float]:
            return [float(m) for m in host_input(xp.max(xp.abs(x), axis=0)).tolist()]

        return cls(col_max(Q), col_max(K), col_max(V), scale, max_abs)

    def copy(self) -> Magnitudes:
        other = object.__new__(Magnitudes)
        other.__dict__.update(self.__dict__)
        other.q, other.k, other.v = list(self.q), list(self.k), list(self.v)
        return other

    def admit(
        self, where: str, what: str, n_k: int, *, q: Any = (), k: Any = (), v: Any = ()
    ) -> None:
        """Check the bounds that the ``(column, delta)`` pairs would leave; apply them if fine.

        Raises ValueError naming ``what`` (and changes nothing) otherwise.
        """
        grow: list[dict[int, float]] = [{}, {}, {}]
        for add, pairs in zip(grow, (q, k, v), strict=True):
            for c, delta in pairs:
                add[c] = add.get(c, 0.0) + abs(delta)
        dq, dk, dv = grow
        raw = self.raw + math.fsum(
            [a * (self.k[c] + dk.get(c, 0.0)) for c, a in dq.items()]
            + [a * self.q[c] for c, a in dk.items()]
        )
        entry = max(
            [self.q[c] + a for c, a in dq.items()] + [self.k[c] + a for c, a in dk.items()],
            default=0.0,
        )
        v_max = max([self.v_max] + [self.v[c] + a for c, a in dv.items()])
        self._check(where, what, n_k, entry, raw, v_max)
        for bounds, add in zip((self.q, self.k, self.v), grow, strict=True):
            for c, a in add.items():
                bounds[c] += a
        self.raw, self.v_max = raw, v_max

    def admit_rows(self, where: str, what: str, n_k: int, k_row: Array, v_row: Array) -> None:
        """:meth:`admit` for an appended key row and value row (``O(d + d_v)``)."""
        k_abs = [abs(float(e)) for e in host_input(k_row).tolist()]
        v_abs = [abs(float(e)) for e in host_input(v_row).tolist()]
        k = [max(a, b) for a, b in zip(self.k, k_abs, strict=True)]
        raw = math.fsum(a * b for a, b in zip(self.q, k, strict=True))
        v_max = max(self.v_max, *v_abs)
        self._check(where, what, n_k, max(k_abs), raw, v_max)
        self.k = k
        self.v = [max(a, b) for a, b in zip(self.v, v_abs, strict=True)]
        self.raw, self.v_max = raw, v_max

    def check(self, where: str, what: str, n_k: int) -> None:
        """ValueError naming ``what`` if the current bounds allow a non-finite state."""
        self._check(where, what, n_k, max(max(self.q), max(self.k)), self.raw, self.v_max)

    def _check(
        self, where: str, what: str, n_k: int, entry: float, raw: float, v_max: float
    ) -> None:
        limit = self.max_abs
        if not entry <= limit:
            raise ValueError(
                f"{where}: {what} would make an entry of Q or K reach {entry:.3g}, beyond the "
                f"state's dtype (|entries| <= {limit:.3g}); nothing was changed"
            )
        score = self.scale_factor * raw
        if not score <= math.sqrt(limit):
            raise ValueError(
                f"{where}: {what} would let the scores Q K^T or scale*Q K^T reach {score:.3g} "
                f"(bound sum_c max|Q[:, c]| max|K[:, c]|, times max(1, |scale|)), beyond "
                f"{math.sqrt(limit):.3g}, the square root of the dtype's range that keeps the "
                "state's products of scores and deltas finite; nothing was changed"
            )
        if not n_k * math.exp(MULTIPLICATIVE_EXPONENT) * v_max <= limit / 2.0:
            raise ValueError(
                f"{where}: {what} would let the values reach {v_max:.3g}, so that sums of "
                f"{n_k} weighted values could overflow the state's dtype; nothing was changed"
            )
