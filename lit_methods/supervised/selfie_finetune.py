"""Supervised fine-tuning of a Selfie patch network on whole images, the second stage of Trinh, Luong, Le, "Selfie:
Self-supervised Pretraining for Image Embedding" (https://arxiv.org/abs/1906.02940)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from lit_methods.base import ImageClassifier, load_pretrained_weights

__all__ = ["PAPER_RESNET_LAYERS", "SelfieFineTuner", "load_patch_network"]

#: the layers of a :class:`~lit_methods.nets.resnet_cifar.CifarResNet` the paper initialises from the patch network:
#: the stem and the first three residual stages (the fourth stage and the classifier start fresh)
PAPER_RESNET_LAYERS = ("stem", "stages.0", "stages.1", "stages.2")


def load_patch_network(
    backbone: nn.Module, checkpoint_path: str | Path, layers: Sequence[str] | None = None
) -> nn.Module:
    """Copy the patch network of a :class:`~lit_methods.ssl.Selfie` checkpoint (its ``backbone.*`` entries) into
    ``backbone``, which must have the same layers (e.g. the same net built for whole images).

    ``layers`` names the backbone's sub-modules to copy (:data:`PAPER_RESNET_LAYERS` for the paper's stem and first
    three stages); the others keep their fresh initialization. ``None`` copies every parameter and buffer but the
    classifier ``fc``. Strict: errors name the missing, unexpected or mis-shaped keys, and a layer name that is not
    one of the backbone's modules. Returns ``backbone``."""
    if layers is None:
        load_pretrained_weights(backbone, checkpoint_path, {"backbone.": ""}, strict=True, fresh_prefixes=("fc.",))
        return backbone
    if not layers:
        raise ValueError("layers must name at least one backbone module (None copies them all), got []")
    modules = dict(backbone.named_modules())
    unknown = [name for name in layers if not name or name not in modules]
    if unknown:
        raise ValueError(f"layers {unknown} are not modules of {type(backbone).__name__}")
    key_map = {f"backbone.{name}.": f"{name}." for name in layers}
    load_pretrained_weights(backbone, checkpoint_path, key_map, strict=True)
    return backbone


class SelfieFineTuner(ImageClassifier):
    """Supervised fine-tuning of a backbone whose layers start from a Selfie patch network (the paper's second
    stage); every :class:`~lit_methods.base.ImageClassifier` argument applies.

    Args:
        pretrained_checkpoint: a :class:`~lit_methods.ssl.Selfie` checkpoint whose patch network has the backbone's
            layers; ``None`` trains from random initialization (the paper's supervised baseline).
        pretrained_layers: the backbone's modules read from the patch network; the paper's ResNet setting is the
            stem and the first three stages, ``["stem", "stages.0", "stages.1", "stages.2"]``
            (:data:`PAPER_RESNET_LAYERS`). ``None``: every layer but the classifier.
        **kwargs: the arguments of :class:`~lit_methods.base.ImageClassifier`.
    """

    def __init__(
        self,
        backbone: nn.Module,
        pretrained_checkpoint: str | None = None,
        pretrained_layers: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        if pretrained_layers is not None and pretrained_checkpoint is None:
            raise ValueError(f"pretrained_layers={pretrained_layers} needs a pretrained_checkpoint, got None")
        if pretrained_checkpoint is not None:
            load_patch_network(backbone, pretrained_checkpoint, pretrained_layers)
        super().__init__(backbone, **kwargs)
