"""What ``refattn compare`` reports: table rows, semantic probes, the report and its text."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import IO

from .._version import __version__
from ..testing.conformance import Result
from .cases import FACTOR, FLOOR_ULPS

# ----------------------------------------------------------------------------- results


#: one line of the table: one kernel on one case in one dtype (``status`` pass | warn | FAIL |
#: n/a); the conformance suite's row, with the implementation in ``kernel``
Row = Result


@dataclass
class Probe:
    """A probed semantic: what refattn does, what the framework was observed to do."""

    function: str
    behaviour: str
    refattn: str
    observed: str
    status: str  # same | differs (known) | UNEXPECTED | n/a
    detail: str = ""


@dataclass
class CompareReport:
    framework: str
    device: str
    rows: list[Row] = field(default_factory=list)
    probes: list[Probe] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    strict: bool = False  #: warn rows count as failures

    @property
    def failures(self) -> list[Row]:
        bad = ("FAIL", "warn") if self.strict else ("FAIL",)
        return [r for r in self.rows if r.status in bad]

    @property
    def unexpected(self) -> list[Probe]:
        return [p for p in self.probes if p.status == "UNEXPECTED"]

    @property
    def ok(self) -> bool:
        return not self.failures and not self.unexpected

    def probe(self, function: str, behaviour: str) -> Probe:
        """The probe of ``behaviour`` for ``function`` (KeyError if it was not run)."""
        for p in self.probes:
            if p.function == function and p.behaviour == behaviour:
                return p
        raise KeyError(f"no probe {function!r} / {behaviour!r}")


class Unavailable(RuntimeError):
    """The framework or device cannot be used (exit status 2)."""


def _fmt(x: float) -> str:
    return "" if math.isnan(x) else f"{x:.2e}"


def print_report(report: CompareReport, stream: IO[str] | None = None) -> None:
    """The table, the probed semantic differences, and a summary line."""
    out = stream or sys.stdout
    print(
        f"refattn {__version__} compare {report.framework} on {report.device} "
        f"({', '.join(report.notes[:1])}); reference: refattn float64 on the same rounded "
        f"inputs; allowed = {FACTOR:g} x plain-implementation error + {FLOOR_ULPS:g} eps "
        "max|ref|",
        file=out,
    )
    w_case = max([len("case"), *(len(r.case) for r in report.rows)])
    w_impl = max([len("implementation"), *(len(r.kernel) for r in report.rows)])
    header = (
        f"{'case':<{w_case}}  {'implementation':<{w_impl}}  {'dtype':<8}  {'out err':>9}  "
        f"{'allowed':>9}  {'worst':<6}  {'error':>9}  {'allowed':>9}  {'status':<6}  note"
    )
    print(header, file=out)
    print("-" * len(header), file=out)
    for r in report.rows:
        print(
            f"{r.case:<{w_case}}  {r.kernel:<{w_impl}}  {r.dtype:<8}  {_fmt(r.out_error):>9}  "
            f"{_fmt(r.out_allowed):>9}  {r.worst[:6]:<6}  {_fmt(r.worst_error):>9}  "
            f"{_fmt(r.worst_allowed):>9}  {r.status:<6}  {r.note}",
            file=out,
        )
    print("\nKnown semantic differences (probed from the framework's actual output):", file=out)
    w_fn = max([len("function"), *(len(p.function) for p in report.probes)])
    w_b = max([len("behaviour"), *(len(p.behaviour) for p in report.probes)])
    w_o = max([len("observed"), *(len(p.observed) for p in report.probes)])
    print(
        f"{'function':<{w_fn}}  {'behaviour':<{w_b}}  {'refattn':<14}  {'observed':<{w_o}}  "
        f"{'status':<16}  detail",
        file=out,
    )
    for p in report.probes:
        print(
            f"{p.function:<{w_fn}}  {p.behaviour:<{w_b}}  {p.refattn:<14}  "
            f"{p.observed:<{w_o}}  {p.status:<16}  {p.detail}",
            file=out,
        )
    for note in report.notes[1:]:
        print(f"note: {note}", file=out)
    counts = {s: sum(r.status == s for r in report.rows) for s in ("pass", "warn", "FAIL", "n/a")}
    differs = sum(p.status == "differs (known)" for p in report.probes)
    print(
        f"\n{len(report.rows)} rows: {counts['pass']} pass, {counts['warn']} warn, "
        f"{counts['FAIL']} FAIL, "
        f"{counts['n/a']} n/a; {len(report.probes)} probes: {differs} known differences, "
        f"{len(report.unexpected)} unexpected; {report.seconds:.1f} s",
        file=out,
    )
