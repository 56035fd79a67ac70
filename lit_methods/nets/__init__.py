"""Backbones for CIFAR-scale research: classes with a ``(num_classes, in_channels, ...)`` constructor.

Every ``Backbone`` subclass (and ``TimmModel``) exposes ``num_classes``, ``in_channels``,
``num_features``, ``forward_features`` (pooled features), ``forward_head``, the classifier ``fc`` and
``reset_classifier``; ``TorchvisionModel`` only ``forward``. ``create_net(name, **kwargs)`` builds a
registered backbone by name; ``list_nets()`` lists them.
"""

from __future__ import annotations

from .adapters import TimmModel, TorchvisionModel
from .base import Backbone
from .convnet import ConvNet
from .heads import FixedReweightHead
from .ghost_batchnorm import GhostBatchNorm1d, GhostBatchNorm2d, convert_to_ghost_batchnorm
from .multi_sample_dropout import MultiSampleDropoutHead
from .registry import NETS, create_net, list_nets, register_net
from .resnet_cifar import CifarResNet, ResNet18, ResNet34, ResNet50
from .resnet_he import HeResNet, ResNet20, ResNet32, ResNet56
from .vgg import VGG, VGG11BN, VGG13BN, VGG16BN, VGG19BN
from .vit import ViT
from .wide_resnet import WRN28_10, WRN34_10, WideResNet

__all__ = [
    "NETS",
    "VGG",
    "VGG11BN",
    "VGG13BN",
    "VGG16BN",
    "VGG19BN",
    "WRN28_10",
    "WRN34_10",
    "Backbone",
    "CifarResNet",
    "ConvNet",
    "FixedReweightHead",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "HeResNet",
    "MultiSampleDropoutHead",
    "ResNet18",
    "ResNet20",
    "ResNet32",
    "ResNet34",
    "ResNet50",
    "ResNet56",
    "TimmModel",
    "TorchvisionModel",
    "ViT",
    "WideResNet",
    "convert_to_ghost_batchnorm",
    "create_net",
    "list_nets",
    "register_net",
]

from .grouped_query_attention import GroupedQueryAttention, KDGQAViT, convert_to_grouped_query, key_driven_allocation
from .spectformer import SpectFormer, SpectralGatingBlock, SpectralGatingFilter

__all__ += [
    "GroupedQueryAttention",
    "KDGQAViT",
    "SpectFormer",
    "SpectralGatingBlock",
    "SpectralGatingFilter",
    "convert_to_grouped_query",
    "key_driven_allocation",
]
