"""The total coding rate loss against a direct numpy computation, its preference for spread-out agreeing views, and
its input checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lit_methods.losses.total_coding_rate import TotalCodingRateLoss


def numpy_tcr_loss(views: list[np.ndarray], eps: float, weight: float) -> float:
    """The objective by the formula: unit rows, R of the view average (features as columns), mean pairwise cosine."""
    units = [v / np.linalg.norm(v, axis=1, keepdims=True) for v in views]
    average = np.mean(units, axis=0).T  # (d, n)
    d, n = average.shape
    rate = 0.5 * np.linalg.slogdet(np.eye(d) + d / (n * eps**2) * average @ average.T)[1]
    pairs = [(a, b) for a in range(len(units)) for b in range(a + 1, len(units))]
    agreement = np.mean([np.mean(np.sum(units[a] * units[b], axis=1)) for a, b in pairs])
    return -(rate + weight * agreement)


@pytest.mark.parametrize("num_views", [2, 3])
def test_loss_equals_a_direct_numpy_computation(num_views):
    g = torch.Generator().manual_seed(num_views)
    views = [torch.randn(20, 6, generator=g, dtype=torch.float64) * 3 for _ in range(num_views)]
    loss = TotalCodingRateLoss(eps=0.6, invariance_weight=2.5)(views)
    expected = numpy_tcr_loss([v.numpy() for v in views], eps=0.6, weight=2.5)
    assert loss.item() == pytest.approx(expected, rel=1e-10)


def test_loss_prefers_views_that_agree_and_features_that_fill_every_direction():
    g = torch.Generator().manual_seed(0)
    spread = torch.randn(64, 8, generator=g)
    noisy = spread + 0.5 * torch.randn(64, 8, generator=g)
    collapsed = spread[:, :2].repeat(1, 4)  # rank 2
    loss = TotalCodingRateLoss(eps=0.5, invariance_weight=1.0)
    assert loss([spread, spread]) < loss([spread, noisy])  # agreement term
    assert loss([spread, spread]) < loss([collapsed, collapsed])  # coding-rate term


def test_gradient_reaches_every_view_and_half_precision_inputs_are_coded_in_float32():
    views = [torch.randn(16, 4, requires_grad=True) for _ in range(2)]
    loss = TotalCodingRateLoss()(views)
    loss.backward()
    assert all(torch.isfinite(v.grad).all() and v.grad.abs().sum() > 0 for v in views)
    half = TotalCodingRateLoss()([v.detach().half() for v in views])
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(loss.item(), abs=1e-2)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: TotalCodingRateLoss(eps=0.0), "eps.*0.0"),
        (lambda: TotalCodingRateLoss(invariance_weight=-1.0), "invariance_weight.*-1.0"),
        (lambda: TotalCodingRateLoss()([torch.randn(4, 3)]), ">= 2 views, got 1"),
        (lambda: TotalCodingRateLoss()([torch.randn(4, 3), torch.randn(5, 3)]), r"\(4, 3\), \(5, 3\)"),
        (lambda: TotalCodingRateLoss()([torch.randn(4, 3, 2), torch.randn(4, 3, 2)]), r"\(4, 3, 2\)"),
    ],
)
def test_bad_inputs_are_rejected_with_their_value(call, match):
    with pytest.raises(ValueError, match=match):
        call()
