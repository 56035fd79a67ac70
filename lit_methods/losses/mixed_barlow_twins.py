"""The mixed-sample regularizer of Mixed Barlow Twins (Bandara, De Melo, Patel, "Guarding Barlow Twins Against
Overfitting with Mixed Samples", https://arxiv.org/abs/2312.02151)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lit_methods.losses.gather import distributed_is_on, gather_with_grad

__all__ = ["MixedBarlowTwinsRegularizer"]


def _gather(tensor: Tensor) -> Tensor:
    """Concatenate a tensor that needs no gradient from every rank along dim 0 (rank order)."""
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor)
    return torch.cat(parts)


class MixedBarlowTwinsRegularizer(nn.Module):
    """``||C(z_m, z_a) - T_a||_F^2 + ||C(z_m, z_b) - T_b||_F^2`` for the embedding ``z_m`` of the mixed batch
    ``alpha * y_a + (1 - alpha) * y_b[perm]``, where ``C(x, y) = x~^T y~ / N`` is the cross-correlation of
    batch-standardized embeddings and the targets interpolate the un-mixed correlations the same way,
    ``T_v = alpha * C(z_a, z_v) + (1 - alpha) * C(z_b[perm], z_v)`` (the paper's Eq. for ``v in {a, b}``).

    The loss is unweighted; the paper scales it by ``lambda_reg * lambda_BT``. As in the official code, the targets
    are not detached. Embeddings are standardized like :class:`~lit_methods.losses.BarlowTwinsLoss` (population
    standard deviation plus ``eps``, so the two terms use one normalization; the official code divides by the
    unbiased standard deviation without ``eps``).

    ``alpha`` may be one number (the paper: one coefficient per batch) or one per sample; by linearity
    ``T_v = (alpha * z~_a + (1 - alpha) * z~_b[perm])^T z~_v / N`` covers both.

    Args:
        gather_distributed: under DDP, standardize and correlate over the global batch: the embeddings and the
            coefficients are gathered (with gradients) from every rank, and each rank's ``perm`` (a permutation of
            its own batch) is offset to index its slice of the global batch. Every rank needs the same batch size.
        eps: added to the standard deviation.
    """

    def __init__(self, gather_distributed: bool = False, eps: float = 1e-5) -> None:
        super().__init__()
        if gather_distributed and not dist.is_available():
            raise ValueError("gather_distributed=True needs torch.distributed, which this build lacks")
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        self.gather_distributed = gather_distributed
        self.eps = eps

    def standardize(self, z: Tensor) -> Tensor:
        return (z - z.mean(0)) / (z.std(0, unbiased=False) + self.eps)

    def forward(self, z_mixed: Tensor, z_a: Tensor, z_b: Tensor, perm: Tensor, alpha: float | Tensor) -> Tensor:
        if not (z_mixed.shape == z_a.shape == z_b.shape and z_a.dim() == 2):
            raise ValueError(
                "expected three (N, D) embeddings of equal shape, got "
                f"{tuple(z_mixed.shape)}, {tuple(z_a.shape)} and {tuple(z_b.shape)}"
            )
        n = len(z_a)
        if perm.shape != (n,) or perm.dtype != torch.long:
            raise ValueError(f"perm must be a (N,) = ({n},) long tensor, got shape {tuple(perm.shape)} {perm.dtype}")
        alpha = torch.as_tensor(alpha, dtype=z_a.dtype, device=z_a.device).expand(n)
        if ((alpha < 0) | (alpha > 1)).any():
            raise ValueError(f"mixing coefficients must lie in [0, 1], got {alpha.min().item()}..{alpha.max().item()}")
        if self.gather_distributed and distributed_is_on():
            perm = perm + dist.get_rank() * n
            z_mixed, z_a, z_b = gather_with_grad(z_mixed), gather_with_grad(z_a), gather_with_grad(z_b)
            perm, alpha = _gather(perm), _gather(alpha.contiguous())
        if len(z_a) < 2:
            raise ValueError(f"the regularizer needs at least 2 samples to standardize, got {len(z_a)}")
        m, a, b = self.standardize(z_mixed), self.standardize(z_a), self.standardize(z_b)
        interpolated = alpha[:, None] * a + (1 - alpha[:, None]) * b[perm]
        total = z_a.new_zeros(())
        for view in (a, b):
            difference = (m - interpolated).T @ view / len(view)
            total = total + difference.pow(2).sum()
        return total
