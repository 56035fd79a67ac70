"""SSL-EY (Chapman, Wells, Lawry Aguila, "Unconstrained Stochastic CCA: Unifying Multiview and Self-Supervised
Learning", ICLR 2024, https://arxiv.org/abs/2310.01012)."""

from __future__ import annotations

import itertools
from typing import Any, ClassVar

from torch import Tensor, nn

from lit_methods.losses.eckhart_young import CCAEYLoss
from lit_methods.ssl.base import SSLMethod

__all__ = ["SSLEY"]


class SSLEY(SSLMethod):
    """The Eckhart-Young CCA loss ``-2 tr(C) + tr(V V)`` between the projections of two views.

    ``C`` sums the two cross-covariances of the views' centred projections and ``V`` their two auto-covariances
    (:class:`~lit_methods.losses.eckhart_young.CCAEYLoss`); the loss has no hyper-parameters. The projector is the
    official code's (VICReg's) expander: ``projection_layers - 1`` blocks of Linear-BN-ReLU, then a Linear without
    bias (CIFAR: ``512-2048-2048``, two layers; ImageNet: ``2048-8192-8192-8192``, three).

    Args:
        projection_hidden_dim: width of the projector's hidden layers (2048 in the CIFAR configuration).
        projection_dim: output width of the projector (2048 in the CIFAR configuration).
        projection_layers: number of Linear layers of the projector (2 for CIFAR, 3 for ImageNet).
        gather_distributed: under DDP, compute the covariances over the global batch, as the official code does.
        **kwargs: the arguments of :class:`~lit_methods.ssl.SSLMethod`.
    """

    slug: ClassVar[str] = "ssl-ey"

    def __init__(
        self,
        backbone: nn.Module,
        projection_hidden_dim: int = 2048,
        projection_dim: int = 2048,
        projection_layers: int = 2,
        gather_distributed: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(backbone, **kwargs)
        if projection_hidden_dim < 1 or projection_dim < 1 or projection_layers < 1:
            raise ValueError(
                f"projector sizes must be >= 1, got projection_hidden_dim={projection_hidden_dim}, "
                f"projection_dim={projection_dim}, projection_layers={projection_layers}"
            )
        widths = [self.num_features] + [projection_hidden_dim] * (projection_layers - 1)
        blocks: list[nn.Module] = []
        for width_in, width_out in itertools.pairwise(widths):
            blocks += [
                nn.Linear(width_in, width_out),
                nn.BatchNorm1d(width_out),
                nn.ReLU(),
            ]
        self.projector = nn.Sequential(*blocks, nn.Linear(widths[-1], projection_dim, bias=False))
        self.loss_fn = CCAEYLoss(gather_distributed=gather_distributed)

    def ssl_loss(self, views: list[Tensor], features: list[Tensor]) -> Tensor:
        return self.loss_fn([self.projector(f) for f in features[:2]])
