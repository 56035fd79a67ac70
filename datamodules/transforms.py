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
    "PaperScaleRandAugment",
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
"""RandAugment's magnitude scale in the paper: M / 10 of each op's maximum (M = 10: the maximum; larger M, such as
CIFAR-100's (N, M) = (2, 14), extrapolates linearly)."""


def _paper_scale(maximum: float) -> Callable[[int, int, int], Tensor]:
    """Magnitudes ``M / 10 * maximum`` for ``M = 0 .. num_bins - 1``."""
    return lambda num_bins, height, width: torch.arange(num_bins) * (maximum / PAPER_MAGNITUDE_LEVELS)


def _paper_scale_translate(fraction: float, axis: str) -> Callable[[int, int, int], Tensor]:
    def magnitudes(num_bins: int, height: int, width: int) -> Tensor:
        return _paper_scale(fraction * (width if axis == "x" else height))(num_bins, height, width)

    return magnitudes


def _paper_scale_enhancement(num_bins: int, height: int, width: int) -> Tensor:
    return _paper_scale(0.9)(num_bins, height, width).clamp(max=1.0)


def _paper_scale_posterize_bits(num_bins: int, height: int, width: int) -> Tensor:
    """Bits kept: 8 at M = 0, 4 at M = 10 (torchvision's rounding), 0 from M = 20."""
    return (8 - _paper_scale(4.0)(num_bins, height, width).round()).clamp(min=0).int()


def _paper_scale_solarize_threshold(num_bins: int, height: int, width: int) -> Tensor:
    """Threshold (fraction of the pixel range): 1 at M = 0, 0 (every pixel inverted) from M = 10."""
    return (1.0 - _paper_scale(1.0)(num_bins, height, width)).clamp(min=0.0)


class PaperScaleRandAugment(v2.RandAugment):
    """torchvision's ``RandAugment`` (the same 14 ops, one uniformly drawn op at a time, random signs) with the
    paper's magnitude scale for any ``M >= 0``: each op's magnitude is ``M / 10`` of torchvision's maximum, so
    ``M <= 10`` gives exactly torchvision's ``linspace(0, max, 11)[M]`` and larger ``M`` extrapolates linearly
    (rotation 42 degrees at ``M = 14``). Two ops cannot extrapolate: the enhancement magnitudes (brightness,
    colour, contrast, sharpness; factor ``1 +- m``) stop at ``m = 1`` because a negative factor is undefined, and
    posterize keeps at least 0 bits. The magnitude table is torchvision's ``_AUGMENTATION_SPACE`` hook, the one its
    AutoAugment family subclasses override.

    Args:
        num_ops: number of ops applied to each image (the paper's N).
        magnitude: the paper's M.
    """

    _AUGMENTATION_SPACE = {
        "Identity": (lambda num_bins, height, width: None, False),
        "ShearX": (_paper_scale(0.3), True),
        "ShearY": (_paper_scale(0.3), True),
        "TranslateX": (_paper_scale_translate(150.0 / 331.0, "x"), True),
        "TranslateY": (_paper_scale_translate(150.0 / 331.0, "y"), True),
        "Rotate": (_paper_scale(30.0), True),
        "Brightness": (_paper_scale_enhancement, True),
        "Color": (_paper_scale_enhancement, True),
        "Contrast": (_paper_scale_enhancement, True),
        "Sharpness": (_paper_scale_enhancement, True),
        "Posterize": (_paper_scale_posterize_bits, False),
        "Solarize": (_paper_scale_solarize_threshold, False),
        "AutoContrast": (lambda num_bins, height, width: None, False),
        "Equalize": (lambda num_bins, height, width: None, False),
    }

    def __init__(self, num_ops: int, magnitude: int) -> None:
        if num_ops < 0:
            raise ValueError(f"RandAugment num_ops must be >= 0, got {num_ops}")
        if magnitude < 0:
            raise ValueError(
                f"RandAugment magnitude must be >= 0 (paper scale, 10 = each op's maximum), got {magnitude}"
            )
        num_magnitude_bins = max(magnitude, PAPER_MAGNITUDE_LEVELS) + 1
        super().__init__(num_ops=num_ops, magnitude=magnitude, num_magnitude_bins=num_magnitude_bins)


def randaugment(num_ops: int, magnitude: int) -> PaperScaleRandAugment:
    """RandAugment (Cubuk et al. 2020, arXiv:1909.13719) with the paper's magnitude scale: M / 10 of each op's
    maximum, M >= 0 (:class:`PaperScaleRandAugment`; torchvision's own ``RandAugment`` maps M to
    ``linspace(0, max, num_magnitude_bins)[M]``, so its default 31 bins would make M = 9 a third of the paper's
    strength, and no bin count reaches beyond the maximum)."""
    return PaperScaleRandAugment(num_ops=num_ops, magnitude=magnitude)


randaugment.slug = "randaugment"  # type: ignore[attr-defined]  # the registry entry it implements


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
