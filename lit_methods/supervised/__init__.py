"""Supervised training methods built on :class:`lit_methods.ImageClassifier`."""

from lit_methods.supervised.flowaug import FlowAug, FlowPretraining, build_glow
from lit_methods.supervised.hard_batches import HardBatchClassifier
from lit_methods.supervised.multi_sample_dropout import MultiSampleDropoutClassifier, multi_sample_loss
from lit_methods.supervised.subgroup_fairness import MacroStd, SubgroupClassifier

__all__ = [
    "FlowAug",
    "FlowPretraining",
    "HardBatchClassifier",
    "MacroStd",
    "MultiSampleDropoutClassifier",
    "SubgroupClassifier",
    "build_glow",
    "multi_sample_loss",
]
