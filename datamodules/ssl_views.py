"""Self-supervised views of a whole ``uint8`` batch, built on the batch's device without a per-image loop.

:class:`SSLViewAugment` is the fast-path counterpart of :func:`lit_methods.datamodules.transforms.build_ssl_view_transforms`
(SimCLR, Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual Representations",
arXiv:2002.05709) wrapped in :class:`lit_methods.datamodules.transforms.MultiView`, including multi-crop (Caron et al. 2020,
"Unsupervised Learning of Visual Features by Contrasting Cluster Assignments", arXiv:2006.09882). Every random
parameter is drawn on a seeded CPU :class:`torch.Generator` (as :class:`lit_methods.datamodules.fast.BatchAugment` does) and the
ops then run on the batch's device with per-sample parameters:

* random resized crop + horizontal flip: one pair of per-sample interpolation matrices per view, applied as two
  batched matrix products. The matrices hold the weights of ``torch.nn.functional.interpolate(mode="bilinear",
  antialias=True)`` restricted to the crop, so each view equals torchvision's ``resized_crop`` of the same box (float
  tensors) up to rounding, downscaled local crops included; the flip reverses the column matrix. The boxes follow
  torchvision's ``RandomResizedCrop.get_params`` (10 attempts, then the centre-crop fallback).
* colour jitter with probability 0.8: brightness, contrast, saturation and hue with per-sample factors, in a
  per-sample random order, as torchvision's ``ColorJitter`` (which permutes the four ops on every call). Keeping the
  random order keeps the fast path's view distribution that of the torchvision path; it costs index gathers only
  (at each of the 4 steps every op runs on the samples that drew it there).
* random grayscale (p = 0.2). The views are [0, 1] pixels: normalization is the datamodule's separate step.

torchvision's functional colour ops take one factor per call, hence the per-sample versions below (each tested
against the torchvision op applied image by image).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "GRAYSCALE_WEIGHTS",
    "SSLViewAugment",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "resized_crop",
    "rgb_to_grayscale",
    "sample_resized_crop_boxes",
]

GRAYSCALE_WEIGHTS = (0.2989, 0.587, 0.114)
"""ITU-R 601-2 luma weights, those of torchvision's ``rgb_to_grayscale`` on tensors."""


