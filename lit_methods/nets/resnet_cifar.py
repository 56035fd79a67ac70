"""ResNet-18/34/50 in the CIFAR form: 3x3 stride-1 stem and no max-pool.

He et al., "Deep Residual Learning for Image Recognition", https://arxiv.org/abs/1512.03385.
The 32x32 adaptation (used by most CIFAR papers) keeps the ImageNet stages, widths 64-512 and
1x1-conv projection shortcuts, but replaces the 7x7/2 stem and max-pool by one 3x3/1 conv.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from .base import (
    NORMS,
    Backbone,
    NormName,
    check_choice,
    check_int,
    global_avg_pool,
    init_conv_and_norm,
    make_norm,
)
from .registry import register_net

STAGE_WIDTHS = (64, 128, 256, 512)
BLOCK_TYPES = ("basic", "bottleneck")


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection through ``shortcut`` (He et al. 2016, Fig. 2)."""

    expansion = 1

    def __init__(self, in_channels: int, width: int, stride: int, norm: str, shortcut: nn.Module) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, width, stride)
        self.norm1 = make_norm(norm, width)
        self.conv2 = conv3x3(width, width)
        self.norm2 = make_norm(norm, width)
        self.shortcut = shortcut
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()  # modules, so hooks (dead-neuron rates) can observe them

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand by 4 (He et al. 2016, Fig. 5); stride on the 3x3 conv."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int, norm: str, shortcut: nn.Module) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = conv1x1(in_channels, width)
        self.norm1 = make_norm(norm, width)
        self.conv2 = conv3x3(width, width, stride)
        self.norm2 = make_norm(norm, width)
        self.conv3 = conv1x1(width, out_channels)
        self.norm3 = make_norm(norm, out_channels)
        self.shortcut = shortcut
        self.relu1, self.relu2, self.relu3 = nn.ReLU(), nn.ReLU(), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.norm1(self.conv1(x)))
        out = self.relu2(self.norm2(self.conv2(out)))
        out = self.norm3(self.conv3(out))
        return self.relu3(out + self.shortcut(x))


def projection_shortcut(in_channels: int, out_channels: int, stride: int, norm: str) -> nn.Module:
    """Identity when shapes match, else a 1x1 conv + norm projection (shortcut option B of He et al.)."""
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return nn.Sequential(conv1x1(in_channels, out_channels, stride), make_norm(norm, out_channels))


class CifarResNet(Backbone):
    """CIFAR ResNet with four stages of widths 64/128/256/512 (He et al. 2016, https://arxiv.org/abs/1512.03385).

    Args:
        num_classes: classifier outputs; 0 removes the classifier (``forward`` returns pooled features).
        in_channels: input image channels.
        block: ``"basic"`` (ResNet-18/34) or ``"bottleneck"`` (ResNet-50 and deeper).
        blocks_per_stage: number of blocks in each of the four stages.
        norm: ``"batchnorm"`` or ``"groupnorm"``.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        block: Literal["basic", "bottleneck"] = "basic",
        blocks_per_stage: Sequence[int] = (2, 2, 2, 2),
        norm: NormName = "batchnorm",
    ) -> None:
        super().__init__(num_classes, in_channels)
        check_choice("block", block, BLOCK_TYPES)
        if len(blocks_per_stage) != len(STAGE_WIDTHS):
            raise ValueError(f"blocks_per_stage needs {len(STAGE_WIDTHS)} entries, got {blocks_per_stage!r}.")
        for count in blocks_per_stage:
            check_int("blocks_per_stage entry", count, minimum=1)
        check_choice("norm", norm, NORMS)
        block_class = BasicBlock if block == "basic" else Bottleneck

        self.stem = nn.Sequential(conv3x3(in_channels, STAGE_WIDTHS[0]), make_norm(norm, STAGE_WIDTHS[0]), nn.ReLU())
        channels = STAGE_WIDTHS[0]
        stages: list[nn.Module] = []
        for stage_index, (width, count) in enumerate(zip(STAGE_WIDTHS, blocks_per_stage)):
            blocks: list[nn.Module] = []
            for block_index in range(count):
                stride = 2 if stage_index > 0 and block_index == 0 else 1
                out_channels = width * block_class.expansion
                shortcut = projection_shortcut(channels, out_channels, stride, norm)
                blocks.append(block_class(channels, width, stride, norm, shortcut))
                channels = out_channels
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        init_conv_and_norm(self)
        self.num_features = channels
        self.reset_classifier(num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return global_avg_pool(self.stages(self.stem(x)))


@register_net("resnet18")
class ResNet18(CifarResNet):
    """CIFAR ResNet-18: basic blocks [2, 2, 2, 2] (He et al. 2016, https://arxiv.org/abs/1512.03385)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, norm: NormName = "batchnorm") -> None:
        super().__init__(num_classes, in_channels, block="basic", blocks_per_stage=(2, 2, 2, 2), norm=norm)


@register_net("resnet34")
class ResNet34(CifarResNet):
    """CIFAR ResNet-34: basic blocks [3, 4, 6, 3] (He et al. 2016, https://arxiv.org/abs/1512.03385)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, norm: NormName = "batchnorm") -> None:
        super().__init__(num_classes, in_channels, block="basic", blocks_per_stage=(3, 4, 6, 3), norm=norm)


@register_net("resnet50")
class ResNet50(CifarResNet):
    """CIFAR ResNet-50: bottleneck blocks [3, 4, 6, 3] (He et al. 2016, https://arxiv.org/abs/1512.03385)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, norm: NormName = "batchnorm") -> None:
        super().__init__(num_classes, in_channels, block="bottleneck", blocks_per_stage=(3, 4, 6, 3), norm=norm)
