"""GPU tripwires: library code must not copy device data to the host behind the user's back.

Runs only where CuPy finds a CUDA device (skipped on CI). Every registered op's forward and
backward run under ``cupy.cuda.transfer_guard("disallow")``, which raises on any implicit
device-to-host transfer (``float(x)``, ``bool(x)``, ``numpy.asarray(x)``, ...).
"""

from __future__ import annotations

import numpy as np
import pytest

from refattn._op import vjp
from refattn.checks import all_cases, to_backend

cupy = pytest.importorskip("cupy")
try:
    HAS_DEVICE = cupy.cuda.runtime.getDeviceCount() > 0
except Exception:  # CUDA driver missing
    HAS_DEVICE = False

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_DEVICE, reason="no CUDA device")]

CASES = all_cases()


@pytest.mark.parametrize("case", CASES, ids=[c.label for c in CASES])
def test_no_hidden_host_transfers(case):
    from array_api_compat import array_namespace

    xp = array_namespace(cupy.empty(0))
    primals, options = case.make(np.random.default_rng(0))
    primals, options = to_backend(xp, primals), to_backend(xp, options)
    with cupy.cuda.transfer_guard("disallow"):
        out, pullback = vjp(case.op, *primals, **options)
        outs = out if isinstance(out, tuple) else (out,)
        cts = tuple(xp.where(xp.isfinite(o), xp.ones_like(o), xp.zeros_like(o)) for o in outs)
        grads = pullback(cts if isinstance(out, tuple) else cts[0])
    for g in grads:
        if g is not None and not isinstance(g, dict):
            assert isinstance(g, cupy.ndarray)
