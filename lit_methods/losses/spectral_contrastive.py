"""The spectral contrastive loss of HaoChen, Wei, Gaidon & Ma, "Provable Guarantees for Self-Supervised Deep Learning
with Spectral Contrastive Loss" (NeurIPS 2021, https://arxiv.org/abs/2106.04156).

    L(f) = -2 E_{(x, x+)}[<f(x), f(x+)>] + E_{x, x-}[<f(x), f(x-)>^2]

over positive pairs (two augmentations of one sample) and independent pairs. The batch estimate follows the official
code (``models/spectral.py`` of jhaochenz96/spectral_contrastive_learning): the first term averages
``<z1_i, z2_i>`` over the pairs, the second averages ``<z1_i, z2_j>^2`` over the ``N (N - 1)`` pairs with
``i != j``; embeddings longer than ``sqrt(mu)`` are first scaled down to that norm and the loss is divided by
``mu`` (the paper's loss is ``mu=None``: no clipping, no scaling).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from lit_methods.losses.gather import distributed_is_on, gather_with_grad

__all__ = ["SpectralContrastiveLoss"]


class SpectralContrastiveLoss(nn.Module):
    """Spectral contrastive loss between two views ``z1, z2`` of ``N`` samples (rows ``i`` of both are a positive pair).

    Args:
        mu: the official code's norm bound: rows with ``|z| >= sqrt(mu)`` are rescaled to norm ``sqrt(mu)`` and the
            loss is divided by ``mu`` (official default 1). ``None``: the plain loss of the paper's analysis.
        gather_distributed: under DDP, take the negatives ``z2_j`` from every rank's batch (gathered with
            gradients). The loss returned on a rank averages that rank's pairs and its anchors' negatives; the mean
            over ranks is the single-process loss on the concatenated batch, and DDP's gradient averaging gives its
            gradient exactly. Off: each rank uses its own batch only.
    """

    def __init__(self, mu: float | None = 1.0, gather_distributed: bool = False) -> None:
        super().__init__()
        if mu is not None and not mu > 0:
            raise ValueError(f"mu must be > 0 (or None for no norm bound), got {mu}")
        if gather_distributed and not dist.is_available():
            raise ValueError("gather_distributed=True needs torch.distributed, which this build lacks")
        self.mu = mu
        self.gather_distributed = gather_distributed

    def _bound_norms(self, z: Tensor) -> Tensor:
        if self.mu is None:
            return z
        radius = math.sqrt(self.mu)
        inside = z.norm(dim=1, keepdim=True) < radius
        return torch.where(inside, z, F.normalize(z, dim=1) * radius)

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        if z1.shape != z2.shape or z1.dim() != 2:
            raise ValueError(f"expected two (N, D) views of equal shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
        z1, z2 = self._bound_norms(z1), self._bound_norms(z2)
        n = len(z1)
        offset = 0
        negatives = z2
        if self.gather_distributed and distributed_is_on():
            offset = dist.get_rank() * n
            negatives = gather_with_grad(z2)
        total = len(negatives)
        if total < 2:
            raise ValueError("the spectral contrastive loss needs at least 2 samples for its negative pairs, got 1")
        positive = (z1 * z2).sum(dim=1).mean()
        squares = (z1 @ negatives.T).square()
        own = torch.arange(n, device=z1.device)
        off_diagonal = squares.sum() - squares[own, own + offset].sum()
        loss = -2 * positive + off_diagonal / (n * (total - 1))
        return loss if self.mu is None else loss / self.mu
