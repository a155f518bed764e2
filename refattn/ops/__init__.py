"""Differentiable ops: each keeps its forward, its backward and its derivation together."""

from .entmax import entmax, sparsemax
from .linear_attention import linear_attention
from .masks import causal_mask, from_torch_mha_masks, padding_mask
from .sdpa import scaled_dot_product_attention
from .softmax import log_softmax, softmax
from .window import sliding_window_attention

__all__ = [
    "causal_mask",
    "entmax",
    "from_torch_mha_masks",
    "linear_attention",
    "log_softmax",
    "padding_mask",
    "scaled_dot_product_attention",
    "sliding_window_attention",
    "softmax",
    "sparsemax",
]
