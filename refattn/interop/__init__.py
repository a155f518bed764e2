"""Conversions between refattn parameter trees and other frameworks.

:mod:`refattn.interop.torch` converts ``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer``
and ``nn.TransformerDecoderLayer`` parameters (and gradients) both ways. The frameworks are
imported lazily, inside the functions: importing this package needs neither.
:mod:`refattn.interop.dlpack` moves DLPack-speaking arrays (torch, JAX, CuPy) into refattn's
backends without copying where the backend allows it, and back.
"""

from .dlpack import as_array, from_dlpack, to_framework
from .torch import grads_to_torch, options_from_torch, params_from_torch, params_to_torch

__all__ = [
    "as_array",
    "from_dlpack",
    "grads_to_torch",
    "options_from_torch",
    "params_from_torch",
    "params_to_torch",
    "to_framework",
]