def sample_resized_crop_boxes(
    num: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator,
    attempts: int = 10,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``num`` boxes ``(top, left, box_height, box_width)`` (``int64``) drawn like torchvision's
    ``RandomResizedCrop.get_params``: area fraction uniform in ``scale``, log aspect ratio (w / h) uniform in
    ``log(ratio)``, sides rounded; the first of ``attempts`` draws that fits the image is kept, with a uniform
    position; a sample whose draws all fail gets the central crop of the image clamped to ``ratio``."""
    area = height * width
    fraction = torch.empty(num, attempts).uniform_(scale[0], scale[1], generator=generator)
    log_aspect = torch.empty(num, attempts).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = log_aspect.exp()
    target = area * fraction
    box_w = (target * aspect).sqrt().round().long()
    box_h = (target / aspect).sqrt().round().long()
    fits = (box_w > 0) & (box_w <= width) & (box_h > 0) & (box_h <= height)
    first = fits.int().argmax(1, keepdim=True)  # first fitting attempt (0 when none fits; replaced below)
    box_h, box_w = box_h.gather(1, first).squeeze(1), box_w.gather(1, first).squeeze(1)
    position = torch.rand(num, 2, generator=generator)
    top = (position[:, 0] * (height - box_h + 1)).floor().long()
    left = (position[:, 1] * (width - box_w + 1)).floor().long()
    failed = ~fits.any(1)
    if failed.any():
        fallback_h, fallback_w = _central_box(height, width, ratio)
        box_h[failed], box_w[failed] = fallback_h, fallback_w
        top[failed], left[failed] = (height - fallback_h) // 2, (width - fallback_w) // 2
    return top, left, box_h, box_w


def _central_box(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int]:
    """torchvision's fallback box: the whole image, cut to the nearest aspect ratio inside ``ratio``."""
    if width / height < min(ratio):
        return round(width / min(ratio)), width
    if width / height > max(ratio):
        return height, round(height * max(ratio))
    return height, width


def _interpolation_matrix(start: Tensor, length: Tensor, in_size: int, out_size: int) -> Tensor:
    """``(N, out_size, in_size)`` weights resizing the segment ``[start, start + length)`` of each row to
    ``out_size`` samples, as ``interpolate(mode="bilinear", antialias=True, align_corners=False)`` along one axis:
    a triangle filter of half-width ``max(length / out_size, 1)`` centred at ``start + (o + 0.5) * length / out_size``,
    restricted to the segment and normalized to sum 1."""
    step = (length.to(torch.float32) / out_size).view(-1, 1, 1)
    centre = step * (torch.arange(out_size, dtype=torch.float32).view(1, -1, 1) + 0.5)
    offset = torch.arange(in_size, dtype=torch.float32).view(1, 1, -1) - start.view(-1, 1, 1)
    weights = (1 - ((offset + 0.5 - centre) / step.clamp(min=1.0)).abs()).clamp(min=0.0)
    weights = weights * ((offset >= 0) & (offset < length.view(-1, 1, 1)))
    return weights / weights.sum(-1, keepdim=True)


def resized_crop(
    images: Tensor,
    top: Tensor,
    left: Tensor,
    box_height: Tensor,
    box_width: Tensor,
    size: tuple[int, int],
    flip: Tensor | None = None,
) -> Tensor:
    """Crop box ``i`` out of float image ``i`` and resize it to ``size`` (bilinear, antialiased), then flip it
    horizontally where ``flip[i]``. Box and flip tensors live on the CPU; the images on any device."""
    height, width = images.shape[-2:]
    rows = _interpolation_matrix(top, box_height, height, size[0])
    cols = _interpolation_matrix(left, box_width, width, size[1])
    if flip is not None:
        cols = torch.where(flip.view(-1, 1, 1), cols.flip(1), cols)
    device = images.device
    rows = rows.to(device, images.dtype, non_blocking=True).unsqueeze(1)
    cols = cols.to(device, images.dtype, non_blocking=True).unsqueeze(1)
    return rows @ images @ cols.transpose(-1, -2)


def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    return values.to(like.device, like.dtype, non_blocking=True).view(-1, 1, 1, 1)


def _blend(images: Tensor, other: Tensor | float, factors: Tensor) -> Tensor:
    """``factor * images + (1 - factor) * other`` clamped to [0, 1], one factor per sample (torchvision's order)."""
    factors = _per_sample(factors, images)
    return (images * factors).add_(other * (1.0 - factors)).clamp_(0.0, 1.0)


def rgb_to_grayscale(images: Tensor) -> Tensor:
    """``(N, 3, H, W)`` -> ``(N, 1, H, W)`` luma with :data:`GRAYSCALE_WEIGHTS`; 1-channel images pass through."""
    if images.shape[1] == 1:
        return images
    r, g, b = images.unbind(1)
    wr, wg, wb = GRAYSCALE_WEIGHTS
    return (r * wr + g * wg + b * wb).unsqueeze(1)


def adjust_brightness(images: Tensor, factors: Tensor) -> Tensor:
    """Scale float images in [0, 1] by a per-sample factor, clamped to [0, 1]."""
    return _blend(images, 0.0, factors)


def adjust_contrast(images: Tensor, factors: Tensor) -> Tensor:
    """Blend each image with the mean of its grayscale version, per-sample factor (1 keeps the image)."""
    mean = rgb_to_grayscale(images).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(images, mean, factors)


def adjust_saturation(images: Tensor, factors: Tensor) -> Tensor:
    """Blend each image with its grayscale version, per-sample factor; 1-channel images are returned unchanged."""
    if images.shape[1] == 1:
        return images
    return _blend(images, rgb_to_grayscale(images), factors)


def adjust_hue(images: Tensor, shifts: Tensor) -> Tensor:
    """Rotate the hue of each image by ``shifts[i]`` (a fraction of a turn, in [-0.5, 0.5]) in HSV space;
    1-channel images are returned unchanged."""
    if images.shape[1] == 1:
        return images
    value, _ = images.max(1, keepdim=True)
    chroma = value - images.min(1, keepdim=True).values
    saturation = chroma / value.clamp(min=torch.finfo(images.dtype).tiny)
    r, g, b = images.unbind(1)
    safe_chroma = chroma.squeeze(1).clamp(min=torch.finfo(images.dtype).tiny)
    # hue in sextants [0, 6): red is the max -> (g - b) / c, green -> 2 + (b - r) / c, blue -> 4 + (r - g) / c
    sextant = torch.where(
        value.squeeze(1) == r,
        (g - b) / safe_chroma,
        torch.where(value.squeeze(1) == g, 2.0 + (b - r) / safe_chroma, 4.0 + (r - g) / safe_chroma),
    )
    sextant = torch.where(chroma.squeeze(1) > 0, sextant, 0.0)
    sextant = (sextant + 6.0 * _per_sample(shifts, images).squeeze(1)).remainder(6.0).unsqueeze(1)
    # back to RGB: channel n (R: 5, G: 3, B: 1) is v - v * s * clamp(min(k, 4 - k), 0, 1), k = (n + hue) mod 6
    channel_offsets = torch.tensor([5.0, 3.0, 1.0], device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    k = (channel_offsets + sextant).remainder(6.0)
    return value - value * saturation * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)


_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


class SSLViewAugment:
    """Multi-view SimCLR/multi-crop augmentation of a ``uint8`` ``(N, C, H, W)`` batch on its own device.

    Returns ``[global_1, ..., global_g, local_1, ..., local_l]``: global views keep the input's ``H x W``, local
    views are ``local_size x local_size``. Each view: random resized crop (``ratio`` 3/4 to 4/3) and horizontal
    flip (p = 0.5), colour jitter (``color_jitter``) with p = 0.8 in a per-sample random order, grayscale with
    p = 0.2; ``float32`` pixels in [0, 1] (the datamodule normalizes them as a separate step); the same distribution as
    :func:`lit_methods.datamodules.transforms.build_ssl_view_transforms` before its normalization. Every random
    parameter is drawn from :attr:`generator`, a CPU ``torch.Generator`` (the datamodule re-seeds it every epoch).

    Args:
        global_views: number of full-size views (>= 2).
        local_views: number of small multi-crop views (0: none).
        local_size: side of the local views (required when ``local_views > 0``).
        global_scale: area fraction range of the global crops.
        local_scale: area fraction range of the local crops.
        color_jitter: strengths ``(brightness, contrast, saturation, hue)`` as torchvision's ``ColorJitter``
            takes them: factors uniform in ``[1 - s, 1 + s]`` (each ``s`` in [0, 1]) and a hue shift uniform in
            ``[-h, h]`` (``h`` in [0, 0.5]); SimCLR's (0.4, 0.4, 0.4, 0.1) by default, solo-learn's CIFAR recipes
            use saturation 0.2.
        seed: seed of the CPU generator that draws all random parameters.
    """

    ratio = (3 / 4, 4 / 3)
    jitter_p = 0.8
    grayscale_p = 0.2

    def __init__(
        self,
        global_views: int = 2,
        local_views: int = 0,
        local_size: int | None = None,
        global_scale: tuple[float, float] = (0.08, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.14),
        color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1),
        seed: int = 0,
    ) -> None:
        validate_view_counts(global_views, local_views, local_size)
        validate_scale("global_scale", global_scale)
        validate_scale("local_scale", local_scale)
        validate_color_jitter("color_jitter", color_jitter)
        self.global_views = global_views
        self.local_views = local_views
        self.local_size = local_size
        self.global_scale = tuple(global_scale)
        self.local_scale = tuple(local_scale)
        self.color_jitter = tuple(color_jitter)
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, images: Tensor) -> list[Tensor]:
        """The views of a ``uint8`` ``(N, C, H, W)`` batch (1 or 3 channels), global views first, each a new
        ``float32`` tensor of [0, 1] pixels."""
        if images.dtype != torch.uint8:
            raise ValueError(f"SSLViewAugment takes uint8 images, got {images.dtype}")
        if images.shape[1] not in (1, 3):
            raise ValueError(f"SSLViewAugment takes 1- or 3-channel images, got {images.shape[1]} channels")
        height, width = images.shape[-2:]
        unit = images.to(torch.float32) / 255.0
        global_size = (height, width)
        views = [self.view(unit, global_size, self.global_scale) for _ in range(self.global_views)]
        if self.local_views:
            local_size = (self.local_size, self.local_size)
            views += [self.view(unit, local_size, self.local_scale) for _ in range(self.local_views)]
        return views

    def view(self, images: Tensor, size: tuple[int, int], scale: tuple[float, float]) -> Tensor:
        """One augmented view of float images in [0, 1]."""
        n, _, height, width = images.shape
        return self.apply(images, self.draw(n, height, width, scale), size)

    def draw(self, batch_size: int, height: int, width: int, scale: tuple[float, float]) -> dict[str, Tensor]:
        """Random parameters of one view of a batch, drawn on the CPU generator (same order on every device):
        crop boxes, flips, which samples get colour jitter, the four jitter factors (brightness, contrast,
        saturation, hue), each sample's order of the four jitter ops, and which samples turn grayscale."""
        g, n = self.generator, batch_size
        top, left, box_h, box_w = sample_resized_crop_boxes(n, height, width, scale, self.ratio, g)
        b, c, s, h = self.color_jitter
        return {
            "top": top,
            "left": left,
            "box_height": box_h,
            "box_width": box_w,
            "flip": torch.rand(n, generator=g) < 0.5,
            "jitter": torch.rand(n, generator=g) < self.jitter_p,
            "factors": torch.stack(
                [
                    torch.empty(n).uniform_(1 - b, 1 + b, generator=g),
                    torch.empty(n).uniform_(1 - c, 1 + c, generator=g),
                    torch.empty(n).uniform_(1 - s, 1 + s, generator=g),
                    torch.empty(n).uniform_(-h, h, generator=g),
                ],
                dim=1,
            ),
            "order": torch.rand(n, len(_JITTER_OPS), generator=g).argsort(1),  # a uniform permutation per sample
            "grayscale": torch.rand(n, generator=g) < self.grayscale_p,
        }

    def apply(self, images: Tensor, params: dict[str, Tensor], size: tuple[int, int]) -> Tensor:
        """The view of float images in [0, 1] given by :meth:`draw`'s parameters, resized to ``size``."""
        out = resized_crop(
            images, params["top"], params["left"], params["box_height"], params["box_width"], size, params["flip"]
        )
        for step in range(len(_JITTER_OPS)):
            for op_index, op in enumerate(_JITTER_OPS):
                # indices are found on the CPU, so a GPU batch needs no device-to-host sync
                chosen = (params["jitter"] & (params["order"][:, step] == op_index)).nonzero().squeeze(1)
                if len(chosen):
                    on_device = chosen.to(out.device, non_blocking=True)
                    out[on_device] = op(out[on_device], params["factors"][chosen, op_index])
        if out.shape[1] == 3:
            gray = params["grayscale"].to(out.device, non_blocking=True).view(-1, 1, 1, 1)
            out = torch.where(gray, rgb_to_grayscale(out), out)
        return out


