"""lit-methods: recent CIFAR-evaluated research methods as PyTorch Lightning modules, datamodules and callbacks."""

from lit_methods.base import ImageClassifier, MethodBase

__all__ = ["ImageClassifier", "MethodBase"]
__version__ = "0.1.0"
