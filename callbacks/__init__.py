"""Callbacks of lit-methods: techniques that apply to any LightningModule."""

from lit_methods.callbacks.activating_while_pruning import ActivatingWhilePruning
from lit_methods.callbacks.adaptive_precision import AdaptivePrecision
from lit_methods.callbacks.dead_neurons import DeadNeuronRate
from lit_methods.callbacks.error_feedback_dp import ErrorFeedbackDP
from lit_methods.callbacks.ghost_bn import GhostBatchNorm
from lit_methods.callbacks.slimfit import SlimFit

__all__ = [
    "ActivatingWhilePruning",
    "AdaptivePrecision",
    "DeadNeuronRate",
    "ErrorFeedbackDP",
    "GhostBatchNorm",
    "SlimFit",
]
