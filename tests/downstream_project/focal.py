"""A downstream classifier: focal loss (Lin et al. 2017, arXiv:1708.02002) and a dropout head on our base."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from lit_methods import ImageClassifier


class FocalLossClassifier(ImageClassifier):
    """Overrides the loss and wraps the backbone's output in a dropout + linear head."""

    def __init__(self, backbone: nn.Module, gamma: float = 2.0, head_dropout: float = 0.1, **kwargs) -> None:
        super().__init__(backbone, **kwargs)
        self.gamma = gamma
        self.head = nn.Sequential(nn.Dropout(head_dropout), nn.Linear(self.num_classes, self.num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(super().forward(x))

    def compute_loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        log_p = F.log_softmax(logits, dim=1).gather(1, targets[:, None]).squeeze(1)
        return (-((1 - log_p.exp()) ** self.gamma) * log_p).mean()
