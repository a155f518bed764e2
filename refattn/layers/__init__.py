"""Layers with hand-derived parameter gradients.

Parameters are nested dicts of arrays; an affine map is ``{"weight": (d_in, d_out), "bias":
(d_out,)}`` (the transpose of torch's layout). Every layer is a :class:`refattn.Op`:
``refattn.vjp(layer, params, *inputs, **options)`` returns ``(dparams, *dinputs)``.

* :mod:`.basic`: ``linear``, ``layer_norm``, ``relu``, ``gelu``, ``gelu_tanh``, ``feed_forward``
* :mod:`.attention`: ``multi_head_attention`` (MHA, MQA, GQA, cross-attention)
* :mod:`.transformer`: ``transformer_encoder_layer``, ``transformer_decoder_layer``
* :mod:`.kv_cache`: ``KVCache`` and the cached (incremental decoding) forwards
* :mod:`.positions`: sinusoidal, learned, RoPE and Shaw relative-position attention
* :mod:`.additive`: Bahdanau (additive) and Luong (multiplicative) attention
"""

from .additive import (
    LUONG_METHODS,
    additive_attention,
    init_additive_attention,
    init_multiplicative_attention,
    multiplicative_attention,
)
from .attention import init_multi_head_attention, multi_head_attention
from .basic import (
    feed_forward,
    gelu,
    gelu_tanh,
    init_feed_forward,
    init_layer_norm,
    init_linear,
    layer_norm,
    linear,
    relu,
)
from .kv_cache import (
    KVCache,
    multi_head_attention_cached,
    transformer_decoder_layer_cached,
    transformer_encoder_layer_cached,
)
from .positions import (
    add_sinusoidal_positions,
    init_learned_positions,
    learned_positions,
    relative_position_attention,
    relative_position_index,
    rope,
    rope_angles,
    sinusoidal_positions,
)
from .rope_scaling import ROPE_TYPES, rope_frequencies
from .transformer import (
    init_transformer_decoder_layer,
    init_transformer_encoder_layer,
    transformer_decoder_layer,
    transformer_encoder_layer,
)
from .xca import cross_covariance_attention_layer, init_cross_covariance_attention_layer

__all__ = [
    "LUONG_METHODS",
    "ROPE_TYPES",
    "KVCache",
    "add_sinusoidal_positions",
    "additive_attention",
    "cross_covariance_attention_layer",
    "feed_forward",
    "gelu",
    "gelu_tanh",
    "init_additive_attention",
    "init_cross_covariance_attention_layer",
    "init_feed_forward",
    "init_layer_norm",
    "init_learned_positions",
    "init_linear",
    "init_multi_head_attention",
    "init_multiplicative_attention",
    "init_transformer_decoder_layer",
    "init_transformer_encoder_layer",
    "layer_norm",
    "learned_positions",
    "linear",
    "multi_head_attention",
    "multi_head_attention_cached",
    "multiplicative_attention",
    "relative_position_attention",
    "relative_position_index",
    "relu",
    "rope",
    "rope_angles",
    "rope_frequencies",
    "sinusoidal_positions",
    "transformer_decoder_layer",
    "transformer_decoder_layer_cached",
    "transformer_encoder_layer",
    "transformer_encoder_layer_cached",
]
