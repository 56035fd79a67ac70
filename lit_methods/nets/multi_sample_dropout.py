"""Multi-sample dropout head (Inoue, "Multi-Sample Dropout for Accelerated Training and Better Generalization",
arXiv:1905.09788): M independent dropout masks in front of one shared head."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MultiSampleDropoutHead"]


class MultiSampleDropoutHead(nn.Module):
    """Apply ``head`` to ``num_samples`` independently dropped-out copies of the features.

    In training mode ``(B, F)`` features give ``(num_samples, B, C)`` logits: the features are computed once, each
    copy draws its own mask, and the head's weights are shared (it runs once on the ``num_samples * B`` rows). In
    evaluation mode dropout is off, all copies are equal, and the head runs once: ``(B, C)``.

    Args:
        head: the shared classifier (usually the backbone's final ``nn.Linear``).
        num_samples: number of dropout samples M (8 in the paper).
        p: dropout probability, one for all copies or one per copy (the paper's diversity option).
    """

    def __init__(self, head: nn.Module, num_samples: int = 8, p: float | Sequence[float] = 0.5) -> None:
        super().__init__()
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        probabilities = [float(p)] * num_samples if isinstance(p, (int, float)) else [float(q) for q in p]
        if len(probabilities) != num_samples:
            raise ValueError(f"p lists {len(probabilities)} probabilities for num_samples={num_samples}")
        if not all(0.0 <= q < 1.0 for q in probabilities):
            raise ValueError(f"dropout probabilities must lie in [0, 1), got {p}")
        self.head = head
        self.num_samples = num_samples
        self.p = probabilities

    def forward(self, features: Tensor) -> Tensor:
        if not self.training:
            return self.head(features)
        copies = features.unsqueeze(0).expand(self.num_samples, *features.shape)
        if len(set(self.p)) == 1:
            dropped = F.dropout(copies, self.p[0], training=True)
        else:
            keep = 1.0 - torch.tensor(self.p, device=features.device, dtype=features.dtype)
            keep = keep.view(-1, *([1] * features.dim()))
            dropped = copies * (torch.rand_like(copies) < keep) / keep
        logits = self.head(dropped.reshape(-1, *features.shape[1:]))
        return logits.view(self.num_samples, features.shape[0], *logits.shape[1:])
