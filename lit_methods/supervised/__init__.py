"""Supervised training methods built on :class:`lit_methods.ImageClassifier`."""

from lit_methods.supervised.multi_sample_dropout import MultiSampleDropoutClassifier, multi_sample_loss

__all__ = ["MultiSampleDropoutClassifier", "multi_sample_loss"]
