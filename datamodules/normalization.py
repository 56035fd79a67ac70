"""Normalization as its own step: ``(pixels - mean) / std`` for images in [0, 1].

It lives in the datamodule by default (the fast path normalizes after augmenting on the device). A datamodule built
with ``normalize=False`` yields [0, 1] pixels instead, and the model owns a :class:`Normalize` (methods that work in
pixel space: attacks, dataset distillation, diffusion, CrossMax).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["Normalize", "checked_normalization", "unit_pixels"]


def checked_normalization(mean: Sequence[float], std: Sequence[float]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` as float tuples, after checking they have as many channels and every std is positive."""
    if len(mean) != len(std):
        raise ValueError(f"mean has {len(mean)} channels but std has {len(std)}")
    if any(s <= 0 for s in std):
        raise ValueError(f"std must be positive, got {tuple(std)}")
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def unit_pixels(images: Tensor) -> Tensor:
    """``uint8`` images in [0, 255] as new ``float32`` pixels in [0, 1]; floating-point images (already in [0, 1])
    are returned as they are."""
    if images.dtype == torch.uint8:
        return images.to(torch.float32).div_(255.0)
    if not images.is_floating_point():
        raise ValueError(f"images must be uint8 in [0, 255] or floating point in [0, 1], got {images.dtype}")
    return images


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` of ``(N, C, H, W)`` images in [0, 1] units; :meth:`inverse` undoes it.

    ``uint8`` images are read as [0, 255] pixels and normalized to ``float32`` in one pass (``(x - 255 mean) /
    (255 std)``, the fast path's conversion).

    ``mean`` and ``std`` are non-persistent buffers: they follow the module's device and dtype but are not saved in
    state dicts (they are hyper-parameters, filled from the datamodule by the CLI).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        mean, std = checked_normalization(mean, std)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def _check(self, x: Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.mean.shape[1]:
            raise ValueError(f"expected (N, {self.mean.shape[1]}, H, W) images, got shape {tuple(x.shape)}")

    def forward(self, x: Tensor) -> Tensor:
        self._check(x)
        if x.dtype == torch.uint8:
            return x.to(torch.float32, copy=True).sub_(self.mean * 255.0).div_(self.std * 255.0)
        return (x - self.mean) / self.std

    def inverse(self, x: Tensor) -> Tensor:
        """Normalized images back to [0, 1] pixels."""
        self._check(x)
        return x * self.std + self.mean

    def extra_repr(self) -> str:
        return f"mean={tuple(self.mean.flatten().tolist())}, std={tuple(self.std.flatten().tolist())}"
