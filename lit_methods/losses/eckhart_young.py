"""Eckhart-Young losses of the CCA family (Chapman, Wells, Lawry Aguila, "Unconstrained Stochastic CCA: Unifying
Multiview and Self-Supervised Learning", ICLR 2024, https://arxiv.org/abs/2310.01012).

For a generalized eigenproblem ``A w = lambda B w`` and weights ``W`` (``p x K``) the Eckhart-Young loss is

    L(W) = -2 tr(W^T A W) + tr((W^T B W) (W^T B W)).

Its minimisers are ``W = U_K diag(lambda_K)^(1/2) Q`` (``U_K`` the top-``K`` ``B``-orthonormal eigenvectors, ``Q``
any ``K x K`` orthogonal matrix), where ``W^T A W = Q^T diag(lambda_K)^2 Q`` and ``W^T B W = Q^T diag(lambda_K) Q``,
so the minimum is ``-2 sum_k lambda_k^2 + sum_k lambda_k^2 = -sum_{k<=K} lambda_k^2`` (only positive eigenvalues
count: a column facing a negative one is zero at the optimum). For CCA between views with representations
``Z_i = X_i W_i``, ``W^T A W = sum_{i != j} Cov(Z_i, Z_j)`` and ``W^T B W = sum_i Var(Z_i)``; with two views the
positive eigenvalues are the canonical correlations ``rho_k``, so the minimum is ``-sum_{k<=K} rho_k^2`` and the
eigenvalues of ``W^T B W`` at the optimum are ``rho_1..rho_K``. PLS replaces ``B`` by the identity
(``W^T B W = sum_i W_i^T W_i``), ridge CCA interpolates the two.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lit_methods.losses.gather import distributed_is_on, gather_with_grad

__all__ = ["CCAEYLoss", "cca_ey_matrices", "eckhart_young_objective"]


def eckhart_young_objective(a_matrix: Tensor, b_matrix: Tensor, independent_b_matrix: Tensor | None = None) -> Tensor:
    """``-2 tr(A) + tr(B B')`` with ``B' = B`` unless an estimate from an independent batch is given.

    With ``B'`` from an independent minibatch, the minibatch loss is an unbiased estimate of the population loss
    (the product of two independent unbiased estimates is unbiased; ``tr(B B)`` of one batch is not).
    """
    other = b_matrix if independent_b_matrix is None else independent_b_matrix
    return -2 * torch.trace(a_matrix) + torch.sum(b_matrix * other.T)


def cca_ey_matrices(
    representations: Sequence[Tensor],
    weights: Sequence[Tensor] | None = None,
    ridge: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """``(W^T A W, W^T B W)`` of (ridge) CCA from the views' ``(N, K)`` representations.

    ``W^T A W = sum_{i != j} Cov(Z_i, Z_j)``; ``W^T B W = sum_i (1 - ridge) Var(Z_i) + ridge W_i^T W_i``, where
    ``W_i`` is view ``i``'s ``(p_i, K)`` linear map (needed only when ``ridge > 0``). Covariances are sample
    covariances over the batch (centred, divided by ``N - 1``), as in the official SSL-EY code.
    """
    n = len(representations[0])
    if n < 2:
        raise ValueError(f"covariances need at least 2 samples, got a batch of {n}")
    centred = [z - z.mean(0) for z in representations]
    total = sum(centred[1:], centred[0])
    cross_and_auto = total.T @ total / (n - 1)  # sum over all pairs (i, j), the diagonal pairs included
    auto = sum((z.T @ z for z in centred[1:]), centred[0].T @ centred[0]) / (n - 1)
    a_matrix = cross_and_auto - auto
    if ridge == 0.0:
        return a_matrix, auto
    if weights is None or len(weights) != len(representations):
        given = 0 if weights is None else len(weights)
        raise ValueError(f"ridge={ridge} > 0 needs one weight matrix per view ({len(representations)}), got {given}")
    gram = sum((w.T @ w for w in weights[1:]), weights[0].T @ weights[0])
    return a_matrix, (1 - ridge) * auto + ridge * gram


class CCAEYLoss(nn.Module):
    """The Eckhart-Young loss of (ridge) CCA between two or more views; SSL-EY when the views are augmentations.

    ``forward(representations)`` returns ``-2 tr(C) + tr(V V)`` with ``C = sum_{i != j} Cov(Z_i, Z_j)`` and
    ``V = sum_i Var(Z_i)``. For two views this is the official SSL-EY loss (which writes ``C = 2 Z_a^T Z_b``; same
    trace). Pass ``independent_representations`` (the same maps applied to an independent batch) for the paper's
    unbiased stochastic estimate ``-2 tr(C) + tr(V V')``. The minimum over linear maps is ``-sum_k rho_k^2`` (see the
    module docstring).

    Args:
        ridge: ``c`` in ``B_i = (1 - c) Sigma_ii + c I``: 0 is CCA, 1 is PLS (then ``V`` is the weight Gram and
            ``forward`` needs ``weights``).
        gather_distributed: under DDP, compute the covariances over the global batch (representations gathered with
            gradients before centring, as the official code's ``FullGatherLayer``). Every rank then computes the
            same global loss.
    """

    def __init__(self, ridge: float = 0.0, gather_distributed: bool = False) -> None:
        super().__init__()
        if not 0.0 <= ridge <= 1.0:
            raise ValueError(f"ridge must lie in [0, 1] (0: CCA, 1: PLS), got {ridge}")
        if gather_distributed and not dist.is_available():
            raise ValueError("gather_distributed=True needs torch.distributed, which this build lacks")
        self.ridge = ridge
        self.gather_distributed = gather_distributed

    def _gather(self, representations: Sequence[Tensor]) -> list[Tensor]:
        if self.gather_distributed and distributed_is_on():
            return [gather_with_grad(z) for z in representations]
        return list(representations)

    def forward(
        self,
        representations: Sequence[Tensor],
        weights: Sequence[Tensor] | None = None,
        independent_representations: Sequence[Tensor] | None = None,
    ) -> Tensor:
        if len(representations) < 2:
            raise ValueError(f"CCA needs at least 2 views, got {len(representations)}")
        shapes = {tuple(z.shape) for z in representations}
        if len(shapes) != 1 or representations[0].dim() != 2:
            raise ValueError(f"expected (N, K) representations of equal shape, got {sorted(shapes)}")
        # in fp32 at least, outside autocast: tr(V V) of wide projections overflows in half precision
        with torch.autocast(representations[0].device.type, enabled=False):
            a_matrix, b_matrix = cca_ey_matrices(self._gather(_at_least_fp32(representations)), weights, self.ridge)
            independent_b = None
            if independent_representations is not None:
                views = self._gather(_at_least_fp32(independent_representations))
                _, independent_b = cca_ey_matrices(views, weights, self.ridge)
            return eckhart_young_objective(a_matrix, b_matrix, independent_b)


def _at_least_fp32(tensors: Sequence[Tensor]) -> list[Tensor]:
    return [t if t.dtype == torch.float64 else t.float() for t in tensors]
