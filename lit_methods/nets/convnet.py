"""ConvNet-D, the standard backbone of dataset distillation and condensation.

Gidaris & Komodakis, "Dynamic Few-Shot Visual Learning without Forgetting", https://arxiv.org/abs/1804.09458
(the architecture); used with instance norm by Zhao et al., "Dataset Condensation with Gradient Matching",
https://arxiv.org/abs/2006.05929, and its successors (DSA, DM, MTT). ``depth`` blocks of
[Conv3x3(width, padding 1) -> norm -> ReLU -> AvgPool 2x2], then flatten and a linear classifier.
ConvNet-3 is used for 32x32 images and ConvNet-4 (``depth=4``) for 64x64 images.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from .base import Backbone, check_choice, check_int, group_count
from .registry import register_net

CONVNET_NORMS = ("instancenorm", "batchnorm", "groupnorm", "none")


def make_convnet_norm(norm: str, channels: int) -> nn.Module:
    """The norm layer of a ConvNet block.

    ``"instancenorm"`` is ``GroupNorm(channels, channels, affine=True)``, as in the dataset-condensation code
    (unlike ``nn.InstanceNorm2d`` it has per-channel affine parameters and no running statistics);
    ``"groupnorm"`` uses up to 32 groups (the largest divisor of ``channels`` not above 32).
    """
    check_choice("norm", norm, CONVNET_NORMS)
    if norm == "instancenorm":
        return nn.GroupNorm(channels, channels, affine=True)
    if norm == "batchnorm":
        return nn.BatchNorm2d(channels)
    if norm == "groupnorm":
        return nn.GroupNorm(group_count(channels), channels, affine=True)
    return nn.Identity()


class ConvNet(Backbone):
    """ConvNet-``depth`` of the dataset-condensation literature (Zhao et al., https://arxiv.org/abs/2006.05929).

    The classifier input size is ``width * (H // 2**depth) * (W // 2**depth)`` with ``(H, W) = image_size``:
    each 2x2 average pool floors odd sizes, like ``nn.AvgPool2d`` (e.g. 28 -> 14 -> 7 -> 3 for depth 3),
    so the net only accepts inputs of exactly ``image_size``. Weights keep PyTorch's default init, as in
    the reference implementations, so randomly initialised nets match those used by distillation methods.

    Args:
        num_classes: classifier outputs; 0 removes the classifier (``forward`` returns flattened features).
        in_channels: input image channels.
        depth: number of conv blocks.
        width: channels of every conv.
        norm: ``"instancenorm"`` (default), ``"batchnorm"``, ``"groupnorm"`` or ``"none"``.
        image_size: input height and width (an int for square images).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        depth: int = 3,
        width: int = 128,
        norm: Literal["instancenorm", "batchnorm", "groupnorm", "none"] = "instancenorm",
        image_size: int | tuple[int, int] = 32,
    ) -> None:
        super().__init__(num_classes, in_channels)
        check_int("depth", depth, minimum=1)
        check_int("width", width, minimum=1)
        check_choice("norm", norm, CONVNET_NORMS)
        image_height, image_width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        check_int("image height", image_height, minimum=1)
        check_int("image width", image_width, minimum=1)
        pooled_height, pooled_width = image_height // 2**depth, image_width // 2**depth
        if pooled_height == 0 or pooled_width == 0:
            raise ValueError(f"image_size {image_size!r} is too small for {depth} 2x2 poolings.")
        self.depth = depth
        self.width = width
        self.image_size = (image_height, image_width)

        layers: list[nn.Module] = []
        channels = in_channels
        for _ in range(depth):
            layers += [
                nn.Conv2d(channels, width, kernel_size=3, padding=1),
                make_convnet_norm(norm, width),
                nn.ReLU(),
                nn.AvgPool2d(kernel_size=2, stride=2),
            ]
            channels = width
        self.features = nn.Sequential(*layers)
        self.num_features = width * pooled_height * pooled_width
        self.reset_classifier(num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.features(x), 1)


@register_net("convnet3")
def convnet3(**kwargs: Any) -> ConvNet:
    """ConvNet-3 for 32x32 images (Zhao et al., https://arxiv.org/abs/2006.05929); kwargs go to ``ConvNet``."""
    return ConvNet(**({"depth": 3, "image_size": 32} | kwargs))


@register_net("convnet4")
def convnet4(**kwargs: Any) -> ConvNet:
    """ConvNet-4 for 64x64 images (Zhao et al., https://arxiv.org/abs/2006.05929); kwargs go to ``ConvNet``."""
    return ConvNet(**({"depth": 4, "image_size": 64} | kwargs))
