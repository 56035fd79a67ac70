"""A user's own training augments, given to a datamodule by class_path (the augment protocol of
``InMemoryVisionDataModule``)."""

from __future__ import annotations

import torch
from torch import Tensor


class ConstantPixels:
    """Replaces every training image by a constant image of ``value``, so its batches are recognisable; it has a
    ``generator`` (unused for drawing here) that the datamodule re-seeds every epoch."""

    def __init__(self, value: int = 200) -> None:
        if not 0 <= value <= 255:
            raise ValueError(f"value must be a uint8 pixel value in [0, 255], got {value}")
        self.value = value
        self.generator = torch.Generator()

    def __call__(self, images: Tensor) -> Tensor:
        return torch.full_like(images, self.value)


class NoisyViews:
    """Two views per image: the image plus or minus uniform noise of ``strength`` (in [0, 1] pixel units), drawn
    from its ``generator``."""

    def __init__(self, strength: float = 0.1, seed: int = 0) -> None:
        self.strength = strength
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, images: Tensor) -> list[Tensor]:
        pixels = images.float() / 255
        noise = torch.rand(pixels.shape, generator=self.generator).to(pixels.device) * self.strength
        return [(pixels + noise).clamp(0, 1), (pixels - noise).clamp(0, 1)]
