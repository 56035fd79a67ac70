"""SimCLR (Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations", arXiv:2002.05709)."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from lit_methods.losses import NTXentLoss
from lit_methods.ssl.base import SSLMethod, mlp_projector

__all__ = ["SimCLR"]


class SimCLR(SSLMethod):
    """NT-Xent between the projections of two views; a 2-layer MLP projector.

    Args:
        projection_hidden_dim: hidden width of the projector.
        projection_dim: output width of the projector.
        temperature: NT-Xent temperature (0.5 for CIFAR in the paper's appendix).
        gather_distributed: under DDP, take negatives from every rank's batch.
        **kwargs: the arguments of :class:`~lit_methods.ssl.SSLMethod`.
    """

    def __init__(
        self,
        backbone: nn.Module,
        projection_hidden_dim: int = 2048,
        projection_dim: int = 128,
        temperature: float = 0.5,
        gather_distributed: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(backbone, **kwargs)
        self.projector = mlp_projector(self.num_features, projection_hidden_dim, projection_dim)
        self.loss_fn = NTXentLoss(temperature, gather_distributed=gather_distributed)

    def ssl_loss(self, views: list[Tensor], features: list[Tensor]) -> Tensor:
        z1, z2 = (self.projector(f) for f in features[:2])
        return self.loss_fn(z1, z2)
