"""Pruning and model-IP methods (polarization, sparse-then-prune, OTOv2, RD pruning, lottery ownership) as LightningModules; their algorithms live in lit_methods.pruning."""

from .lottery_ownership import LotteryOwnership
from .otov2 import OTOv2
from .polarization import ChannelGates, Polarization, polarization_penalty
from .rd_prune import RDPrune
from .sparse_then_prune import SparseThenPrune, attention_regularizer, attention_row_entropy

__all__ = ["LotteryOwnership", "OTOv2", "ChannelGates", "Polarization", "polarization_penalty", "RDPrune", "SparseThenPrune", "attention_regularizer", "attention_row_entropy"]
