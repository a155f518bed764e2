"""Reading attention: entropy, rollout, flow, gradient-weighted attention, head importance.

Every quantity is computed exactly (float64 on the reference path), with hand-derived backward
passes where a gradient is meaningful:

* :func:`attention_entropy` (an Op) and :func:`entropy_by_layer`: seed 002 §12.2.
* :func:`attention_rollout` (an Op) and :func:`augmented_attention`: Abnar & Zuidema 2020.
* :func:`attention_flow`: the same paper's max-flow (networkx, ``refattn[interpret]``).
* :func:`encoder_attention_gradients`: ``A ∘ |∂L/∂A|`` (seed 002 §9.3) and Michel et al.'s head
  importance, from refattn's own backward of an encoder stack.

Plots of these live in :mod:`refattn.plot` (matplotlib, imported lazily). docs/interpret.md
has the definitions, the choices made and how they compare with the public codes.
"""

from .entropy import attention_entropy, entropy_by_layer
from .flow import attention_flow
from .gradients import AttentionGradients, encoder_attention_gradients
from .rollout import attention_rollout, augmented_attention

__all__ = [
    "AttentionGradients",
    "attention_entropy",
    "attention_flow",
    "attention_rollout",
    "augmented_attention",
    "encoder_attention_gradients",
    "entropy_by_layer",
]
