"""Clustering metrics: accuracy under the best cluster-to-class matching, NMI, and MLC's spectral clustering of a
doubly stochastic membership over a whole epoch (Ding et al., "Unsupervised Manifold Linearizing and Clustering",
ICCV 2023, https://arxiv.org/abs/2301.01805)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from lit_methods.losses.mcr2 import sinkhorn_membership

__all__ = [
    "MembershipSpectralClustering",
    "clustering_accuracy",
    "normalized_mutual_information",
]


def clustering_accuracy(targets: np.ndarray | Tensor, predictions: np.ndarray | Tensor) -> float:
    """Accuracy after mapping clusters to classes one-to-one so that it is largest (Hungarian matching with
    ``scipy.optimize.linear_sum_assignment``); clusters left without a class count as errors."""
    from scipy.optimize import linear_sum_assignment

    targets, predictions = np.asarray(targets).ravel(), np.asarray(predictions).ravel()
    if targets.shape != predictions.shape:
        raise ValueError(f"targets and predictions differ in size: {targets.shape} vs {predictions.shape}")
    _, target_ids = np.unique(targets, return_inverse=True)
    _, cluster_ids = np.unique(predictions, return_inverse=True)
    counts = np.zeros((cluster_ids.max() + 1, target_ids.max() + 1), dtype=np.int64)
    np.add.at(counts, (cluster_ids, target_ids), 1)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return float(counts[rows, cols].sum() / len(targets))


def normalized_mutual_information(targets: np.ndarray | Tensor, predictions: np.ndarray | Tensor) -> float:
    """scikit-learn's ``normalized_mutual_info_score`` (arithmetic normalisation)."""
    from sklearn.metrics import normalized_mutual_info_score

    return float(normalized_mutual_info_score(np.asarray(targets).ravel(), np.asarray(predictions).ravel()))


class MembershipSpectralClustering(Metric):
    """MLC's clustering of a whole evaluation epoch: ``Sinkhorn(C^T C / eta)`` over every accumulated cluster-head
    output, symmetrised, then spectral clustering into ``num_clusters`` (scikit-learn, precomputed affinity).

    States are concatenated across processes under DDP, so every rank clusters the global set. :meth:`compute`
    returns ``{"acc": ..., "nmi": ...}`` against the accumulated targets. Memory is quadratic in the number of
    samples (10,000 CIFAR test images: a 400 MB membership).

    Args:
        num_clusters: clusters of the spectral clustering (the number of classes).
        eta: Sinkhorn entropy coefficient.
        sinkhorn_iterations: Sinkhorn row/column normalisation rounds.
        seed: random state of the spectral clustering's k-means step.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(
        self,
        num_clusters: int,
        eta: float = 0.1,
        sinkhorn_iterations: int = 100,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if num_clusters < 2:
            raise ValueError(f"num_clusters must be >= 2, got {num_clusters}")
        if eta <= 0 or sinkhorn_iterations < 1:
            raise ValueError(f"need eta > 0 and sinkhorn_iterations >= 1, got {eta} and {sinkhorn_iterations}")
        self.num_clusters = num_clusters
        self.eta = eta
        self.sinkhorn_iterations = sinkhorn_iterations
        self.seed = seed
        self.add_state("cluster_features", default=[], dist_reduce_fx="cat")
        self.add_state("targets", default=[], dist_reduce_fx="cat")

    def update(self, cluster_features: Tensor, targets: Tensor) -> None:
        """Add a batch of cluster-head outputs (L2-normalised here) and their classes."""
        self.cluster_features.append(F.normalize(cluster_features.detach().float(), dim=1))
        self.targets.append(targets.detach())

    def predict(self) -> Tensor:
        """Cluster labels of every accumulated sample."""
        from sklearn.cluster import SpectralClustering

        features = dim_zero_cat(self.cluster_features).double()
        if len(features) <= self.num_clusters:
            raise ValueError(f"spectral clustering into {self.num_clusters} clusters got only {len(features)} samples")
        membership = sinkhorn_membership(features, self.eta, self.sinkhorn_iterations)
        affinity = (0.5 * (membership + membership.T)).cpu().numpy()
        clustering = SpectralClustering(self.num_clusters, affinity="precomputed", random_state=self.seed)
        return torch.from_numpy(clustering.fit_predict(affinity))

    def compute(self) -> dict[str, Tensor]:
        predictions = self.predict().numpy()
        targets = dim_zero_cat(self.targets).cpu().numpy()
        return {
            "acc": torch.tensor(clustering_accuracy(targets, predictions)),
            "nmi": torch.tensor(normalized_mutual_information(targets, predictions)),
        }
