"""Barlow Twins (Zbontar et al., "Barlow Twins: Self-Supervised Learning via Redundancy Reduction",
arXiv:2103.03230)."""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor, nn

from lit_methods.losses import BarlowTwinsLoss
from lit_methods.ssl.base import SSLMethod

__all__ = ["BarlowTwins"]


class BarlowTwins(SSLMethod):
    """Barlow Twins' loss on the projections of two views; a 3-layer projector with BatchNorm (as the paper).

    Args:
        projection_hidden_dim: width of the projector's hidden layers (CIFAR setups commonly use 2048).
        projection_dim: output width of the projector.
        lambda_offdiag: weight of the redundancy-reduction term (5e-3 in the paper).
        gather_distributed: under DDP, correlate over the global batch.
        **kwargs: the arguments of :class:`~lit_methods.ssl.SSLMethod`.
    """

    slug: ClassVar[str] = "barlow-twins"

    def __init__(
        self,
        backbone: nn.Module,
        projection_hidden_dim: int = 2048,
        projection_dim: int = 2048,
        lambda_offdiag: float = 5e-3,
        gather_distributed: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(backbone, **kwargs)
        self.projector = nn.Sequential(
            nn.Linear(self.num_features, projection_hidden_dim, bias=False),
            nn.BatchNorm1d(projection_hidden_dim),
            nn.ReLU(),
            nn.Linear(projection_hidden_dim, projection_hidden_dim, bias=False),
            nn.BatchNorm1d(projection_hidden_dim),
            nn.ReLU(),
            nn.Linear(projection_hidden_dim, projection_dim, bias=False),
        )
        self.loss_fn = BarlowTwinsLoss(lambda_offdiag, gather_distributed=gather_distributed)

    def ssl_loss(self, views: list[Tensor], features: list[Tensor]) -> Tensor:
        z1, z2 = (self.projector(f) for f in features[:2])
        return self.loss_fn(z1, z2)
