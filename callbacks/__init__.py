"""Callbacks of lit-methods: techniques that apply to any LightningModule."""

from callbacks.activating_while_pruning import ActivatingWhilePruning
from callbacks.adaptive_precision import AdaptivePrecision
from callbacks.dead_neurons import DeadNeuronRate
from callbacks.error_feedback_dp import ErrorFeedbackDP
from callbacks.ghost_bn import GhostBatchNorm
from callbacks.slimfit import SlimFit

__all__ = [
    "ActivatingWhilePruning",
    "AdaptivePrecision",
    "DeadNeuronRate",
    "ErrorFeedbackDP",
    "GhostBatchNorm",
    "SlimFit",
]
