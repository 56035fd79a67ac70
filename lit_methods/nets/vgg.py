"""VGG with batch normalisation, in the common CIFAR form.

Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition",
https://arxiv.org/abs/1409.1556; BatchNorm after every conv as in Ioffe & Szegedy,
https://arxiv.org/abs/1502.03167. The CIFAR form keeps the conv stack of configurations A/B/D/E
(VGG-11/13/16/19) and replaces the three fully connected layers by global average pooling and a single
``Linear(512, num_classes)``. The five 2x2 max-pools need inputs of at least 32x32.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from .base import NORMS, Backbone, NormName, check_choice, global_avg_pool, init_conv_and_norm, make_norm
from .registry import register_net

# Table 1 of Simonyan & Zisserman: conv output widths, with "M" for a 2x2 max-pool.
LAYER_CONFIGS: dict[str, tuple[int | str, ...]] = {
    "A": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "B": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "D": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
    "E": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"),
}


class VGG(Backbone):
    """CIFAR VGG with a norm layer after each conv (Simonyan & Zisserman, https://arxiv.org/abs/1409.1556).

    Args:
        num_classes: classifier outputs; 0 removes the classifier (``forward`` returns pooled features).
        in_channels: input image channels.
        config: conv stack of Table 1: ``"A"`` (VGG-11), ``"B"`` (13), ``"D"`` (16) or ``"E"`` (19).
        norm: ``"batchnorm"`` or ``"groupnorm"``.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        config: Literal["A", "B", "D", "E"] = "D",
        norm: NormName = "batchnorm",
    ) -> None:
        super().__init__(num_classes, in_channels)
        check_choice("config", config, tuple(LAYER_CONFIGS))
        check_choice("norm", norm, NORMS)
        self.config = config
        layers: list[nn.Module] = []
        channels = in_channels
        for entry in LAYER_CONFIGS[config]:
            if isinstance(entry, int):
                layers += [nn.Conv2d(channels, entry, kernel_size=3, padding=1), make_norm(norm, entry), nn.ReLU()]
                channels = entry
            else:
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        self.features = nn.Sequential(*layers)
        init_conv_and_norm(self)
        self.num_features = channels
        self.reset_classifier(num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return global_avg_pool(self.features(x))


@register_net("vgg11_bn")
class VGG11BN(VGG):
    """CIFAR VGG-11 with BatchNorm (config A), https://arxiv.org/abs/1409.1556."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, norm: NormName = "batchnorm") -> None:
        super().__init__(num_classes, in_channels, config="A", norm=norm)


@register_net("vgg13_bn")
class VGG13BN(VGG):
    """CIFAR VGG-13 with BatchNorm (config B), https://arxiv.org/abs/1409.1556."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, norm: NormName = "batchnorm") -> None:
        super().__init__(num_classes, in_channels, config="B", norm=norm)


@register_net("vgg16_bn")
class VGG16BN(VGG):
    """CIFAR VGG-16 with BatchNorm (config D), https://arxiv.org/abs/1409.1556."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, norm: NormName = "batchnorm") -> None:
        super().__init__(num_classes, in_channels, config="D", norm=norm)


@register_net("vgg19_bn")
class VGG19BN(VGG):
    """CIFAR VGG-19 with BatchNorm (config E), https://arxiv.org/abs/1409.1556."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, norm: NormName = "batchnorm") -> None:
        super().__init__(num_classes, in_channels, config="E", norm=norm)
