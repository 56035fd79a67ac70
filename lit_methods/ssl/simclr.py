"""SimCLR (Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations", arXiv:2002.05709)."""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor, nn

from lit_methods.losses import NTXentLoss
from lit_methods.ssl.base import SSLMethod, mlp_projector
from lit_methods.ssl.hallucinator import optional_hallucinator

__all__ = ["SimCLR"]


class SimCLR(SSLMethod):
    """NT-Xent between the projections of two views; a 2-layer MLP projector.

    Args:
        projection_hidden_dim: hidden width of the projector.
        projection_dim: output width of the projector.
        temperature: NT-Xent temperature (0.5 for CIFAR in the paper's appendix).
        gather_distributed: under DDP, take negatives from every rank's batch.
        hallucinator: add the :class:`~lit_methods.ssl.hallucinator.Hallucinator`'s extra positives (Wu et al.,
            https://arxiv.org/abs/2307.12168): NT-Xent over ``[z1; h]`` paired with ``[z2; z2]``, ``h`` generated
            from ``z1`` and ``z2``. As in the official code, the duplicated ``z2`` rows are also negatives of each
            other. Off (the default), the method is plain SimCLR.
        hallucinator_max_ratio: upper end of the Hallucinator's extrapolation ratio range (0.1).
        **kwargs: the arguments of :class:`~lit_methods.ssl.SSLMethod`.
    """

    slug: ClassVar[str] = "simclr"

    def __init__(
        self,
        backbone: nn.Module,
        projection_hidden_dim: int = 2048,
        projection_dim: int = 128,
        temperature: float = 0.5,
        gather_distributed: bool = True,
        hallucinator: bool = False,
        hallucinator_max_ratio: float = 0.1,
        **kwargs: Any,
    ) -> None:
        super().__init__(backbone, **kwargs)
        self.projector = mlp_projector(self.num_features, projection_hidden_dim, projection_dim)
        self.loss_fn = NTXentLoss(temperature, gather_distributed=gather_distributed)
        self.hallucinator = optional_hallucinator(projection_dim, hallucinator, hallucinator_max_ratio)

    def ssl_loss(self, views: list[Tensor], features: list[Tensor]) -> Tensor:
        z1, z2 = (self.projector(f) for f in features[:2])
        if self.hallucinator is not None:
            z1, z2 = self.hallucinator.extend(z1, z2)
        return self.loss_fn(z1, z2)
