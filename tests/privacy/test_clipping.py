"""Per-sample clipping factors against opacus' formula and the clipping invariant."""

from __future__ import annotations

import math

import torch

from lit_methods.privacy import NORM_EPS, clip_factors


def test_clip_factors_clip_large_norms_to_the_threshold_and_leave_small_ones():
    gradients = torch.randn(6, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    gradients[3:] *= 0.1  # norms of about 3 above the threshold 1, then about 0.3 below it
    norms = gradients.norm(dim=1)
    assert bool((norms[:3] > 1.0).all()) and bool((norms[3:] < 1.0).all())
    factors = clip_factors(norms, 1.0)
    assert torch.equal(factors, (1.0 / (norms + NORM_EPS)).clamp(max=1.0))  # opacus' formula
    clipped = (factors[:, None] * gradients).norm(dim=1)
    torch.testing.assert_close(clipped[:3], torch.ones(3, dtype=torch.float64), rtol=1e-5, atol=0)
    assert bool((clipped[:3] < 1.0).all()), "the constant in the denominator keeps clipped norms below the threshold"
    assert torch.equal(factors[3:], torch.ones(3, dtype=torch.float64))
    assert torch.equal(clip_factors(norms, math.inf), torch.ones(6, dtype=torch.float64))
