"""MCR^2 coding rates against numpy, the Sinkhorn membership's double stochasticity, and the rate reduction's
preference for the true cluster membership."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lit_methods.losses.mcr2 import (
    MCR2MembershipLoss,
    coding_rate,
    membership_coding_rate,
    membership_entropy,
    sinkhorn_membership,
)


def numpy_rates(z: np.ndarray, membership: np.ndarray, eps: float) -> tuple[float, float]:
    """R and R_c by the paper's formulas, features as columns, one logdet at a time."""
    zc = z.T  # (d, n)
    d, n = zc.shape
    rate = 0.5 * np.linalg.slogdet(np.eye(d) + d / (n * eps**2) * zc @ zc.T)[1]
    rate_c = sum(
        0.5 / n * np.linalg.slogdet(np.eye(d) + d / eps**2 * zc @ np.diag(membership[:, j]) @ zc.T)[1] for j in range(n)
    )
    return rate, rate_c


def test_coding_rates_equal_a_direct_numpy_computation():
    g = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(12, 5, generator=g, dtype=torch.float64), dim=1)
    membership = sinkhorn_membership(torch.randn(12, 4, generator=g, dtype=torch.float64), eta=0.5, iterations=30)
    rate, rate_c = numpy_rates(z.numpy(), membership.numpy(), eps=0.6)
    assert coding_rate(z, 0.6).item() == pytest.approx(rate, rel=1e-10)
    assert membership_coding_rate(z, membership, 0.6).item() == pytest.approx(rate_c, rel=1e-10)
    loss = MCR2MembershipLoss(eps=0.6, entropy_weight=0.3)(z, membership)
    entropy = -(membership * membership.log()).sum().item() / 12
    assert loss.item() == pytest.approx(-(rate - rate_c) - 0.3 * entropy, rel=1e-10)


def test_sinkhorn_membership_is_doubly_stochastic_and_tends_to_uniform_for_large_eta():
    g = torch.Generator().manual_seed(1)
    c = F.normalize(torch.randn(64, 16, generator=g), dim=1)
    membership = sinkhorn_membership(c, eta=0.1, iterations=100)
    assert membership.min() >= 0
    torch.testing.assert_close(membership.sum(0), torch.ones(64), atol=1e-4, rtol=0)
    torch.testing.assert_close(membership.sum(1), torch.ones(64), atol=1e-4, rtol=0)
    torch.testing.assert_close(membership, membership.T, atol=1e-4, rtol=0)  # C^T C is symmetric
    # each point's largest membership is itself (cosine 1) and smaller eta concentrates it
    assert torch.equal(membership.argmax(1), torch.arange(64))
    sharper = sinkhorn_membership(c, eta=0.02, iterations=100)
    assert sharper.diagonal().mean() > membership.diagonal().mean()
    torch.testing.assert_close(sinkhorn_membership(c, eta=1e4, iterations=5), torch.full((64, 64), 1 / 64))
    grad = torch.autograd.grad(sinkhorn_membership(c.requires_grad_(True), 0.1, 10)[0, 1], c)[0]
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def _random_doubly_stochastic(n: int, g: torch.Generator) -> torch.Tensor:
    return sinkhorn_membership(torch.randn(n, 3, generator=g, dtype=torch.float64), eta=0.3, iterations=200)


def test_rate_reduction_prefers_the_true_membership_of_orthogonal_subspaces():
    """Three mutually orthogonal 2-D subspaces in R^6: the block membership (1/|cluster| per block, doubly
    stochastic) reduces the rate more than a random doubly stochastic one, and the uniform one reduces nothing."""
    g = torch.Generator().manual_seed(2)
    blocks = [F.normalize(torch.randn(8, 2, generator=g, dtype=torch.float64), dim=1) for _ in range(3)]
    z = torch.block_diag(*blocks)  # (24, 6): rows of cluster k live in coordinates 2k, 2k+1
    labels = torch.arange(3).repeat_interleave(8)
    true = (labels[:, None] == labels[None, :]).double() / 8
    uniform = torch.full((24, 24), 1 / 24, dtype=torch.float64)
    loss = MCR2MembershipLoss(eps=0.5)
    assert loss(z, uniform).item() == pytest.approx(0.0, abs=1e-10)
    assert loss(z, true) < loss(z, _random_doubly_stochastic(24, g)) < 0.0


def test_membership_entropy_is_zero_for_a_permutation_and_log_n_for_uniform():
    assert membership_entropy(torch.eye(5)[[2, 0, 1, 4, 3]]).item() == 0.0
    assert membership_entropy(torch.full((5, 5), 0.2)).item() == pytest.approx(np.log(5))


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: MCR2MembershipLoss(eps=0.0), "eps.*0.0"),
        (lambda: MCR2MembershipLoss(entropy_weight=-1.0), "entropy_weight.*-1.0"),
        (
            lambda: sinkhorn_membership(torch.randn(4, 2), eta=0.0, iterations=3),
            "eta.*0.0",
        ),
        (
            lambda: sinkhorn_membership(torch.randn(4, 2), eta=0.1, iterations=0),
            "iterations.*0",
        ),
        (
            lambda: membership_coding_rate(torch.randn(4, 2), torch.ones(3, 3), 0.5),
            r"\(4, 4\).*\(3, 3\)",
        ),
    ],
)
def test_bad_inputs_are_rejected_with_their_value(call, match):
    with pytest.raises(ValueError, match=match):
        call()
