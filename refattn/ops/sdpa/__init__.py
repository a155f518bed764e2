"""Scaled dot-product attention: the op (:mod:`.op`) and its parts, one concept a module."""

from .op import scaled_dot_product_attention
from .plan import DEFAULT_BLOCK, Pattern
from .problem import DEFAULT_MEMORY_BUDGET, Problem, dropout_scale, prepare, refuse_options

__all__ = [
    "DEFAULT_BLOCK",
    "DEFAULT_MEMORY_BUDGET",
    "Pattern",
    "Problem",
    "dropout_scale",
    "prepare",
    "refuse_options",
    "scaled_dot_product_attention",
]
