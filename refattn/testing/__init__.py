"""Testing helpers for people who use refattn as their reference.

* :mod:`refattn.testing.tolerance`: :func:`assert_close` (an ``allclose`` strict about library,
  dtype and shape) and the **FlashAttention rule** for low precision
  (:func:`assert_attention_close`, :func:`attention_tolerance`): a candidate's error against the
  float64 reference may be at most ``factor`` times a plain implementation's error in the same
  dtype, plus a floor of a few ulps.
* :mod:`refattn.testing.baselines`: that plain implementation, computed with refattn itself
  (:func:`lowp_attention_baseline`, :func:`lowp_attention_vjp_baseline`, :func:`run_in_dtype`).
* :mod:`refattn.testing.dtypes`: dtype names across libraries, machine epsilons, rounding.

Every name is importable from ``refattn.testing`` itself.
"""

from .baselines import (
    SOFTMAX_VJP_FORMS,
    lowp_attention_baseline,
    lowp_attention_vjp_baseline,
    run_in_dtype,
)
from .dtypes import dtype_name, machine_epsilon, round_to_dtype
from .tolerance import (
    AttentionTolerance,
    assert_attention_close,
    assert_close,
    attention_tolerance,
    float64_baseline_error,
    max_abs_error,
)

__all__ = [
    "SOFTMAX_VJP_FORMS",
    "AttentionTolerance",
    "assert_attention_close",
    "assert_close",
    "attention_tolerance",
    "dtype_name",
    "float64_baseline_error",
    "lowp_attention_baseline",
    "lowp_attention_vjp_baseline",
    "machine_epsilon",
    "max_abs_error",
    "round_to_dtype",
    "run_in_dtype",
]
