r"""A conformance suite for any attention kernel: refattn's float64 answers and the FlashAttention
rule, over a documented case catalogue.

A kernel is any function with refattn's calling convention (below), in torch, JAX or NumPy (a
C kernel behind DLPack is a NumPy function that converts), wrapped in a :class:`Kernel` that
declares the features it has. :func:`run` calls it on every case of :data:`CASES` whose
features it declares and every dtype it lists, compares its output, LSE (if it returns one) and
gradients with refattn's float64 result for the same rounded inputs, and prints a table; the
cases it lacks are reported as skipped. In a test suite::

    KERNEL = conformance.Kernel(my_attention, framework="torch", features={"causal", "gqa"})

    @pytest.mark.parametrize("case, dtype", conformance.cases(KERNEL))
    def test_conforms(case, dtype):
        conformance.check(KERNEL, case, dtype)

**The calling convention.** ``fn(q, k, v, **options)`` with ``q (B, Hq, n_q, d)``,
``k (B, Hkv, n_k, d)``, ``v (B, Hkv, n_k, d_v)`` (``layout="BSHD"`` swaps axes 1 and 2 of
inputs and output) in the framework's arrays, returning ``out`` like ``q`` with ``d_v``, or
``(out, lse)`` with ``lse (B, Hq, n_q)``. A case passes only the options it uses, with refattn's
meanings (:func:`refattn.scaled_dot_product_attention`):

==================  =======================================================================
option              meaning
==================  =======================================================================
``is_causal``       True; with ``causal_alignment`` "upper_left" (torch, JAX) or
                    "lower_right" (FlashAttention: ``j <= i + n_k - n_q``)
``mask``            bool ``(B, 1, n_q, n_k)``, True = attend
``bias``            float ``(1, 1, n_q, n_k)`` added to the scores (not differentiated)
``scale``           a float (default ``1/sqrt(d)``)
``window``          ``(left, right)``: keys ``i + o - left <= j <= i + o + right``, ``o`` the
                    alignment's offset (FlashAttention's ``window_size``)
``softcap``         ``c``: scores ``c tanh(s / c)`` (Gemma 2, FlashAttention's ``softcap``)
``sinks``           ``(Hq,)`` sink logits in each row's denominator (gpt-oss); differentiated
``query_lengths``,  ``(B,)`` ints: a padded batch, each sequence aligned on its own lengths
``key_lengths``     (FlashAttention's varlen rule under "lower_right")
==================  =======================================================================

**Features** (what a kernel declares; a case runs when it needs only declared ones): "mask",
"bias", "fully_masked_rows" (rows that see no key give output 0, LSE -inf, zero gradients,
refattn's choice; a kernel without it is judged on the other rows, those rows getting a zero
cotangent), "causal" (upper-left), "causal_lower_right", "gqa", "cross" (``n_q != n_k``), "d_v"
(``d_v != d``), "scale", "window", "softcap", "sinks", "varlen", "extreme_logits" (scores of
about ±300), "lse" (the kernel returns the LSE), "grad" (torch/JAX autodiff, or ``vjp``).

**The rule** (:func:`refattn.testing.assert_attention_close`): each quantity's error against
the float64 reference may be at most ``factor`` (2) times a plain implementation's error in the
same dtype, plus 2 ulps of the reference's magnitude. The plain errors are those of
:func:`refattn.testing.lowp_attention_baseline` and its VJP (the worst of the three textbook
softmax-VJP forms), given the window, lengths and causal masks as one explicit boolean mask;
for softcap and sinks, which the plain baseline has no form of, refattn's float32 kernel's error
scaled by ``eps(dtype) / eps(float32)`` (the error of a backward-stable computation is
proportional to the unit roundoff); for float64 candidates, the float32 errors scaled by
``eps64 / eps32`` (:func:`refattn.testing.float64_baseline_error`). A quantity over its allowed
error but within :data:`WARN_FACTOR` times it is "warn" (an accuracy gap, not a wrong
semantics), a failure only with ``strict=True``. A kernel that computes in less than its
inputs declares it (``Kernel(computes_in={"float64": "float32"})``): those rows are judged by
the lower dtype's rule.

The package: :mod:`.catalogue` (features, cases, their seeded inputs), :mod:`.kernels` (the
declaration, calling a kernel in its framework, the ready torch and JAX kernels), :mod:`.judge`
(the float64 reference, the plain errors, the rule, the report). ``refattn compare`` is a
client: it runs these kernels over this catalogue and adds its semantic probes.
"""

from .catalogue import CASES, DTYPES, FEATURES, Case, Inputs, case, inputs
from .judge import (
    FACTOR,
    FLOOR_ULPS,
    WARN_FACTOR,
    Report,
    Result,
    cases,
    check,
    evaluate,
    expected,
    judge,
    plain_errors,
    reference_results,
    run,
    to_float64_errors,
)
from .kernels import TORCH_BACKENDS, Kernel, call, jax_kernel, quiet, torch_sdpa_kernel

__all__ = [
    "CASES",
    "DTYPES",
    "FACTOR",
    "FEATURES",
    "FLOOR_ULPS",
    "TORCH_BACKENDS",
    "WARN_FACTOR",
    "Case",
    "Inputs",
    "Kernel",
    "Report",
    "Result",
    "call",
    "case",
    "cases",
    "check",
    "evaluate",
    "expected",
    "inputs",
    "jax_kernel",
    "judge",
    "plain_errors",
    "quiet",
    "reference_results",
    "run",
    "to_float64_errors",
    "torch_sdpa_kernel",
]
