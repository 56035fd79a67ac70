"""Supervised fine-tuning of a Selfie patch network on whole images, the second stage of Trinh, Luong, Le, "Selfie:
Self-supervised Pretraining for Image Embedding" (https://arxiv.org/abs/1906.02940)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from lit_methods.base import ImageClassifier, load_pretrained_weights

__all__ = ["SelfieFineTuner", "load_patch_network"]


def load_patch_network(backbone: nn.Module, checkpoint_path: str | Path) -> nn.Module:
    """Copy the patch network of a :class:`~lit_methods.ssl.Selfie` checkpoint (its ``backbone.*`` entries: every
    parameter and buffer but the classifier ``fc``) into ``backbone``, which must have the same layers (e.g. the same
    net built for whole images, with a fresh classifier); strictly, errors name the missing, unexpected or mis-shaped
    keys. Returns ``backbone``."""
    load_pretrained_weights(backbone, checkpoint_path, {"backbone.": ""}, strict=True, fresh_prefixes=("fc.",))
    return backbone


class SelfieFineTuner(ImageClassifier):
    """Supervised fine-tuning of a backbone whose layers start from a Selfie patch network (the paper's second
    stage); every :class:`~lit_methods.base.ImageClassifier` argument applies.

    Args:
        pretrained_checkpoint: a :class:`~lit_methods.ssl.Selfie` checkpoint whose patch network has the backbone's
            layers; ``None`` trains from random initialization (the paper's supervised baseline).
        **kwargs: the arguments of :class:`~lit_methods.base.ImageClassifier`.
    """

    def __init__(self, backbone: nn.Module, pretrained_checkpoint: str | None = None, **kwargs: Any) -> None:
        if pretrained_checkpoint is not None:
            load_patch_network(backbone, pretrained_checkpoint)
        super().__init__(backbone, **kwargs)
