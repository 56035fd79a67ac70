"""Adapters that give any timm or torchvision classifier the ``(num_classes, in_channels)`` constructor.

The weights are always randomly initialised (``pretrained=False`` / ``weights=None``).
"""

from __future__ import annotations

from typing import Any

import timm
import torch
import torchvision
from torch import nn

from .base import check_int


class TimmModel(nn.Module):
    """Any ``timm`` model by name (Wightman, https://github.com/huggingface/pytorch-image-models).

    The model lives in ``self.model``; ``forward_features`` returns its pooled pre-logits features,
    ``forward_head`` applies its classifier (also available as ``fc``), following timm's API.

    Args:
        model_name: a name from ``timm.list_models()``, e.g. ``"resnet10t"``.
        num_classes: classifier outputs; 0 removes the classifier.
        in_channels: input image channels (timm adapts the stem).
        **kwargs: further ``timm.create_model`` arguments, e.g. ``drop_rate``.
    """

    def __init__(self, model_name: str, num_classes: int, in_channels: int = 3, **kwargs: Any) -> None:
        super().__init__()
        if not timm.is_model(model_name):
            raise ValueError(f"Unknown timm model {model_name!r}; see timm.list_models().")
        check_int("num_classes", num_classes, minimum=0)
        check_int("in_channels", in_channels, minimum=1)
        self.model_name = model_name
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.model = timm.create_model(
            model_name, pretrained=False, num_classes=num_classes, in_chans=in_channels, **kwargs
        )
        self.num_features: int = getattr(self.model, "head_hidden_size", self.model.num_features)

    @property
    def fc(self) -> nn.Module:
        """The timm model's classifier layer."""
        return self.model.get_classifier()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled pre-logits features of shape ``(N, num_features)``."""
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def reset_classifier(self, num_classes: int) -> None:
        check_int("num_classes", num_classes, minimum=0)
        self.num_classes = num_classes
        self.model.reset_classifier(num_classes)


class TorchvisionModel(nn.Module):
    """Any ``torchvision.models`` classifier by name (https://pytorch.org/vision/stable/models.html).

    For ``in_channels != 3`` the first conv is replaced by a freshly initialised one with the same
    shape apart from its input channels. Only ``forward`` is provided, since torchvision models have no
    common feature/classifier API.

    Args:
        name: a name from ``torchvision.models.list_models()``, e.g. ``"resnet18"``.
        num_classes: classifier outputs.
        in_channels: input image channels.
    """

    def __init__(self, name: str, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        if name not in torchvision.models.list_models():
            raise ValueError(f"Unknown torchvision model {name!r}; see torchvision.models.list_models().")
        check_int("num_classes", num_classes, minimum=1)
        check_int("in_channels", in_channels, minimum=1)
        self.name = name
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
        if in_channels != 3:
            replace_first_conv(self.model, in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def replace_first_conv(model: nn.Module, in_channels: int) -> None:
    """Swap the first ``nn.Conv2d`` of ``model`` (in module order) for one taking ``in_channels`` inputs."""
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            break
    else:
        raise ValueError(f"{type(model).__name__} has no nn.Conv2d whose input channels could be changed.")
    if module.groups != 1:
        raise ValueError(f"The first conv of {type(model).__name__} is grouped ({module.groups} groups).")
    new_conv = nn.Conv2d(
        in_channels,
        module.out_channels,
        kernel_size=module.kernel_size,
        stride=module.stride,
        padding=module.padding,
        dilation=module.dilation,
        bias=module.bias is not None,
        padding_mode=module.padding_mode,
    )
    nn.init.kaiming_normal_(new_conv.weight, mode="fan_out", nonlinearity="relu")
    if new_conv.bias is not None:
        nn.init.zeros_(new_conv.bias)
    parent_name, _, attribute = module_name.rpartition(".")
    setattr(model.get_submodule(parent_name), attribute, new_conv)
