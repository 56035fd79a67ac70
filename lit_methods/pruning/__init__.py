"""Pruning building blocks, free of Lightning (a library module: callbacks may import it): the selection of the
weights that survive a pruning step (magnitude + AP) and the dynamic dead neuron rate of ReLU networks."""

from .dead_neurons import DeadNeuronRate, observe_relu_outputs
from .selection import masked_share, select_surviving_weights, smallest_indices

__all__ = ["DeadNeuronRate", "masked_share", "observe_relu_outputs", "select_surviving_weights", "smallest_indices"]
