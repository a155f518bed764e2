"""Conversions between refattn parameter trees and other frameworks.

:mod:`refattn.interop.torch` converts ``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer``
and ``nn.TransformerDecoderLayer`` parameters (and gradients) both ways. The frameworks are
imported lazily, inside the functions: importing this package needs neither.
"""

from .torch import grads_to_torch, options_from_torch, params_from_torch, params_to_torch

__all__ = ["grads_to_torch", "options_from_torch", "params_from_torch", "params_to_torch"]
