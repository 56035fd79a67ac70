"""The negative cosine loss of SimSiam: value against a naive formula, the stop-gradient, its range and bad input."""

from __future__ import annotations

import math

import pytest
import torch

from lit_methods.losses.negative_cosine import NegativeCosineLoss


def naive_negative_cosine(p: torch.Tensor, z: torch.Tensor) -> float:
    total = 0.0
    for pi, zi in zip(p.tolist(), z.tolist()):
        dot = sum(a * b for a, b in zip(pi, zi))
        total -= dot / (math.sqrt(sum(a * a for a in pi)) * math.sqrt(sum(b * b for b in zi)))
    return total / len(p)


def test_value_equals_the_naive_formula():
    torch.manual_seed(0)
    p, z = torch.randn(7, 5), torch.randn(7, 5)
    assert NegativeCosineLoss()(p, z).item() == pytest.approx(naive_negative_cosine(p, z), rel=1e-5)


def test_target_gets_no_gradient_and_prediction_gets_the_stopped_gradient():
    torch.manual_seed(0)
    p, z = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    NegativeCosineLoss()(p, z).backward()
    assert z.grad is None  # the target branch receives nothing
    # the prediction's gradient is that of -cos(p, c) with c a constant: -(c/|c| - cos * p/|p|) / (|p| N)
    pn, zn = p.detach().norm(dim=1, keepdim=True), z.detach().norm(dim=1, keepdim=True)
    cos = (p.detach() * z.detach()).sum(1, keepdim=True) / (pn * zn)
    expected = -(z.detach() / zn - cos * p.detach() / pn) / pn / len(p)
    torch.testing.assert_close(p.grad, expected)


def test_range_and_extremes():
    torch.manual_seed(0)
    z = torch.randn(5, 4)
    loss = NegativeCosineLoss()
    assert loss(3.0 * z, z).item() == pytest.approx(-1.0)  # scale-invariant: aligned predictions give -1
    assert loss(-z, z).item() == pytest.approx(1.0)
    assert -1.0 <= loss(torch.randn(5, 4), z).item() <= 1.0


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match=r"\(3, 4\) and \(3, 5\)"):
        NegativeCosineLoss()(torch.randn(3, 4), torch.randn(3, 5))
