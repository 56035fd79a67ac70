"""scikit-learn's bundled handwritten digits (the UCI "Optical Recognition of Handwritten Digits" test set, Alpaydin &
Kaynak 1998): 1,797 8x8 grayscale images of the digits 0-9, small enough for smoke tests and CPU-only examples.

Needs scikit-learn (``pip install lit-methods[sklearn]``); the data ships with it, nothing is downloaded.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from lit_methods.datamodules.base import InMemoryVisionDataModule

__all__ = ["DigitsDataModule", "load_digits_uint8"]


def load_digits_uint8() -> tuple[Tensor, Tensor]:
    """All 1,797 digits as ``uint8`` ``(N, 1, 8, 8)`` images (values 0..16 mapped to ``round(v * 255 / 16)``) and
    ``int64`` labels, in scikit-learn's order."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(bunch.target.astype(np.int64))


class DigitsDataModule(InMemoryVisionDataModule):
    """scikit-learn's 8x8 digits with a seeded, stratified train/test split.

    Args:
        test_fraction: share of the 1,797 images held out as the test split, stratified by class and drawn with
            ``seed`` (scikit-learn's ``train_test_split``, so the test split has ``ceil(1797 * test_fraction)``
            images).
        crop_padding: defaults to 1 pixel: one pixel is already 1/8 of the image.
        horizontal_flip: defaults to ``False``: digits are not left-right symmetric (2, 3, 7, ...).
        **others: see :class:`~lit_methods.datamodules.base.InMemoryVisionDataModule`; ``data_dir`` and ``download`` are unused
            (the data ships with scikit-learn).
    """

    name: ClassVar[str] = "digits"
    num_classes = 10
    in_channels = 1
    image_size = (8, 8)
    # Mean and (population) standard deviation of every pixel of all 1,797 images of load_digits_uint8(), in [0, 1]:
    # images.float().div(255).mean() = 0.30531, .std(unbiased=False) = 0.37589.
    mean = (0.3053,)
    std = (0.3759,)

    def __init__(
        self, crop_padding: int = 1, horizontal_flip: bool = False, test_fraction: float = 0.25, **kwargs: Any
    ) -> None:
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
        self.test_fraction = test_fraction
        super().__init__(crop_padding=crop_padding, horizontal_flip=horizontal_flip, **kwargs)

    def load_split(self, train: bool) -> tuple[Tensor, Tensor]:
        from sklearn.model_selection import train_test_split

        images, labels = load_digits_uint8()
        train_idx, test_idx = train_test_split(
            np.arange(len(labels)), test_size=self.test_fraction, random_state=self.seed, stratify=labels.numpy()
        )
        keep = torch.from_numpy(np.sort(train_idx if train else test_idx))
        return images[keep], labels[keep]

    def download_split(self, train: bool) -> None:
        """Nothing to download: the digits ship with scikit-learn."""
