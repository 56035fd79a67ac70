"""Barlow Twins redundancy-reduction loss (Zbontar et al. 2021, arXiv:2103.03230)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lit_methods.losses.gather import distributed_is_on, gather_with_grad


class BarlowTwinsLoss(nn.Module):
    """``sum_i (1 - C_ii)^2 + lambda * sum_{i != j} C_ij^2`` of the cross-correlation ``C`` of the two views'
    batch-standardized embeddings.

    Args:
        lambda_offdiag: weight of the redundancy-reduction (off-diagonal) term (paper: 5e-3).
        gather_distributed: under DDP, standardize and correlate over the global batch (gathered with gradients),
            as the paper's implementation does with its all-reduce of C.
        eps: added to the standard deviation.
    """

    def __init__(self, lambda_offdiag: float = 5e-3, gather_distributed: bool = False, eps: float = 1e-5) -> None:
        super().__init__()
        if lambda_offdiag < 0:
            raise ValueError(f"lambda_offdiag must be >= 0, got {lambda_offdiag}")
        if gather_distributed and not dist.is_available():
            raise ValueError("gather_distributed=True needs torch.distributed, which this build lacks")
        self.lambda_offdiag = lambda_offdiag
        self.gather_distributed = gather_distributed
        self.eps = eps

    def cross_correlation(self, z1: Tensor, z2: Tensor) -> Tensor:
        if self.gather_distributed and distributed_is_on():
            z1, z2 = gather_with_grad(z1), gather_with_grad(z2)
        if len(z1) < 2:
            raise ValueError(f"Barlow Twins needs at least 2 samples to standardize, got {len(z1)}")
        z1 = (z1 - z1.mean(0)) / (z1.std(0, unbiased=False) + self.eps)
        z2 = (z2 - z2.mean(0)) / (z2.std(0, unbiased=False) + self.eps)
        return z1.T @ z2 / len(z1)

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        if z1.shape != z2.shape or z1.dim() != 2:
            raise ValueError(f"expected two (N, D) views of equal shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
        c = self.cross_correlation(z1, z2)
        on_diagonal = (torch.diagonal(c) - 1).pow(2).sum()
        off_diagonal = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
        return on_diagonal + self.lambda_offdiag * off_diagonal
