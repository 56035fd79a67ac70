"""The linear-model theory of Xue et al., "Investigating the Benefits of Projection Head for Representation Learning"
(ICLR 2024, https://arxiv.org/abs/2403.11391): a 2-layer linear network ``z = W2 W1 x`` trained by gradient descent
from a small initialization with the spectral contrastive loss weights its input features progressively more
unequally with depth.

Data (the project card's replication setting): ``x = sum_j s_j e_j u_j + noise`` with orthonormal feature directions
``u_j``, feature strengths ``s_j`` and coefficients ``e_j ~ N(0, 1)``; the two views of a positive pair share the
coefficients and draw independent isotropic noise of standard deviation ``sigma``. Along ``u_j`` the population loss
of the end-to-end gain ``a_j = |W2 W1 u_j|`` is ``-2 a_j^2 s_j^2 + a_j^4 (s_j^2 + sigma^2)^2``, minimised at
``a_j = s_j / (s_j^2 + sigma^2)``. Gradient descent from a small initialization keeps the layers balanced
(``W1 W1^T ~ W2^T W2``), so the first layer's gain is ``|W1 u_j| = sqrt(a_j)``: the second layer's gains are the
squares of the first layer's, and their spread (max / min) is the first layer's squared.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from lit_methods.losses.spectral_contrastive import SpectralContrastiveLoss

__all__ = ["FeaturePairs", "layer_gains", "optimal_gains", "synthetic_feature_pairs", "train_two_layer_linear"]


class FeaturePairs(NamedTuple):
    """Positive pairs of the synthetic data: ``view_1[i]`` and ``view_2[i]`` share their features."""

    view_1: Tensor
    view_2: Tensor
    directions: Tensor  # (num_features, input_dim): the orthonormal feature directions u_j as rows


def synthetic_feature_pairs(
    num_pairs: int,
    strengths: Sequence[float],
    input_dim: int,
    noise_std: float,
    generator: torch.Generator,
) -> FeaturePairs:
    """Draw ``num_pairs`` positive pairs ``x = sum_j s_j e_j u_j + noise`` (module docstring).

    Args:
        num_pairs: number of pairs.
        strengths: the feature strengths ``s_j`` (> 0).
        input_dim: input dimension, at least the number of features (the rest of the space holds only noise).
        noise_std: standard deviation ``sigma`` of the isotropic noise, drawn independently for each view.
        generator: the source of randomness (directions, coefficients and noise).
    """
    if num_pairs < 2:
        raise ValueError(f"num_pairs must be >= 2, got {num_pairs}")
    if len(strengths) < 1 or min(strengths) <= 0:
        raise ValueError(f"strengths must be a non-empty sequence of positive numbers, got {list(strengths)}")
    if input_dim < len(strengths):
        raise ValueError(f"input_dim={input_dim} is smaller than the number of features ({len(strengths)})")
    if noise_std < 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}")
    basis, _ = torch.linalg.qr(torch.randn(input_dim, input_dim, generator=generator))
    directions = basis[:, : len(strengths)].T.contiguous()
    coefficients = torch.randn(num_pairs, len(strengths), generator=generator) * torch.tensor(strengths)
    signal = coefficients @ directions
    view_1 = signal + noise_std * torch.randn(num_pairs, input_dim, generator=generator)
    view_2 = signal + noise_std * torch.randn(num_pairs, input_dim, generator=generator)
    return FeaturePairs(view_1, view_2, directions)


def train_two_layer_linear(
    pairs: FeaturePairs,
    hidden_dim: int,
    output_dim: int,
    steps: int,
    lr: float,
    init_std: float,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """Full-batch gradient descent on the (unbounded) spectral contrastive loss of ``z = W2 W1 x``.

    Args:
        pairs: the training pairs.
        hidden_dim: width of the first layer's output (the pre-projection representation).
        output_dim: width of the second layer's output (the post-projection representation).
        steps: gradient-descent steps.
        lr: step size.
        init_std: standard deviation of the Gaussian initialization of both weight matrices (small: the theory's
            regime).
        generator: the source of the initialization.

    Returns:
        ``(W1, W2)`` of shapes ``(hidden_dim, input_dim)`` and ``(output_dim, hidden_dim)``.
    """
    if min(hidden_dim, output_dim, steps) < 1:
        raise ValueError(f"hidden_dim, output_dim and steps must be >= 1, got {hidden_dim}, {output_dim}, {steps}")
    if lr <= 0 or init_std <= 0:
        raise ValueError(f"lr and init_std must be > 0, got lr={lr}, init_std={init_std}")
    input_dim = pairs.view_1.shape[1]
    first = (init_std * torch.randn(hidden_dim, input_dim, generator=generator)).requires_grad_(True)
    second = (init_std * torch.randn(output_dim, hidden_dim, generator=generator)).requires_grad_(True)
    loss_fn = SpectralContrastiveLoss(mu=None)
    optimizer = torch.optim.SGD([first, second], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = loss_fn(pairs.view_1 @ first.T @ second.T, pairs.view_2 @ first.T @ second.T)
        loss.backward()
        optimizer.step()
    return first.detach(), second.detach()


def layer_gains(first: Tensor, second: Tensor, directions: Tensor) -> tuple[Tensor, Tensor]:
    """Per-feature gains ``(|W1 u_j|, |W2 W1 u_j|)`` of the first layer and of the whole network."""
    hidden = directions @ first.T
    return hidden.norm(dim=1), (hidden @ second.T).norm(dim=1)


def optimal_gains(strengths: Sequence[float], noise_std: float) -> Tensor:
    """End-to-end gains ``s_j / (s_j^2 + sigma^2)`` that minimise the population loss (module docstring)."""
    s = torch.tensor(strengths, dtype=torch.float64)
    return s / (s.square() + noise_std**2)
