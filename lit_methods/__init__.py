"""lit-methods: recent CIFAR-evaluated research methods as PyTorch Lightning modules, datamodules and callbacks."""

from lit_methods.base import ImageClassifier

__all__ = ["ImageClassifier"]
__version__ = "0.1.0"
