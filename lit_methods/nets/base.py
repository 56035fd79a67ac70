"""Pieces shared by the backbones: the classifier interface, normalisation layers and weight init."""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import nn
from torch.nn import functional as F

NormName = Literal["batchnorm", "groupnorm"]
NORMS: tuple[str, ...] = get_args(NormName)
MAX_NORM_GROUPS = 32  # the default of Wu & He, "Group Normalization" (https://arxiv.org/abs/1803.08494)


def check_int(name: str, value: int, minimum: int) -> None:
    """Raise ``ValueError`` unless ``value`` is an int (not a bool) that is at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"Unknown {name} {value!r}; expected one of {', '.join(map(repr, choices))}.")


def group_count(channels: int) -> int:
    """Number of GroupNorm groups for ``channels``: the largest divisor of ``channels`` not above 32."""
    return max(g for g in range(1, min(MAX_NORM_GROUPS, channels) + 1) if channels % g == 0)


def make_norm(norm: str, channels: int) -> nn.BatchNorm2d | nn.GroupNorm:
    """``"batchnorm"`` -> BatchNorm2d; ``"groupnorm"`` -> GroupNorm with ``group_count(channels)`` groups."""
    check_choice("norm", norm, NORMS)
    if norm == "batchnorm":
        return nn.BatchNorm2d(channels)
    return nn.GroupNorm(group_count(channels), channels)


def global_avg_pool(feature_map: torch.Tensor) -> torch.Tensor:
    """``(N, C, H, W) -> (N, C)`` by averaging over all positions."""
    return torch.flatten(F.adaptive_avg_pool2d(feature_map, 1), 1)


def init_conv_and_norm(module: nn.Module) -> None:
    """Kaiming-normal (fan_out, ReLU) conv weights, zero conv biases, unit/zero norm affine, as torchvision's ResNet."""
    for submodule in module.modules():
        if isinstance(submodule, nn.Conv2d):
            nn.init.kaiming_normal_(submodule.weight, mode="fan_out", nonlinearity="relu")
            if submodule.bias is not None:
                nn.init.zeros_(submodule.bias)
        elif isinstance(submodule, (nn.BatchNorm2d, nn.GroupNorm)) and submodule.affine:
            nn.init.ones_(submodule.weight)
            nn.init.zeros_(submodule.bias)


class Backbone(nn.Module):
    """Backbone interface: ``forward(x) = forward_head(forward_features(x))`` with the classifier in ``self.fc``.

    ``num_classes=0`` follows timm: ``fc`` is ``nn.Identity`` and ``forward`` returns the pooled features.
    Subclasses build their layers, set ``self.num_features`` and call ``self.reset_classifier(num_classes)``.
    """

    num_features: int
    fc: nn.Linear | nn.Identity

    def __init__(self, num_classes: int, in_channels: int) -> None:
        super().__init__()
        check_int("num_classes", num_classes, minimum=0)
        check_int("in_channels", in_channels, minimum=1)
        self.num_classes = num_classes
        self.in_channels = in_channels

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features of shape ``(N, num_features)``."""
        raise NotImplementedError

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Logits from pooled features (the features themselves when ``num_classes == 0``)."""
        return self.fc(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        """Replace ``fc`` by a freshly initialised ``Linear(num_features, num_classes)`` (``Identity`` for 0)."""
        check_int("num_classes", num_classes, minimum=0)
        self.num_classes = num_classes
        if num_classes == 0:
            self.fc = nn.Identity()
            return
        reference = next(self.parameters(), None)  # build the new layer on the model's device and dtype
        placement = {} if reference is None else {"device": reference.device, "dtype": reference.dtype}
        self.fc = nn.Linear(self.num_features, num_classes, **placement)
