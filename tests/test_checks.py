"""Every registered check case: gradcheck, and agreement with torch and JAX autodiff in float64.

The cases live in ``refattn.checks`` (one module per area of the library); this test runs every
one, so an op that registers cases is covered here and by ``refattn check``.
"""

from __future__ import annotations

import importlib.util

import pytest

from refattn._check_runner import run_case
from refattn.checks import all_cases

CASES = all_cases()
FRAMEWORKS = tuple(f for f in ("torch", "jax") if importlib.util.find_spec(f) is not None)


def test_every_registered_op_has_cases():
    import refattn

    names = {case.op.name for case in CASES}
    missing = set(refattn.registered_ops()) - names
    assert not missing, f"registered ops without check cases: {sorted(missing)}"


@pytest.mark.parametrize("case", CASES, ids=[c.label for c in CASES])
def test_case(case):
    result = run_case(case, frameworks=FRAMEWORKS)
    failures = {k: v for k, v in result.status.items() if v.startswith("FAIL")}
    assert not failures, failures
    for framework in FRAMEWORKS:
        if (case.torch_ref if framework == "torch" else case.jax_ref) is not None:
            assert result.status[framework] == "ok"
