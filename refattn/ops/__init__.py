"""Differentiable ops: each keeps its forward, its backward and its derivation together."""

from .alibi import alibi_bias, alibi_slopes
from .block_sparse import block_sparse_attention, block_sparse_mask
from .entmax import entmax, sparsemax
from .linear_attention import linear_attention
from .linformer import linformer_attention
from .lsh import lsh_attention, lsh_attention_mask, lsh_buckets
from .masks import causal_mask, from_torch_mha_masks, padding_mask
from .paged import paged_attention
from .sdpa import scaled_dot_product_attention
from .softmax import log_softmax, softmax
from .sparse_patterns import (
    bigbird_pattern,
    combine_patterns,
    fixed_pattern,
    longformer_dilated_pattern,
    strided_pattern,
)
from .varlen import varlen_attention
from .window import sliding_window_attention
from .xca import cross_covariance_attention

__all__ = [
    "alibi_bias",
    "alibi_slopes",
    "bigbird_pattern",
    "block_sparse_attention",
    "block_sparse_mask",
    "causal_mask",
    "combine_patterns",
    "cross_covariance_attention",
    "entmax",
    "fixed_pattern",
    "from_torch_mha_masks",
    "linear_attention",
    "linformer_attention",
    "log_softmax",
    "longformer_dilated_pattern",
    "lsh_attention",
    "lsh_attention_mask",
    "lsh_buckets",
    "padding_mask",
    "paged_attention",
    "scaled_dot_product_attention",
    "sliding_window_attention",
    "softmax",
    "sparsemax",
    "strided_pattern",
    "varlen_attention",
]
