"""BarlowTwinsLoss against an element-by-element reference (loss and gradients) and its exact zeros."""

from __future__ import annotations

import pytest
import torch

from lit_methods.losses.barlow_twins import BarlowTwinsLoss


def loop_barlow(z1: torch.Tensor, z2: torch.Tensor, lam: float, eps: float) -> torch.Tensor:
    """The paper's formula written with scalar loops (differentiable, float64)."""
    n, d = z1.shape
    columns = []
    for z in (z1, z2):
        standardized = []
        for k in range(d):
            col = z[:, k]
            mean = sum(col[i] for i in range(n)) / n
            std = (sum((col[i] - mean) ** 2 for i in range(n)) / n).sqrt()
            standardized.append([(col[i] - mean) / (std + eps) for i in range(n)])
        columns.append(standardized)
    a, b = columns
    total = torch.zeros((), dtype=z1.dtype)
    for i in range(d):
        for j in range(d):
            c_ij = sum(a[i][s] * b[j][s] for s in range(n)) / n
            total = total + ((1 - c_ij) ** 2 if i == j else lam * c_ij**2)
    return total


@pytest.mark.parametrize("lam,eps,seed", [(5e-3, 1e-5, 0), (0.3, 0.0, 1), (1.0, 1e-2, 2)])
def test_loss_and_gradients_equal_the_loop_reference_on_random_embeddings(lam, eps, seed):
    g = torch.Generator().manual_seed(seed)
    z1 = (torch.randn(7, 4, generator=g, dtype=torch.float64) * 3 + 1).requires_grad_(True)
    z2 = torch.randn(7, 4, generator=g, dtype=torch.float64).requires_grad_(True)
    loss = BarlowTwinsLoss(lam, eps=eps)(z1, z2)
    reference = loop_barlow(z1, z2, lam, eps)
    torch.testing.assert_close(loss, reference, rtol=1e-10, atol=1e-12)
    grads = torch.autograd.grad(loss, (z1, z2))
    reference_grads = torch.autograd.grad(reference, (z1, z2))
    for got, want in zip(grads, reference_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def _decorrelated_standardized(n: int, d: int, seed: int) -> torch.Tensor:
    """(n, d) columns with zero mean, unit population variance and zero correlation: a QR of a centered matrix."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(x - x.mean(0))
    return q * n**0.5


@pytest.mark.parametrize("n,d,seed", [(16, 5, 0), (64, 12, 3)])
def test_loss_is_zero_on_perfectly_correlated_decorrelated_standardized_embeddings(n, d, seed):
    z = _decorrelated_standardized(n, d, seed)
    cross = z.T @ z / n
    torch.testing.assert_close(cross, torch.eye(d, dtype=torch.float64))  # the construction is what it claims
    loss_fn = BarlowTwinsLoss(5e-3, eps=0.0)
    assert loss_fn(z, z).item() == pytest.approx(0.0, abs=1e-12)
    # the loss standardizes per dimension: any positive scale and shift of each dimension keeps it at zero
    assert loss_fn(z * torch.arange(1, d + 1) + 7.0, z).item() == pytest.approx(0.0, abs=1e-12)
    # but redundancy (a copied dimension) or anti-correlation is penalized
    redundant = z.clone()
    redundant[:, 1] = z[:, 0]
    assert loss_fn(z, redundant).item() > 0.5
    assert loss_fn(z, -z).item() == pytest.approx(4.0 * d, rel=1e-9)  # every C_ii = -1


def test_gradient_vanishes_at_the_optimum():
    z = _decorrelated_standardized(32, 6, 5).requires_grad_(True)
    other = z.detach().clone().requires_grad_(True)
    BarlowTwinsLoss(5e-3, eps=0.0)(z, other).backward()
    assert z.grad.abs().max().item() < 1e-10 and other.grad.abs().max().item() < 1e-10
