"""Knowledge distillation methods built on :class:`lit_methods.ImageClassifier`."""

from lit_methods.knowledge_distillation.bdkd import BDKD, BDKDLoss

__all__ = ["BDKD", "BDKDLoss"]
