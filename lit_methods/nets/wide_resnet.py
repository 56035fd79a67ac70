"""Wide Residual Networks WRN-d-k (WRN-28-10, WRN-34-10).

Zagoruyko & Komodakis, "Wide Residual Networks", https://arxiv.org/abs/1605.07146.
A 3x3 stem conv with 16 filters, three stages of ``n = (d - 4) / 6`` pre-activation wide basic blocks on
16k/32k/64k channels, then norm, ReLU, global average pooling and a linear classifier. WRN-34-10 is the
standard adversarial-training backbone of Madry et al. (https://arxiv.org/abs/1706.06083) and TRADES
(Zhang et al., https://arxiv.org/abs/1901.08573).
"""

from __future__ import annotations

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
from .resnet_cifar import conv1x1, conv3x3

BASE_WIDTHS = (16, 32, 64)


class WideBasicBlock(nn.Module):
    """Pre-activation block: norm-ReLU-conv3x3 (strided), norm-ReLU-dropout-conv3x3, plus the shortcut.

    When the shape changes, the shortcut is a 1x1 conv applied to the pre-activated input, as in the
    authors' code; otherwise it is the identity on the raw input.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: str, dropout: float) -> None:
        super().__init__()
        self.norm1 = make_norm(norm, in_channels)
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.norm2 = make_norm(norm, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv3x3(out_channels, out_channels)
        reshapes = stride != 1 or in_channels != out_channels
        self.projection = conv1x1(in_channels, out_channels, stride) if reshapes else None
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()  # modules, so hooks (dead-neuron rates) can observe them

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.relu1(self.norm1(x))
        residual = x if self.projection is None else self.projection(activated)
        out = self.conv1(activated)
        out = self.conv2(self.dropout(self.relu2(self.norm2(out))))
        return out + residual


class WideResNet(Backbone):
    """WRN-depth-widen_factor of Zagoruyko & Komodakis 2016 (https://arxiv.org/abs/1605.07146).

    Args:
        num_classes: classifier outputs; 0 removes the classifier (``forward`` returns pooled features).
        in_channels: input image channels.
        depth: ``6n + 4`` (16, 22, 28, 34, 40, ...).
        widen_factor: channel multiplier ``k`` of the 16/32/64 base widths.
        dropout: dropout probability between the two convs of each block (the paper uses 0.3 in some runs).
        norm: ``"batchnorm"`` (as in the paper) or ``"groupnorm"``.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        depth: int = 28,
        widen_factor: int = 10,
        dropout: float = 0.0,
        norm: NormName = "batchnorm",
    ) -> None:
        super().__init__(num_classes, in_channels)
        check_int("depth", depth, minimum=10)
        if (depth - 4) % 6 != 0:
            raise ValueError(f"depth must be 6n + 4 (16, 22, 28, 34, 40, ...), got {depth!r}.")
        check_int("widen_factor", widen_factor, minimum=1)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}.")
        check_choice("norm", norm, NORMS)
        self.depth = depth
        self.widen_factor = widen_factor
        blocks_per_stage = (depth - 4) // 6

        self.stem = conv3x3(in_channels, BASE_WIDTHS[0])
        channels = BASE_WIDTHS[0]
        stages: list[nn.Module] = []
        for stage_index, base_width in enumerate(BASE_WIDTHS):
            width = base_width * widen_factor
            blocks: list[nn.Module] = []
            for block_index in range(blocks_per_stage):
                stride = 2 if stage_index > 0 and block_index == 0 else 1
                blocks.append(WideBasicBlock(channels, width, stride, norm, dropout))
                channels = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.final_norm = make_norm(norm, channels)
        self.final_relu = nn.ReLU()
        init_conv_and_norm(self)
        self.num_features = channels
        self.reset_classifier(num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        feature_map = self.final_relu(self.final_norm(self.stages(self.stem(x))))
        return global_avg_pool(feature_map)


@register_net("wrn28_10")
class WRN28_10(WideResNet):
    """WRN-28-10 (36.5M parameters), Zagoruyko & Komodakis 2016, https://arxiv.org/abs/1605.07146."""

    def __init__(
        self, num_classes: int = 10, in_channels: int = 3, dropout: float = 0.0, norm: NormName = "batchnorm"
    ) -> None:
        super().__init__(num_classes, in_channels, depth=28, widen_factor=10, dropout=dropout, norm=norm)


@register_net("wrn34_10")
class WRN34_10(WideResNet):
    """WRN-34-10 (46.2M parameters), the Madry et al. / TRADES robust-training backbone.

    Zagoruyko & Komodakis 2016, https://arxiv.org/abs/1605.07146; Madry et al. 2018,
    https://arxiv.org/abs/1706.06083.
    """

    def __init__(
        self, num_classes: int = 10, in_channels: int = 3, dropout: float = 0.0, norm: NormName = "batchnorm"
    ) -> None:
        super().__init__(num_classes, in_channels, depth=34, widen_factor=10, dropout=dropout, norm=norm)
