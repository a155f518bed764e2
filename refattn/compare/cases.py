"""What ``refattn compare`` runs: the frameworks, the quick grid's cases (names of
:data:`refattn.testing.conformance.CASES`, the grid every SDPA row runs on), the layer dtypes,
and the rule's constants (conformance's)."""

from __future__ import annotations

from ..testing.conformance import CASES, Case
from ..testing.conformance import DTYPES as DTYPES  # the same dtypes and rule constants
from ..testing.conformance import FACTOR as FACTOR
from ..testing.conformance import FLOOR_ULPS as FLOOR_ULPS
from ..testing.conformance import WARN_FACTOR as WARN_FACTOR

FRAMEWORKS = ("torch", "jax")
LAYER_DTYPES = ("float64", "float32")

#: the quick grid (``--quick``, the tests): one case per semantic the probes also classify
QUICK_CASES = (
    "basic",
    "causal_nq12_nk20",
    "causal_lower_right_nq12_nk20",
    "causal_gqa",
    "fully_masked_rows",
)


def attention_cases(quick: bool) -> list[Case]:
    """The conformance catalogue, or its quick part."""
    return [c for c in CASES if not quick or c.name in QUICK_CASES]
