"""The CIFAR-10 ResNets of He et al. 2016, Sec. 4.2: ResNet-20/32/44/56/110.

He et al., "Deep Residual Learning for Image Recognition", https://arxiv.org/abs/1512.03385.
A 3x3 conv with 16 filters, then three stages of ``n`` basic blocks on 16/32/64 channels (feature maps
32/16/8 on CIFAR), global average pooling and a linear classifier: ``depth = 6n + 2``. Shortcuts are
option A: identity, or stride-2 subsampling plus zero-padded extra channels when the shape changes,
so the shortcuts add no parameters.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

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
from .resnet_cifar import BasicBlock, conv3x3

STAGE_WIDTHS = (16, 32, 64)


class ZeroPadShortcut(nn.Module):
    """Parameter-free shortcut (option A): keep every ``stride``-th pixel, zero-pad the new channels evenly."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"out_channels ({out_channels}) must be >= in_channels ({in_channels}).")
        self.stride = stride
        self.pad_front = (out_channels - in_channels) // 2
        self.pad_back = out_channels - in_channels - self.pad_front

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        subsampled = x[:, :, :: self.stride, :: self.stride]
        return F.pad(subsampled, (0, 0, 0, 0, self.pad_front, self.pad_back))


class HeResNet(Backbone):
    """CIFAR ResNet of He et al. 2016, Sec. 4.2 (https://arxiv.org/abs/1512.03385), depth ``6n + 2``.

    Args:
        num_classes: classifier outputs; 0 removes the classifier (``forward`` returns pooled features).
        in_channels: input image channels.
        depth: total number of weighted layers, ``6n + 2`` (20, 32, 44, 56, 110, ...).
        norm: ``"batchnorm"`` (as in the paper) or ``"groupnorm"``.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        depth: int = 20,
        norm: NormName = "batchnorm",
    ) -> None:
        super().__init__(num_classes, in_channels)
        check_int("depth", depth, minimum=8)
        if (depth - 2) % 6 != 0:
            raise ValueError(f"depth must be 6n + 2 (20, 32, 44, 56, 110, ...), got {depth!r}.")
        check_choice("norm", norm, NORMS)
        self.depth = depth
        blocks_per_stage = (depth - 2) // 6

        self.stem = nn.Sequential(conv3x3(in_channels, STAGE_WIDTHS[0]), make_norm(norm, STAGE_WIDTHS[0]), nn.ReLU())
        channels = STAGE_WIDTHS[0]
        stages: list[nn.Module] = []
        for stage_index, width in enumerate(STAGE_WIDTHS):
            blocks: list[nn.Module] = []
            for block_index in range(blocks_per_stage):
                stride = 2 if stage_index > 0 and block_index == 0 else 1
                reshapes = stride != 1 or channels != width
                shortcut = ZeroPadShortcut(channels, width, stride) if reshapes else nn.Identity()
                blocks.append(BasicBlock(channels, width, stride, norm, shortcut))
                channels = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        init_conv_and_norm(self)
        self.num_features = channels
        self.reset_classifier(num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return global_avg_pool(self.stages(self.stem(x)))


@register_net("resnet20")
class ResNet20(HeResNet):
    """He et al. 2016 CIFAR ResNet-20 (n=3, 0.27M parameters), https://arxiv.org/abs/1512.03385."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, norm: NormName = "batchnorm") -> None:
        super().__init__(num_classes, in_channels, depth=20, norm=norm)


@register_net("resnet32")
class ResNet32(HeResNet):
    """He et al. 2016 CIFAR ResNet-32 (n=5, 0.46M parameters), https://arxiv.org/abs/1512.03385."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, norm: NormName = "batchnorm") -> None:
        super().__init__(num_classes, in_channels, depth=32, norm=norm)


@register_net("resnet56")
class ResNet56(HeResNet):
    """He et al. 2016 CIFAR ResNet-56 (n=9, 0.85M parameters), https://arxiv.org/abs/1512.03385."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, norm: NormName = "batchnorm") -> None:
        super().__init__(num_classes, in_channels, depth=56, norm=norm)
