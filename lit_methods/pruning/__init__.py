"""Pruning building blocks, free of Lightning (a library module: callbacks may import it): the selection of the
weights that survive a pruning step (magnitude + AP), the dynamic dead neuron rate of ReLU networks and AP's
per-cycle learning-rate schedule."""

from .dead_neurons import DeadNeuronRate, observe_relu_outputs
from .schedules import CyclicWarmupStepFactor, CyclicWarmupStepLR
from .selection import masked_share, select_surviving_weights, smallest_indices

__all__ = [
    "CyclicWarmupStepFactor",
    "CyclicWarmupStepLR",
    "DeadNeuronRate",
    "masked_share",
    "observe_relu_outputs",
    "select_surviving_weights",
    "smallest_indices",
]
