"""Tiny residual networks for the compression tests (residual adds couple channels; one concatenation)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Block(nn.Module):
    """conv-bn-relu-conv-bn plus a shortcut (identity or 1x1 conv-bn), then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


class TinyResNet(nn.Module):
    """Stem, ``blocks`` residual blocks of ``width`` channels (the last one strided to ``2 * width``), optionally a
    concatenation with a side branch, average pooling and a linear classifier ``fc``."""

    def __init__(
        self, num_classes: int = 10, in_channels: int = 1, width: int = 16, blocks: int = 4, concat: bool = False
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        layers = [Block(width, width) for _ in range(blocks - 1)] + [Block(width, 2 * width, stride=2)]
        self.blocks = nn.Sequential(*layers)
        self.concat = concat
        channels = 2 * width
        if concat:
            self.side = nn.Sequential(nn.Conv2d(channels, width, 1, bias=True), nn.BatchNorm2d(width), nn.ReLU())
            channels += width
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(self.stem(x))
        if self.concat:
            x = torch.cat([x, self.side(x)], dim=1)
        return self.fc(torch.flatten(self.pool(x), 1))
