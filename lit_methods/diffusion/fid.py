"""Offline FID: torchmetrics' ``FrechetInceptionDistance`` with the penultimate features of a trained classifier.

torchmetrics needs torch-fidelity and downloaded weights only for its Inception extractor; it accepts any
``nn.Module`` as ``feature=``. :class:`ClassifierFeatures` wraps a classifier (e.g. a ``ConvNet`` trained by
``lit-methods fit`` on the same data, read from its checkpoint) so FID works without a network connection. Such
values ("FID-ConvNet") compare runs of this project with each other, never with the Inception FID of papers; for
those pass ``fid_features: 2048`` (torchmetrics' Inception, needs torch-fidelity and its weights).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_methods.base import load_pretrained_weights

__all__ = ["ClassifierFeatures"]


class ClassifierFeatures(nn.Module):
    """The input of a classifier's last ``nn.Linear`` as FID features, for images in [0, 1] (float) or uint8.

    Images are resized to ``image_size``, brought to ``in_channels`` (grey <-> RGB), normalized with ``mean`` and
    ``std`` and passed through ``classifier`` in eval mode; the features are what enters its last linear layer.

    Args:
        classifier: the network (its last ``nn.Linear`` is the classifier head).
        checkpoint: weights for ``classifier``: a Lightning checkpoint of an ``ImageClassifier`` (keys under
            ``checkpoint_prefix``) or a state dict; ``None`` keeps its weights.
        checkpoint_prefix: the key prefix of the classifier's weights in the checkpoint (``"backbone."`` for an
            ``ImageClassifier``; ``""`` for a plain state dict).
        image_size: the classifier's input size (H, W).
        in_channels: the classifier's input channels.
        mean: per-channel normalization mean the classifier was trained with.
        std: per-channel normalization standard deviation.
    """

    def __init__(self, classifier: nn.Module, checkpoint: str | None = None, checkpoint_prefix: str = "backbone.",
                 image_size: Sequence[int] = (8, 8), in_channels: int = 1, mean: Sequence[float] = (0.5,),
                 std: Sequence[float] = (0.5,)) -> None:
        super().__init__()
        linears = [m for m in classifier.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError(f"the classifier {type(classifier).__name__} has no nn.Linear head to take features from")
        if len(mean) != in_channels or len(std) != in_channels:
            raise ValueError(f"mean {tuple(mean)} and std {tuple(std)} need one value per channel ({in_channels})")
        if checkpoint is not None:
            if not Path(checkpoint).is_file():
                raise FileNotFoundError(
                    f"FID classifier checkpoint={checkpoint!r} does not exist: train the classifier first (on digits "
                    "`lit-methods fit --config experiments/diffusion/fid-classifier_convnet_digits.yaml` writes "
                    "logs/fid-classifier_convnet_digits/version_0/checkpoints/last.ckpt)")
            load_pretrained_weights(classifier, checkpoint, {checkpoint_prefix: ""})
        self.classifier = classifier.eval().requires_grad_(False)
        self.head = linears[-1]
        self.image_size = tuple(image_size)
        self.in_channels = in_channels
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.num_features = self.head.in_features

    def train(self, mode: bool = True) -> ClassifierFeatures:
        """Always in eval mode (frozen batch-norm statistics)."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
        if x.shape[1] != self.in_channels:
            if self.in_channels == 1:
                x = x.mean(dim=1, keepdim=True)
            elif x.shape[1] == 1:
                x = x.expand(-1, self.in_channels, -1, -1)
            else:
                raise ValueError(f"cannot map {x.shape[1]}-channel images to the classifier's {self.in_channels}")
        if tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bilinear", antialias=True, align_corners=False)
        captured: list[Tensor] = []
        handle = self.head.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0]))
        try:
            self.classifier((x - self.mean) / self.std)
        finally:
            handle.remove()
        return captured[0].flatten(1)
