"""torchvision (v2) transform builders: the per-sample counterpart of :class:`datamodules.fast.BatchAugment`."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torchvision.transforms import v2

from datamodules.fast import cutout

__all__ = ["Cutout", "build_eval_transforms", "build_train_transforms"]


class Cutout(nn.Module):
    """Zero a ``size`` x ``size`` square with a uniformly drawn centre, clipped at the border.

    DeVries & Taylor, "Improved Regularization of Convolutional Neural Networks with Cutout", arXiv:1708.04552.
    Applied to the normalized tensor, as in the paper's code, so the square holds the dataset mean.
    """

    def __init__(self, size: int) -> None:
        super().__init__()
        if size < 1:
            raise ValueError(f"cutout size must be >= 1, got {size}")
        self.size = size

    def forward(self, image: Tensor) -> Tensor:
        h, w = image.shape[-2:]
        cy = torch.randint(0, h, (1,))
        cx = torch.randint(0, w, (1,))
        return cutout(image.unsqueeze(0), cy, cx, self.size).squeeze(0)


def build_train_transforms(
    mean: Sequence[float],
    std: Sequence[float],
    image_size: tuple[int, int],
    crop_padding: int = 4,
    horizontal_flip: bool = True,
    cutout_size: int = 0,
) -> Callable:
    """PIL image -> normalized float tensor with the same random ops as :class:`~datamodules.fast.BatchAugment`."""
    ops: list[Callable] = []
    if crop_padding:
        ops.append(v2.RandomCrop(image_size, padding=crop_padding, fill=0))
    if horizontal_flip:
        ops.append(v2.RandomHorizontalFlip())
    ops += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    if cutout_size:
        ops.append(Cutout(cutout_size))
    return v2.Compose(ops)


def build_eval_transforms(mean: Sequence[float], std: Sequence[float]) -> Callable:
    """PIL image -> normalized float tensor, no randomness."""
    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])
