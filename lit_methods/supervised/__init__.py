"""Supervised training methods built on :class:`lit_methods.ImageClassifier`."""

from lit_methods.supervised.multi_sample_dropout import MultiSampleDropoutClassifier, multi_sample_loss
from lit_methods.supervised.subgroup_fairness import MacroStd, SubgroupClassifier

__all__ = ["MacroStd", "MultiSampleDropoutClassifier", "SubgroupClassifier", "multi_sample_loss"]
