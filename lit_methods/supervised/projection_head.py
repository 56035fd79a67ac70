"""The supervised setting of Xue, Gan, Ni, Joshi & Mirzasoleiman, "Investigating the Benefits of Projection Head for
Representation Learning" (ICLR 2024, https://arxiv.org/abs/2403.11391): a classifier trained through a projection
head that the evaluated representation bypasses. The self-supervised study is
:class:`lit_methods.ssl.ProjectionHeadStudy`.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from lit_methods.base import ImageClassifier
from lit_methods.nets.heads import FixedReweightHead

__all__ = ["ProjectionHeadClassifier"]

SUPERVISED_HEADS = ("mlp", "none", "reweight")


class ProjectionHeadClassifier(ImageClassifier):
    """The paper's supervised setting: ``classifier(head(f(x)))`` trained with cross-entropy; the head is bypassed in
    the evaluated representation.

    The head sits between the backbone's pooled features ``f(x)`` and a linear classifier, and keeps their width (as
    ``SpuCoModel`` of the authors' SpuCo fork, whose ``use_ph`` flag bypasses it). Training always goes through the
    head. :meth:`forward_features` returns the pre-projection representation ``f(x)`` that downstream evaluation
    (linear probes, kNN) uses; the validation/test logits go through the head unless ``evaluate_with_head=False``,
    then they are ``classifier(f(x))`` (the fork's ``use_ph=False``).

    * ``"reweight"``: :class:`~lit_methods.nets.FixedReweightHead` with ``kappa`` (the paper's proposal).
    * ``"mlp"``: Linear - ReLU - Linear back to the backbone width.
    * ``"none"``: the classifier sits on ``f(x)`` (the plain classifier).

    Args:
        backbone: a :mod:`lit_methods.nets` backbone (``forward_features``, ``num_features``, ``reset_classifier``);
            its own classifier is removed.
        head: the head's kind (above).
        kappa: decay of the ``"reweight"`` head's weights.
        projection_hidden_dim: hidden width of the ``"mlp"`` head.
        evaluate_with_head: validation/test/predict logits through the head (True) or bypassing it (False).
        **kwargs: the arguments of :class:`~lit_methods.ImageClassifier` (``num_classes`` is required or taken from
            the backbone).
    """

    backbone_output = "features"

    def __init__(
        self,
        backbone: nn.Module,
        head: Literal["mlp", "none", "reweight"] = "reweight",
        kappa: float = 1.01,
        projection_hidden_dim: int = 2048,
        evaluate_with_head: bool = True,
        **kwargs: Any,
    ) -> None:
        if not all(hasattr(backbone, name) for name in ("forward_features", "reset_classifier", "num_features")):
            raise ValueError(
                f"{type(backbone).__name__} needs forward_features, num_features and reset_classifier "
                "(a lit_methods.nets backbone)"
            )
        if head not in SUPERVISED_HEADS:
            raise ValueError(f"head must be one of {SUPERVISED_HEADS}, got {head!r}")
        if projection_hidden_dim < 1:
            raise ValueError(f"projection_hidden_dim must be >= 1, got {projection_hidden_dim}")
        super().__init__(backbone, **kwargs)
        self.backbone.reset_classifier(0)
        width: int = backbone.num_features
        self.head_kind = head
        self.evaluate_with_head = evaluate_with_head
        self.projector: nn.Module
        if head == "mlp":
            self.projector = nn.Sequential(
                nn.Linear(width, projection_hidden_dim), nn.ReLU(), nn.Linear(projection_hidden_dim, width)
            )
        elif head == "reweight":
            self.projector = FixedReweightHead(width, kappa)
        else:
            self.projector = nn.Identity()
        self.classifier = nn.Linear(width, self.num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        """The pre-projection representation ``f(x)`` (the head bypassed), for downstream evaluation."""
        x = self.normalize_inputs(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.backbone.forward_features(x)

    def forward(self, x: Tensor) -> Tensor:
        """Logits: through the head in training (and in evaluation when ``evaluate_with_head``), else bypassing it."""
        features = self.forward_features(x)
        if self.training or self.evaluate_with_head:
            features = self.projector(features)
        return self.classifier(features)
