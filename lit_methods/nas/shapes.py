"""CIFAR ResNet shapes for TAS (Dong & Yang, arXiv:1905.09717): the discrete network of one shape, its exact FLOPs,
the candidate widths and depths, and channel-wise interpolation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ResNetShape",
    "ShapedResNet",
    "channel_interpolate",
    "depth_choices",
    "shape_flops",
    "width_choices",
]

#: TAS' width ratios per conv (official ``get_width_choices``: 0.3 ... 1.0 in steps of 0.1)
WIDTH_RATIOS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def width_choices(channels: int, ratios: Sequence[float] = WIDTH_RATIOS) -> list[int]:
    """The distinct candidate widths ``int(channels * r)`` (at least 1), ascending."""
    return sorted({max(1, int(channels * ratio)) for ratio in ratios})


def depth_choices(blocks: int) -> list[int]:
    """Candidate block counts of a stage of ``blocks`` blocks: all of 1..blocks up to 3 blocks, else the odd counts
    and ``blocks`` itself (as the official ``get_depth_choices``)."""
    if blocks < 1:
        raise ValueError(f"a stage needs >= 1 block, got {blocks}")
    if blocks <= 3:
        return list(range(1, blocks + 1))
    return sorted(set(range(1, blocks + 1, 2)) | {blocks})


def channel_interpolate(x: Tensor, channels: int) -> Tensor:
    """Resize ``x`` (N, C, H, W) to ``channels`` channels by adaptive average pooling over the channel axis (H and W
    unchanged): shrinking averages contiguous channel bins, growing repeats channels (TAS' channel-wise
    interpolation)."""
    if x.shape[1] == channels:
        return x
    return F.adaptive_avg_pool3d(x.unsqueeze(1), (channels, x.shape[2], x.shape[3])).squeeze(1)


@dataclass(frozen=True)
class ResNetShape:
    """One CIFAR ResNet shape: the residual width of each stage (the stem writes stage 1's), the inner width of
    every block of every stage (``inner_widths[s][b]``) and the blocks kept per stage (``depths``)."""

    residual_widths: tuple[int, ...]
    inner_widths: tuple[tuple[int, ...], ...]
    depths: tuple[int, ...]

    def __post_init__(self) -> None:
        if not (len(self.residual_widths) == len(self.inner_widths) == len(self.depths)):
            raise ValueError(f"residual_widths, inner_widths and depths need one entry per stage, got {self}")
        for stage, (inner, depth) in enumerate(zip(self.inner_widths, self.depths)):
            if not 1 <= depth <= len(inner):
                raise ValueError(f"stage {stage} keeps {depth} blocks but has {len(inner)}")
        widths = [*self.residual_widths, *(w for inner in self.inner_widths for w in inner)]
        if any(w < 1 for w in widths):
            raise ValueError(f"every width must be >= 1, got {self}")

    @classmethod
    def full(cls, stage_widths: Sequence[int], blocks: Sequence[int]) -> ResNetShape:
        """The unpruned ResNet: every block at the stage width."""
        return cls(tuple(stage_widths), tuple((w,) * n for w, n in zip(stage_widths, blocks)), tuple(blocks))

    def as_dict(self) -> dict[str, list]:
        return {"residual_widths": list(self.residual_widths), "inner_widths": [list(i) for i in self.inner_widths],
                "depths": list(self.depths)}


def _out_size(size: int, stride: int) -> int:
    return (size - 1) // stride + 1


def shape_flops(
    in_channels: int,
    image_size: tuple[int, int],
    num_classes: int,
    residual_widths: Sequence[Tensor | float],
    inner_widths: Sequence[Sequence[Tensor | float]],
    block_weights: Sequence[Sequence[Tensor | float]],
) -> Tensor:
    """Multiply-accumulates of the convolutions and the classifier of a CIFAR ResNet (BN, ReLU, pooling and biases
    not counted). Widths may be expected widths (tensors) and ``block_weights[s][b]`` the probability that block
    ``b`` of stage ``s`` runs: this is TAS' expected-FLOPs cost. With integer widths and 0/1 weights it is the exact
    count of :class:`ShapedResNet`."""
    height, width = image_size
    total = torch.zeros(())
    total = total + 9 * in_channels * residual_widths[0] * height * width
    previous = residual_widths[0]
    for stage, (residual, inner, weights) in enumerate(zip(residual_widths, inner_widths, block_weights)):
        for block, (inner_width, weight) in enumerate(zip(inner, weights)):
            stride = 2 if stage > 0 and block == 0 else 1
            height, width = _out_size(height, stride), _out_size(width, stride)
            block_flops = 9 * previous * inner_width * height * width + 9 * inner_width * residual * height * width
            if stride == 2:
                block_flops = block_flops + previous * residual * height * width
            total = total + weight * block_flops
            previous = residual
    return total + previous * num_classes


class _BasicBlock(nn.Module):
    def __init__(self, in_width: int, inner_width: int, out_width: int, stride: int) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(in_width, inner_width, 3, stride, 1, bias=False)
        self.bn_a = nn.BatchNorm2d(inner_width)
        self.conv_b = nn.Conv2d(inner_width, out_width, 3, 1, 1, bias=False)
        self.bn_b = nn.BatchNorm2d(out_width)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_width != out_width:
            self.shortcut = nn.Sequential(nn.Conv2d(in_width, out_width, 1, stride, bias=False),
                                          nn.BatchNorm2d(out_width))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn_a(self.conv_a(x)))
        return F.relu(self.bn_b(self.conv_b(out)) + self.shortcut(x))


class ShapedResNet(nn.Module):
    """The plain CIFAR ResNet of one :class:`ResNetShape` (what TAS' search returns), trained from scratch with KD.

    Args:
        num_classes: classifier outputs.
        in_channels: image channels.
        residual_widths: residual (and stem) width per stage.
        inner_widths: inner width of every block per stage (only the first ``depths[s]`` are built).
        depths: blocks per stage.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        residual_widths: Sequence[int] = (16, 32, 64),
        inner_widths: Sequence[Sequence[int]] = ((16, 16, 16), (32, 32, 32), (64, 64, 64)),
        depths: Sequence[int] = (3, 3, 3),
    ) -> None:
        super().__init__()
        self.shape = ResNetShape(tuple(residual_widths), tuple(tuple(i) for i in inner_widths), tuple(depths))
        self.num_classes = num_classes
        self.stem = nn.Sequential(nn.Conv2d(in_channels, residual_widths[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(residual_widths[0]), nn.ReLU())
        blocks: list[nn.Module] = []
        previous = residual_widths[0]
        for stage, (residual, inner, depth) in enumerate(zip(residual_widths, inner_widths, depths)):
            for block in range(depth):
                blocks.append(_BasicBlock(previous, inner[block], residual, 2 if stage > 0 and block == 0 else 1))
                previous = residual
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(previous, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        features = self.blocks(self.stem(x)).mean(dim=(2, 3))
        return self.fc(features)

    def flops(self, in_channels: int, image_size: tuple[int, int]) -> int:
        """Exact multiply-accumulates of :func:`shape_flops` for this shape."""
        shape = self.shape
        weights = [[1.0] * d for d in shape.depths]
        inner = [list(i[:d]) for i, d in zip(shape.inner_widths, shape.depths)]
        return int(shape_flops(in_channels, image_size, self.num_classes, shape.residual_widths, inner, weights))
