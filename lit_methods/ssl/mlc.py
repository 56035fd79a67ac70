"""MLC (Ding, Tong, Chan, Dai, Ma, Haeffele, "Unsupervised Manifold Linearizing and Clustering", ICCV 2023,
https://arxiv.org/abs/2301.01805)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_methods.losses.mcr2 import MCR2MembershipLoss, sinkhorn_membership
from lit_methods.ssl.base import SSLMethod
from lit_methods.ssl.clustering_metrics import MembershipSpectralClustering

__all__ = ["MLC"]


def _head(in_features: int, hidden_features: int, out_features: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_features, hidden_features),
        nn.BatchNorm1d(hidden_features),
        nn.ReLU(),
        nn.Linear(hidden_features, out_features),
    )


class MLC(SSLMethod):
    """Maximal coding-rate reduction over the network and a doubly stochastic point-to-point membership.

    Per step, with ``A`` augmented views: ``Z = normalize(mean_a normalize(feature_head(f_a)))`` and
    ``G = mean_a Sinkhorn(C_a^T C_a / eta)`` with ``C_a = normalize(cluster_head(f_a))``; the loss is
    ``-(R(Z) - R_c(Z, G))`` (:mod:`lit_methods.losses.mcr2`). The cluster head starts as a copy of the feature head
    (the paper's initialisation, so ``G`` starts as ``Sinkhorn(Z^T Z / eta)``). Validation clusters the whole
    epoch: spectral clustering of ``Sinkhorn`` over every validation image's cluster-head output, reported as
    ``val/cluster_acc`` (Hungarian matching) and ``val/cluster_nmi``, next to the base's probe and kNN monitors.

    The paper's protocol starts from a self-supervised backbone (its TCR stage, or MoCo v2) and copies the
    pretrained feature head into the cluster head; that pretraining stage is not part of this module: pass a
    pretrained backbone (for instance one trained by :class:`~lit_methods.ssl.SimCLR`). Without such an initialisation the
    membership drifts towards the trivial ``G = I`` (``R_c`` is smallest there whatever ``Z`` is): from a random
    init on digits pixels our MLC clustered worse than k-means. The heads' hidden width,
    ``eps``, ``eta`` and the Sinkhorn rounds are not given in the paper's main text (official code not found);
    the defaults are MCR^2's ``eps^2 = 0.5`` and common choices, exposed as arguments.

    Args:
        hidden_dim: hidden width of the two heads (Linear-BN-ReLU-Linear).
        feature_dim: output width ``d`` of the two heads (128 in the paper).
        eps: coding-rate precision.
        eta: Sinkhorn entropy coefficient (smaller: sparser membership).
        sinkhorn_iterations: Sinkhorn row/column normalisation rounds (unrolled in the loss).
        entropy_weight: weight of an entropy bonus on the membership against its trivial minimiser ``G = I``
            (:class:`~lit_methods.losses.mcr2.MCR2MembershipLoss`; 0 keeps the plain rate reduction).
        **kwargs: the arguments of :class:`~lit_methods.ssl.SSLMethod` (``num_classes`` is the number of clusters).
    """

    def __init__(
        self,
        backbone: nn.Module,
        hidden_dim: int = 2048,
        feature_dim: int = 128,
        eps: float = 0.5**0.5,
        eta: float = 0.1,
        sinkhorn_iterations: int = 10,
        entropy_weight: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(backbone, **kwargs)
        if hidden_dim < 1 or feature_dim < 1:
            raise ValueError(f"head widths must be >= 1, got hidden_dim={hidden_dim}, feature_dim={feature_dim}")
        if eta <= 0 or sinkhorn_iterations < 1:
            raise ValueError(f"need eta > 0 and sinkhorn_iterations >= 1, got eta={eta}, {sinkhorn_iterations}")
        self.eta = eta
        self.sinkhorn_iterations = sinkhorn_iterations
        self.feature_head = _head(self.num_features, hidden_dim, feature_dim)
        self.cluster_head = _head(self.num_features, hidden_dim, feature_dim)
        self.cluster_head.load_state_dict(self.feature_head.state_dict())
        self.loss_fn = MCR2MembershipLoss(eps, entropy_weight)
        self.clustering = MembershipSpectralClustering(self.knn.num_classes, eta, sinkhorn_iterations)

    def features_and_membership(self, features: list[Tensor]) -> tuple[Tensor, Tensor]:
        """``Z`` (``(n, d)``, unit rows, averaged over views) and ``G`` (``(n, n)``, averaged over views)."""
        views_z = [F.normalize(self.feature_head(f), dim=1) for f in features]
        z = F.normalize(torch.stack(views_z).mean(0), dim=1)
        memberships = [
            sinkhorn_membership(
                F.normalize(self.cluster_head(f), dim=1),
                self.eta,
                self.sinkhorn_iterations,
            )
            for f in features
        ]
        return z, torch.stack(memberships).mean(0)

    def ssl_loss(self, views: list[Tensor], features: list[Tensor]) -> Tensor:
        return self.loss_fn(*self.features_and_membership(features))

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        images, targets = batch[0], batch[1]
        self.clustering.update(self.cluster_head(self(images)), targets)

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        scores = self.clustering.compute()
        self.log_dict({"val/cluster_acc": scores["acc"], "val/cluster_nmi": scores["nmi"]})
        self.clustering.reset()
