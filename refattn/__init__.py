"""refattn: reference attention with hand-derived gradients, on NumPy and CuPy.

The public API::

    refattn.softmax, refattn.log_softmax, refattn.scaled_dot_product_attention
    refattn.causal_mask, refattn.padding_mask, refattn.from_torch_mha_masks
    refattn.Op, refattn.vjp, refattn.gradcheck, refattn.GradcheckError
"""

from . import interpret, testing
from ._op import Op, registered_ops, vjp
from ._version import __version__
from .dynamic import DynamicAttention
from .gradcheck import GradcheckError, gradcheck
from .layers import (
    KVCache,
    add_sinusoidal_positions,
    additive_attention,
    feed_forward,
    gelu,
    gelu_tanh,
    init_additive_attention,
    init_feed_forward,
    init_layer_norm,
    init_learned_positions,
    init_linear,
    init_multi_head_attention,
    init_multiplicative_attention,
    init_transformer_decoder_layer,
    init_transformer_encoder_layer,
    layer_norm,
    learned_positions,
    linear,
    multi_head_attention,
    multi_head_attention_cached,
    multiplicative_attention,
    relative_position_attention,
    relu,
    rope,
    rope_frequencies,
    sinusoidal_positions,
    transformer_decoder_layer,
    transformer_decoder_layer_cached,
    transformer_encoder_layer,
    transformer_encoder_layer_cached,
)
from .ops import (
    causal_mask,
    entmax,
    from_torch_mha_masks,
    linear_attention,
    log_softmax,
    padding_mask,
    scaled_dot_product_attention,
    sliding_window_attention,
    softmax,
    sparsemax,
)

__all__ = [
    "DynamicAttention",
    "GradcheckError",
    "KVCache",
    "Op",
    "__version__",
    "add_sinusoidal_positions",
    "additive_attention",
    "causal_mask",
    "entmax",
    "feed_forward",
    "from_torch_mha_masks",
    "gelu",
    "gelu_tanh",
    "gradcheck",
    "init_additive_attention",
    "init_feed_forward",
    "init_layer_norm",
    "init_learned_positions",
    "init_linear",
    "init_multi_head_attention",
    "init_multiplicative_attention",
    "init_transformer_decoder_layer",
    "init_transformer_encoder_layer",
    "interpret",
    "layer_norm",
    "learned_positions",
    "linear",
    "linear_attention",
    "log_softmax",
    "multi_head_attention",
    "multi_head_attention_cached",
    "multiplicative_attention",
    "padding_mask",
    "registered_ops",
    "relative_position_attention",
    "relu",
    "rope",
    "rope_frequencies",
    "scaled_dot_product_attention",
    "sinusoidal_positions",
    "sliding_window_attention",
    "softmax",
    "sparsemax",
    "testing",
    "transformer_decoder_layer",
    "transformer_decoder_layer_cached",
    "transformer_encoder_layer",
    "transformer_encoder_layer_cached",
    "vjp",
]

# issue 19: cross-covariance (XCA), Linformer and Reformer LSH attention
from .layers import (
    cross_covariance_attention_layer,
    init_cross_covariance_attention_layer,
)
from .ops import (
    cross_covariance_attention,
    linformer_attention,
    lsh_attention,
    lsh_attention_mask,
    lsh_buckets,
)

__all__ += [
    "cross_covariance_attention",
    "cross_covariance_attention_layer",
    "init_cross_covariance_attention_layer",
    "linformer_attention",
    "lsh_attention",
    "lsh_attention_mask",
    "lsh_buckets",
]

# issue 18: block-sparse attention
from .ops import (  # noqa: E402
    bigbird_pattern,
    block_sparse_attention,
    block_sparse_mask,
    combine_patterns,
    fixed_pattern,
    longformer_dilated_pattern,
    strided_pattern,
)

__all__ += [
    "bigbird_pattern",
    "block_sparse_attention",
    "block_sparse_mask",
    "combine_patterns",
    "fixed_pattern",
    "longformer_dilated_pattern",
    "strided_pattern",
]

# issue 17: packed variable-length sequences, ALiBi
from .ops import alibi_bias, alibi_slopes, paged_attention, varlen_attention  # noqa: E402

__all__ += ["alibi_bias", "alibi_slopes", "paged_attention", "varlen_attention"]
