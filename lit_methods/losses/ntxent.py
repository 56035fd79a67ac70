"""NT-Xent, the normalized temperature-scaled cross-entropy of SimCLR (Chen et al. 2020, arXiv:2002.05709)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from lit_methods.losses.gather import distributed_is_on, gather_with_grad


class NTXentLoss(nn.Module):
    """Contrastive loss over two views: each embedding's positive is its other view, every other embedding of the
    (global) batch is a negative.

    For ``N`` pairs the ``2N`` anchors each see ``2N - 1`` candidates; the loss is the mean cross-entropy of
    ``cos(a, p) / temperature`` against all candidates.

    Args:
        temperature: softmax temperature (SimCLR: 0.5 on CIFAR, 0.1 with large batches).
        gather_distributed: under DDP, take the negatives from every rank's batch (gathered with gradients). The
            loss returned on a rank averages that rank's anchors; DDP's gradient averaging then gives exactly the
            gradient of the single-process loss on the concatenated batch. Off: each rank uses its own batch only.
    """

    def __init__(self, temperature: float = 0.5, gather_distributed: bool = False) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if gather_distributed and not dist.is_available():
            raise ValueError("gather_distributed=True needs torch.distributed, which this build lacks")
        self.temperature = temperature
        self.gather_distributed = gather_distributed

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        if z1.shape != z2.shape or z1.dim() != 2:
            raise ValueError(f"expected two (N, D) views of equal shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
        z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
        n = len(z1)
        offset = 0
        if self.gather_distributed and distributed_is_on():
            offset = dist.get_rank() * n
            all1, all2 = gather_with_grad(z1), gather_with_grad(z2)
        else:
            all1, all2 = z1, z2
        candidates = torch.cat([all1, all2])  # (2M, D): views 1 of every pair, then views 2
        total = len(all1)
        anchors = torch.cat([z1, z2])  # (2n, D)
        logits = anchors @ candidates.T / self.temperature
        own = torch.arange(n, device=z1.device) + offset
        self_index = torch.cat([own, own + total])  # where each anchor sits among the candidates
        positive = torch.cat([own + total, own])
        logits[torch.arange(2 * n, device=z1.device), self_index] = float("-inf")
        return F.cross_entropy(logits, positive)
