r"""``refattn compare torch|jax``: check a framework's own attention against refattn.

The framework's *own* functions run over the conformance suite's catalogue
(:data:`refattn.testing.conformance.CASES`: shapes, n_q ≠ n_k, d_v ≠ d_k, masks, additive
bias, both causal alignments, GQA, fully masked rows, windows, softcap, sinks, varlen, extreme
logits, custom scale) in float64, float32, float16 and bfloat16, each as a conformance
:class:`~refattn.testing.conformance.Kernel` that declares what the function can express:

* torch: ``F.scaled_dot_product_attention`` on the default dispatch and on every SDPA backend
  the device has, chosen with ``torch.nn.attention.sdpa_kernel`` (CPU: math and the CPU flash
  kernel; ``--device cuda``: math, flash, memory-efficient and cuDNN);
  ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` against
  ``refattn.multi_head_attention`` / ``refattn.transformer_encoder_layer`` (float64 and float32:
  refattn's layers run in those).
* JAX: ``jax.nn.dot_product_attention`` (outputs, gradients and the logsumexp it returns with
  ``return_residual=True``), and ``flax.linen.dot_product_attention`` when flax is installed.

Every SDPA row is :func:`refattn.testing.conformance.evaluate`: outputs, LSE and gradients
against refattn's float64 result **for the same rounded inputs**, by the FlashAttention rule
(error ≤ 2 × a plain implementation's error in that dtype + 2 eps(dtype) max|reference|; float64
rows allow 3 × a plain float64 error estimated from float32). Layer rows use the same rule with
refattn's own float32 run as the plain implementation; the floor of a parameter gradient is
relative to the largest gradient of its affine map. A row is ``pass``, ``warn`` (above the
allowed error but within 4 × of it: an accuracy gap, not a semantic mismatch; it fails only
with ``--strict``), ``FAIL`` or ``n/a`` (a feature the function cannot express, or a case its
backend refuses).

Semantic differences (what a framework does on fully masked rows, how ``is_causal`` aligns when
n_q ≠ n_k, what a boolean mask means, the precision of its float64 path) are **probed** first:
each is computed and the behaviour classified from the framework's actual output, and the
kernel is declared from it (rows that do not give refattn's 0 and -inf are left out of the
comparison; a float64 path that computes in float32 is judged by the float32 rule). Known
behaviours that differ from refattn are reported, not failed; an unrecognized behaviour, or an
error above the allowed one, is a failure and the exit status is 1.

The package: :mod:`.cases` (the quick grid, the dtypes), :mod:`.references` (masked-row
classification and the layer rows' references and baselines), :mod:`.rows` (the probes and
the SDPA rows over conformance kernels), one adapter per framework (:mod:`.torch_adapter`,
:mod:`.jax_adapter`), :mod:`.report` (rows, probes, the table).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import IO

from .cases import DTYPES, FRAMEWORKS, QUICK_CASES, WARN_FACTOR, attention_cases
from .jax_adapter import compare_jax
from .references import classify_masked_rows
from .report import CompareReport, Probe, Row, Unavailable, print_report
from .torch_adapter import LAYER_CASES, compare_torch

__all__ = [
    "DTYPES",
    "LAYER_CASES",
    "QUICK_CASES",
    "CompareReport",
    "Probe",
    "Row",
    "add_arguments",
    "attention_cases",
    "classify_masked_rows",
    "compare",
    "print_report",
    "run",
]


# ----------------------------------------------------------------------------- driver


def compare(
    framework: str,
    *,
    device: str = "cpu",
    quick: bool = False,
    dtypes: tuple[str, ...] = DTYPES,
    strict: bool = False,
) -> CompareReport:
    """Run the comparison and return the report (see the module docstring).

    Raises ImportError when ``framework`` is not installed, and RuntimeError when ``device`` is
    "cuda" and the framework sees no GPU.
    """
    if framework not in FRAMEWORKS:
        raise ValueError(f"refattn compare: framework must be 'torch' or 'jax', got {framework!r}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"refattn compare: device must be 'cpu' or 'cuda', got {device!r}")
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        raise ValueError(f"refattn compare: dtypes must be among {DTYPES}, got {bad}")
    start = time.perf_counter()
    report = CompareReport(framework, device, strict=strict)
    runner = compare_torch if framework == "torch" else compare_jax
    runner(report, device, quick, tuple(dtypes))
    report.seconds = time.perf_counter() - start
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``refattn compare``: ``torch|jax [--device cpu|cuda] [--quick]``."""
    parser.add_argument("framework", choices=FRAMEWORKS, help="the framework to check")
    parser.add_argument(
        "--device",
        default="cpu",
        choices=["cpu", "cuda"],
        help="where the framework runs (refattn's float64 reference always runs on the CPU)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a small grid (a few seconds; used by the tests)"
    )
    parser.add_argument(
        "--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES), help="dtypes to run"
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help=f"fail on 'warn' rows too (errors within {WARN_FACTOR:g}x of the allowed one)",
    )


def run(args: argparse.Namespace, stream: IO[str] | None = None) -> int:
    """``refattn compare``: print the report; 0 if all pass, 1 on a mismatch, 2 if unavailable."""
    try:
        report = compare(
            args.framework,
            device=args.device,
            quick=args.quick,
            dtypes=tuple(getattr(args, "dtypes", DTYPES)),
            strict=getattr(args, "strict", False),
        )
    except ImportError as exc:
        print(f"refattn compare: {args.framework} is not installed ({exc})", file=sys.stderr)
        return 2
    except Unavailable as exc:
        print(f"refattn compare: {exc}", file=sys.stderr)
        return 2
    print_report(report, stream)
    return 0 if report.ok else 1


def main(argv: list[str] | None = None) -> int:
    """``python -m refattn.compare torch|jax``."""
    parser = argparse.ArgumentParser(prog="refattn compare", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