def validate_view_counts(global_views: int, local_views: int, local_size: int | None) -> None:
    """Raise ``ValueError`` naming the bad value for an invalid multi-crop view configuration."""
    if global_views < 2:
        raise ValueError(f"the number of global views must be >= 2, got {global_views}")
    if local_views < 0:
        raise ValueError(f"the number of local views must be >= 0, got {local_views}")
    if local_views and local_size is None:
        raise ValueError(f"{local_views} local views need a local view size")
    if local_size is not None and not local_views:
        raise ValueError(f"a local view size ({local_size}) was given without local views")
    if local_size is not None and local_size < 1:
        raise ValueError(f"the local view size must be >= 1, got {local_size}")


def validate_scale(name: str, scale: Sequence[float]) -> None:
    """Raise ``ValueError`` unless ``scale`` is a pair ``0 < low <= high <= 1``."""
    if len(scale) != 2 or not 0.0 < scale[0] <= scale[1] <= 1.0:
        raise ValueError(f"{name} must be a pair 0 < low <= high <= 1, got {tuple(scale)}")


def validate_color_jitter(name: str, strengths: Sequence[float]) -> None:
    """Refuse colour-jitter strengths other than four numbers ``(brightness, contrast, saturation, hue)`` with the
    first three in [0, 1] and the hue in [0, 0.5] (the ranges where both augmentation paths draw the same factors)."""
    if len(strengths) != 4:
        raise ValueError(f"{name} must be (brightness, contrast, saturation, hue), got {tuple(strengths)}")
    if not (all(0.0 <= value <= 1.0 for value in strengths[:3]) and 0.0 <= strengths[3] <= 0.5):
        raise ValueError(
            f"{name} needs brightness, contrast and saturation in [0, 1] and hue in [0, 0.5], got {tuple(strengths)}"
        )
