"""The ``refattn`` command line.

``refattn check``
    gradcheck every registered op over its check cases and, where torch or JAX is installed,
    compare outputs and gradients with their autodiff. One row per case; exit status 1 on any
    failure.
``refattn dynamic``
    the dynamic-attention demo from the seeds (lazy updates versus full recomputes).
``refattn vectors export|verify``, ``refattn compare torch|jax``
    golden vectors and framework comparisons.
``refattn reference --q q.npy --k k.npy --v v.npy [--do do.npy] --out DIR``
    exact float64 output, LSE and gradients of a user's inputs on a Dask cluster.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import time
from collections.abc import Sequence
from typing import Any

from ._version import __version__

#: subcommands implemented in other modules: name -> (module, help)
_PLUGINS = {
    "dynamic": ("refattn._dynamic_cli", "run the dynamic-attention demo (seeds 000/001)"),
    "vectors": ("refattn.vectors", "export or verify golden vectors"),
    "compare": ("refattn.compare", "check a framework's attention against refattn"),
    "reference": ("refattn._reference_cli", "float64 output and gradients of .npy inputs on Dask"),
    "plot": ("refattn._plot_cli", "PNG figures: the mechanisms side by side, or a user's weights"),
}


def _backend_namespace(name: str) -> Any:
    from array_api_compat import array_namespace

    if name == "numpy":
        import numpy

        return array_namespace(numpy.empty(0))
    if name == "array_api_strict":
        import array_api_strict

        return array_namespace(array_api_strict.asarray(0.0))
    if name == "cupy":
        import cupy

        return array_namespace(cupy.empty(0))
    raise ValueError(f"unknown backend {name!r}")


def _check(args: argparse.Namespace) -> int:
    from ._check_runner import FRAMEWORKS, run_case
    from .checks import all_cases

    try:
        xp = _backend_namespace(args.backend)
    except ImportError as exc:
        print(f"refattn check: backend {args.backend!r} is not available: {exc}", file=sys.stderr)
        return 2
    cases = [c for c in all_cases() if not args.ops or c.op.name in args.ops]
    if not cases:
        print(f"refattn check: no case matches --ops {' '.join(args.ops)}", file=sys.stderr)
        return 2
    frameworks = () if args.no_frameworks else FRAMEWORKS
    columns = ["gradcheck", *frameworks]
    width = max(len(c.label) for c in cases) + 2
    header = f"{'case':<{width}}" + "".join(f"{col:<12}" for col in columns) + "  seconds"
    print(f"refattn {__version__}: checking {len(cases)} cases on {args.backend}")
    print(header)
    print("-" * len(header))
    failures = []
    start = time.perf_counter()
    for i, case in enumerate(cases, 1):
        if sys.stderr.isatty():
            print(f"[{i}/{len(cases)}] {case.label}", end="\r", file=sys.stderr, flush=True)
        result = run_case(case, xp=xp, frameworks=frameworks)
        cells = []
        for col in columns:
            status = result.status.get(col, "")
            short = "FAIL" if status.startswith("FAIL") else status.split(":")[0]
            if short == "ok" and col in result.errors:
                short = f"ok {result.errors[col]:.0e}"
            cells.append(f"{short:<12}")
        print(f"{case.label:<{width}}" + "".join(cells) + f"  {result.seconds:6.2f}", flush=True)
        if not result.passed:
            failures.append(result)
    elapsed = time.perf_counter() - start
    for result in failures:
        for col, status in result.status.items():
            if status.startswith("FAIL"):
                print(f"\n{result.label} [{col}]: {status}")
    for framework in frameworks:
        if importlib.util.find_spec(framework) is None:
            print(f"note: {framework} is not installed: its comparisons were skipped")
    print(f"\n{len(cases) - len(failures)} passed, {len(failures)} failed in {elapsed:.1f} s")
    return 1 if failures else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="refattn",
        description="Reference attention: exact float64 forwards and hand-derived backwards.",
    )
    parser.add_argument("--version", action="version", version=f"refattn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    check = sub.add_parser("check", help="gradcheck every op and compare with torch/JAX")
    check.add_argument("--backend", default="numpy", choices=["numpy", "array_api_strict", "cupy"])
    check.add_argument("--ops", nargs="*", default=[], help="only these op names")
    check.add_argument(
        "--no-frameworks", action="store_true", help="skip the torch/JAX comparisons"
    )
    check.set_defaults(handler=_check)

    for name, (module_name, help_text) in _PLUGINS.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        plugin = sub.add_parser(name, help=help_text)
        module.add_arguments(plugin)
        plugin.set_defaults(handler=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``refattn`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
