"""torchvision (v2) transform builders: the per-sample counterpart of :class:`lit_methods.datamodules.fast.BatchAugment`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.transforms import v2

from lit_methods.datamodules.fast import cutout
from lit_methods.datamodules.ssl_views import validate_color_jitter, validate_scale

__all__ = [
    "PAPER_MAGNITUDE_LEVELS",
    "Cutout",
    "MultiView",
    "build_eval_transforms",
    "build_ssl_view_transforms",
    "build_train_transforms",
    "randaugment",
    "tensor_ops",
]


class Cutout(nn.Module):
    """Fill a ``size`` x ``size`` square with a uniformly drawn centre, clipped at the border, with ``fill``.

    DeVries & Taylor, "Improved Regularization of Convolutional Neural Networks with Cutout", arXiv:1708.04552.
    The paper's code zeroes the normalized tensor, so the square holds the dataset mean: on normalized images keep
    ``fill=(0.0,)``, on [0, 1] pixels pass the per-channel mean.
    """

    def __init__(self, size: int, fill: Sequence[float] = (0.0,)) -> None:
        super().__init__()
        if size < 1:
            raise ValueError(f"cutout size must be >= 1, got {size}")
        self.size = size
        self.fill = tuple(float(value) for value in fill)

    def forward(self, image: Tensor) -> Tensor:
        h, w = image.shape[-2:]
        cy = torch.randint(0, h, (1,))
        cx = torch.randint(0, w, (1,))
        return cutout(image.unsqueeze(0), cy, cx, self.size, self.fill).squeeze(0)


PAPER_MAGNITUDE_LEVELS = 10
"""RandAugment's magnitude scale in the paper: M in [0, 10], a fraction M / 10 of each op's maximum."""


def randaugment(num_ops: int, magnitude: int) -> v2.RandAugment:
    """RandAugment (Cubuk et al. 2020, arXiv:1909.13719) with the paper's 0-10 magnitude scale.

    torchvision's ``RandAugment`` maps ``magnitude`` to ``linspace(0, max, num_magnitude_bins)[magnitude]``; 11 bins
    make its M the paper's M (the default 31 bins would make M = 9 a third of the paper's strength).
    """
    if num_ops < 0:
        raise ValueError(f"RandAugment num_ops must be >= 0, got {num_ops}")
    if not 0 <= magnitude <= PAPER_MAGNITUDE_LEVELS:
        raise ValueError(
            f"RandAugment magnitude must lie in [0, {PAPER_MAGNITUDE_LEVELS}] (paper scale), got {magnitude}"
        )
    return v2.RandAugment(num_ops=num_ops, magnitude=magnitude, num_magnitude_bins=PAPER_MAGNITUDE_LEVELS + 1)


def build_train_transforms(
    mean: Sequence[float],
    std: Sequence[float],
    image_size: tuple[int, int],
    crop_padding: int = 4,
    horizontal_flip: bool = True,
    cutout_size: int = 0,
    randaugment_num_ops: int = 0,
    randaugment_magnitude: int = 9,
    normalize: bool = True,
) -> Callable:
    """PIL image -> float tensor: crop, flip, then RandAugment on the image (``randaugment_num_ops`` > 0), then
    normalization (unless ``normalize=False``: [0, 1] pixels) and Cutout, the CIFAR order of AutoAugment/RandAugment.
    Cutout fills with the dataset mean either way (0 after normalization, ``mean`` in pixels). Without RandAugment
    the random ops are those of :class:`~lit_methods.datamodules.fast.BatchAugment`, with the same distribution."""
    ops: list[Callable] = []
    if crop_padding:
        ops.append(v2.RandomCrop(image_size, padding=crop_padding, fill=0))
    if horizontal_flip:
        ops.append(v2.RandomHorizontalFlip())
    if randaugment_num_ops:
        ops.append(randaugment(randaugment_num_ops, randaugment_magnitude))
    ops += tensor_ops(mean, std, normalize)
    if cutout_size:
        ops.append(Cutout(cutout_size, fill=(0.0,) if normalize else mean))
    return v2.Compose(ops)


def tensor_ops(mean: Sequence[float], std: Sequence[float], normalize: bool = True) -> list[Callable]:
    """PIL image -> ``float32`` tensor in [0, 1], then ``Normalize(mean, std)`` when ``normalize``."""
    ops: list[Callable] = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    return ops + [v2.Normalize(list(mean), list(std))] if normalize else ops


class MultiView:
    """Apply ``transform`` ``num_views`` times to one image, then ``local_transform`` ``num_local_views`` times:
    the views of self-supervised methods, global views first (multi-crop: Caron et al. 2020, "Unsupervised Learning
    of Visual Features by Contrasting Cluster Assignments", arXiv:2006.09882)."""

    def __init__(
        self,
        transform: Callable,
        num_views: int = 2,
        local_transform: Callable | None = None,
        num_local_views: int = 0,
    ) -> None:
        if num_views < 2:
            raise ValueError(f"num_views must be >= 2, got {num_views}")
        if num_local_views < 0:
            raise ValueError(f"num_local_views must be >= 0, got {num_local_views}")
        if (local_transform is None) != (num_local_views == 0):
            raise ValueError(
                f"num_local_views={num_local_views} and local_transform={local_transform!r}: give both or neither"
            )
        self.transform = transform
        self.num_views = num_views
        self.local_transform = local_transform
        self.num_local_views = num_local_views

    def __call__(self, image: Any) -> list[Tensor]:
        views = [self.transform(image) for _ in range(self.num_views)]
        if self.local_transform is not None:
            views += [self.local_transform(image) for _ in range(self.num_local_views)]
        return views


def build_ssl_view_transforms(
    mean: Sequence[float],
    std: Sequence[float],
    image_size: tuple[int, int],
    min_scale: float = 0.08,
    max_scale: float = 1.0,
    normalize: bool = True,
    color_jitter: Sequence[float] = (0.4, 0.4, 0.4, 0.1),
) -> Callable:
    """One SimCLR view for CIFAR-sized images (Chen et al. 2020, arXiv:2002.05709, appendix B.9): random resized
    crop to ``image_size`` covering ``min_scale`` to ``max_scale`` of the area, flip, colour jitter
    ``color_jitter`` = (brightness, contrast, saturation, hue), SimCLR's (0.4, 0.4, 0.4, 0.1) by default, with
    p = 0.8, grayscale with p = 0.2, normalization (unless ``normalize=False``: [0, 1] pixels). The per-image
    counterpart of :class:`lit_methods.datamodules.ssl_views.SSLViewAugment`; a multi-crop local view is this with a
    small ``image_size``."""
    validate_scale("(min_scale, max_scale)", (min_scale, max_scale))
    validate_color_jitter("color_jitter", color_jitter)
    return v2.Compose(
        [
            v2.RandomResizedCrop(image_size, scale=(min_scale, max_scale), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomApply([v2.ColorJitter(*color_jitter)], p=0.8),
            v2.RandomGrayscale(p=0.2),
            *tensor_ops(mean, std, normalize),
        ]
    )


def build_eval_transforms(mean: Sequence[float], std: Sequence[float], normalize: bool = True) -> Callable:
    """PIL image -> normalized float tensor (``normalize=False``: [0, 1] pixels), no randomness."""
    return v2.Compose(tensor_ops(mean, std, normalize))
