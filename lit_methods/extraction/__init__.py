"""Model extraction: data-free stealing of black-box classifiers."""

from lit_methods.extraction.cabage import BlackBoxVictim, CaBaGe, DataFreeDataModule, ImageGenerator, select_balanced_hard

__all__ = ["BlackBoxVictim", "CaBaGe", "DataFreeDataModule", "ImageGenerator", "select_balanced_hard"]
