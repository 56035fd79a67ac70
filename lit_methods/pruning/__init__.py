"""Pruning building blocks, free of Lightning (a library module: callbacks may import it): the selection of the
weights that survive a pruning step (magnitude + AP), the dynamic dead neuron rate of ReLU networks, AP's
per-cycle learning-rate schedule, coupled channel groups and physical export (torch-pruning), the per-layer sparsity
report and chart, and OTOv2's DHSPG optimizer."""

from .dead_neurons import DeadNeuronRate, observe_relu_outputs
from .dhspg import DHSPG
from .report import layer_sparsity, mask_sparsity, save_sparsity_bar_chart
from .schedules import CyclicWarmupStepFactor, CyclicWarmupStepLR
from .selection import masked_share, select_surviving_weights, smallest_indices
from .structured import ChannelGroup, build_dependency_graph, channel_groups, count_parameters, export_pruned

__all__ = [
    "DHSPG",
    "ChannelGroup",
    "CyclicWarmupStepFactor",
    "CyclicWarmupStepLR",
    "DeadNeuronRate",
    "masked_share",
    "build_dependency_graph",
    "channel_groups",
    "count_parameters",
    "export_pruned",
    "layer_sparsity",
    "mask_sparsity",
    "observe_relu_outputs",
    "save_sparsity_bar_chart",
    "select_surviving_weights",
    "smallest_indices",
]
