"""Callbacks of lit-methods: techniques that apply to any LightningModule (Lightning glue; the algorithms live in
the library modules ``lit_methods.privacy``, ``lit_methods.quantization`` and ``lit_methods.pruning``).

``DeadNeuronRate`` is re-exported from :mod:`lit_methods.pruning`: a metric users attach to any module."""

from lit_methods.callbacks.activating_while_pruning import ActivatingWhilePruning
from lit_methods.callbacks.adaptive_precision import AdaptivePrecision
from lit_methods.callbacks.error_feedback_dp import ErrorFeedbackDP
from lit_methods.callbacks.ghost_bn import GhostBatchNorm
from lit_methods.callbacks.slimfit import SlimFit
from lit_methods.pruning import DeadNeuronRate

__all__ = [
    "ActivatingWhilePruning",
    "AdaptivePrecision",
    "DeadNeuronRate",
    "ErrorFeedbackDP",
    "GhostBatchNorm",
    "SlimFit",
]
