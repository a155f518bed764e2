"""refattn: reference attention with hand-derived gradients, on NumPy and CuPy.

The public API::

    refattn.softmax, refattn.log_softmax, refattn.scaled_dot_product_attention
    refattn.causal_mask, refattn.padding_mask, refattn.from_torch_mha_masks
    refattn.Op, refattn.vjp, refattn.gradcheck, refattn.GradcheckError
"""

from ._op import Op, registered_ops, vjp
from ._version import __version__
from .gradcheck import GradcheckError, gradcheck
from .ops import (
    causal_mask,
    from_torch_mha_masks,
    log_softmax,
    padding_mask,
    scaled_dot_product_attention,
    softmax,
)

__all__ = [
    "GradcheckError",
    "Op",
    "__version__",
    "causal_mask",
    "from_torch_mha_masks",
    "gradcheck",
    "log_softmax",
    "padding_mask",
    "registered_ops",
    "scaled_dot_product_attention",
    "softmax",
    "vjp",
]
