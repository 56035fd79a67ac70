"""Negative cosine similarity with a stop-gradient on the target, the objective of SimSiam (Chen & He, "Exploring
Simple Siamese Representation Learning", https://arxiv.org/abs/2011.10566) and BYOL's regression loss up to an
affine map (``2 - 2 cos``)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["NegativeCosineLoss"]


class NegativeCosineLoss(nn.Module):
    """``D(p, z) = -mean_i cos(p_i, stopgrad(z_i))``: the batch mean of the negative cosine similarity between each
    prediction and its target, the target treated as a constant (no gradient flows into it).

    Lies in ``[-1, 1]``; ``-1`` when every prediction points the same way as its target. Per-sample terms only, so
    nothing is communicated under DDP (gradient averaging gives the loss of the global batch).
    """

    def forward(self, predictions: Tensor, targets: Tensor) -> Tensor:
        if predictions.shape != targets.shape or predictions.dim() != 2:
            raise ValueError(
                f"expected predictions and targets of equal (N, D) shape, got {tuple(predictions.shape)} "
                f"and {tuple(targets.shape)}"
            )
        return -F.cosine_similarity(predictions, targets.detach(), dim=1).mean()
