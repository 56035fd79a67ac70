"""Supervised training methods built on :class:`lit_methods.ImageClassifier`."""

from lit_methods.supervised.flowaug import FlowAug, FlowPretraining, build_glow
from lit_methods.supervised.hard_batches import HardBatchClassifier
from lit_methods.supervised.multi_sample_dropout import MultiSampleDropoutClassifier, multi_sample_loss
from lit_methods.supervised.projection_head import ProjectionHeadClassifier
from lit_methods.supervised.selfie_finetune import PAPER_RESNET_LAYERS, SelfieFineTuner, load_patch_network
from lit_methods.supervised.subgroup_fairness import MacroStd, SubgroupClassifier

__all__ = [
    "PAPER_RESNET_LAYERS",
    "FlowAug",
    "FlowPretraining",
    "HardBatchClassifier",
    "MacroStd",
    "MultiSampleDropoutClassifier",
    "ProjectionHeadClassifier",
    "SelfieFineTuner",
    "SubgroupClassifier",
    "build_glow",
    "load_patch_network",
    "multi_sample_loss",
]
