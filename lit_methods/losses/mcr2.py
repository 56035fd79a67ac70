"""Coding rates of MCR^2 with a doubly stochastic membership, as in MLC (Ding, Tong, Chan, Dai, Ma, Haeffele,
"Unsupervised Manifold Linearizing and Clustering", ICCV 2023, https://arxiv.org/abs/2301.01805).

With ``n`` unit-norm features ``Z`` (``d x n``; here stored as rows, ``(n, d)``) and quantisation ``eps``:

    R(Z)        = 1/2 logdet(I + d / (n eps^2) Z Z^T)
    R_c(Z, G)   = 1/(2n) sum_j logdet(I + d / eps^2 Z Diag(G[:, j]) Z^T)

``G`` is an ``n x n`` doubly stochastic membership: column ``j`` is a soft cluster of total weight 1 around point
``j`` (MCR^2's ``tr(Pi_j) / (2n)`` weighting with ``tr(Pi_j) = 1``). MLC maximises ``R - R_c`` over the network and
``G = Sinkhorn(C^T C / eta)`` from a cluster head's unit-norm outputs ``C``. The 1/2 factors follow MCR^2 (Yu et al.
2020, arXiv:2006.08558), whose rates MLC uses.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = [
    "MCR2MembershipLoss",
    "coding_rate",
    "membership_coding_rate",
    "membership_entropy",
    "sinkhorn_membership",
]


def _check_eps(eps: float) -> None:
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")


def coding_rate(features: Tensor, eps: float) -> Tensor:
    """``R(Z) = 1/2 logdet(I + d / (n eps^2) Z^T Z)`` of ``(n, d)`` features (computed in at least fp32)."""
    _check_eps(eps)
    n, d = features.shape
    z = features if features.dtype == torch.float64 else features.float()
    gram = z.T @ z * (d / (n * eps**2))
    return 0.5 * torch.logdet(torch.eye(d, dtype=z.dtype, device=z.device) + gram)


def membership_coding_rate(features: Tensor, membership: Tensor, eps: float) -> Tensor:
    """``R_c(Z, G) = 1/(2n) sum_j logdet(I + d / eps^2 Z^T Diag(G[:, j]) Z)`` of ``(n, d)`` features and an
    ``(n, n)`` membership whose columns are the soft clusters."""
    _check_eps(eps)
    n, d = features.shape
    if membership.shape != (n, n):
        raise ValueError(f"membership must be ({n}, {n}) for {n} features, got {tuple(membership.shape)}")
    z = features if features.dtype == torch.float64 else features.float()
    weights = membership.to(z.dtype)
    # one d x d weighted Gram matrix per column j: sum_i G[i, j] z_i z_i^T
    grams = torch.einsum("ij,id,ie->jde", weights, z, z) * (d / eps**2)
    return 0.5 * torch.logdet(torch.eye(d, dtype=z.dtype, device=z.device) + grams).sum() / n


def sinkhorn_membership(cluster_features: Tensor, eta: float, iterations: int) -> Tensor:
    """The doubly stochastic ``Sinkhorn(exp(C^T C / eta))`` of ``(n, k)`` unit-norm cluster-head outputs.

    Alternates row and column normalisation ``iterations`` times in log space (unrolled, so differentiable);
    it ends with a column normalisation, so columns sum to 1 exactly and rows to within the Sinkhorn tolerance.
    Smaller ``eta`` gives a sparser membership.
    """
    if eta <= 0:
        raise ValueError(f"eta must be > 0, got {eta}")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    c = cluster_features if cluster_features.dtype == torch.float64 else cluster_features.float()
    log_membership = c @ c.T / eta
    for _ in range(iterations):
        log_membership = log_membership - torch.logsumexp(log_membership, dim=1, keepdim=True)
        log_membership = log_membership - torch.logsumexp(log_membership, dim=0, keepdim=True)
    return log_membership.exp()


def membership_entropy(membership: Tensor) -> Tensor:
    """Mean row entropy ``-1/n sum_ij G_ij log G_ij`` of a row-stochastic membership (0 for a permutation)."""
    return -torch.special.xlogy(membership, membership).sum() / len(membership)


class MCR2MembershipLoss(nn.Module):
    """``-(R(Z) - R_c(Z, G)) - gamma H(G)``: minus MCR^2's rate reduction under a (doubly stochastic) membership
    ``G``, minus an entropy bonus on ``G``.

    ``R_c`` alone is smallest at ``G = I`` (every point its own cluster) whatever ``Z`` is. In MLC the guard
    against that trivial membership is the entropic regulariser of the Sinkhorn projection that produces ``G``
    (its ``eta``, :func:`sinkhorn_membership`): the paper's loss is the plain rate reduction, ``gamma = 0`` (the
    default). ``gamma > 0`` adds our own, optional bonus on the mean row entropy (:func:`membership_entropy`).

    Args:
        eps: quantisation precision (``eps^2 = 0.5`` is the usual MCR^2 choice, so ``eps ~= 0.707``).
        entropy_weight: ``gamma`` (0, the paper's loss, gives the plain rate reduction).
    """

    def __init__(self, eps: float = 0.5**0.5, entropy_weight: float = 0.0) -> None:
        super().__init__()
        _check_eps(eps)
        if entropy_weight < 0:
            raise ValueError(f"entropy_weight must be >= 0, got {entropy_weight}")
        self.eps = eps
        self.entropy_weight = entropy_weight

    def forward(self, features: Tensor, membership: Tensor) -> Tensor:
        if features.dim() != 2:
            raise ValueError(f"expected (N, D) features, got shape {tuple(features.shape)}")
        with torch.autocast(features.device.type, enabled=False):  # logdet is unreliable in half precision
            reduction = coding_rate(features, self.eps) - membership_coding_rate(features, membership, self.eps)
            return -reduction - self.entropy_weight * membership_entropy(membership.to(reduction.dtype))
