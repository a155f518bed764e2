"""The command line: ``refattn --version`` and ``refattn check``."""

from __future__ import annotations

import subprocess
import sys

import pytest

import refattn
from refattn import cli
from refattn.checks import Case, core


def test_version():
    out = subprocess.run(
        [sys.executable, "-m", "refattn", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"refattn {refattn.__version__}"


def test_check_prints_a_row_per_case_and_passes(capsys):
    code = cli.main(["check", "--ops", "softmax", "--no-frameworks"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("softmax[")]
    assert code == 0
    assert len(rows) == sum(1 for c in core._CASES_FOR_TESTS if c.op.name == "softmax")
    assert all(" ok " in row for row in rows)
    assert "passed, 0 failed" in out


def test_check_exits_nonzero_on_a_wrong_backward(monkeypatch, capsys):
    from refattn.ops.softmax import _softmax_bwd, _softmax_fwd

    broken = refattn.Op(
        _softmax_fwd, lambda r, dy, **o: (_softmax_bwd(r, dy, **o)[0] * 1.01,), name="broken"
    )
    case = Case(broken, "plain", core._softmax_make((2, 3)))
    monkeypatch.setattr("refattn.checks.all_cases", lambda: [case])
    code = cli.main(["check", "--no-frameworks"])
    out = capsys.readouterr().out
    assert code == 1
    assert "broken[plain]" in out and "FAIL" in out and "0 passed, 1 failed" in out


def test_check_rejects_unknown_ops(capsys):
    assert cli.main(["check", "--ops", "no_such_op"]) == 2
    assert "no case matches" in capsys.readouterr().err


@pytest.mark.parametrize("backend", ["array_api_strict"])
def test_check_runs_on_array_api_strict(backend, capsys):
    pytest.importorskip(backend)
    assert cli.main(["check", "--ops", "log_softmax", "--no-frameworks", "--backend", backend]) == 0
