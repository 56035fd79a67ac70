"""The linear-model theory of the projection-head paper: the synthetic positive pairs have the stated statistics, and
a 2-layer linear network trained by gradient descent with the spectral contrastive loss weights features more
unequally after its second layer than after its first (the card's check 2), with the gains the theory predicts."""

from __future__ import annotations

import pytest
import torch

from lit_methods.ssl.projection_head_theory import (
    layer_gains,
    optimal_gains,
    synthetic_feature_pairs,
    train_two_layer_linear,
)

STRENGTHS = (3.0, 2.0, 1.0, 0.5)
NOISE_STD = 0.5


def test_synthetic_pairs_share_their_features_and_differ_by_independent_noise():
    pairs = synthetic_feature_pairs(20000, STRENGTHS, input_dim=6, noise_std=NOISE_STD,
                                    generator=torch.Generator().manual_seed(0))
    u = pairs.directions
    torch.testing.assert_close(u @ u.T, torch.eye(4), atol=1e-5, rtol=0)
    along_1, along_2 = pairs.view_1 @ u.T, pairs.view_2 @ u.T  # (N, 4) coefficients along the features
    strengths = torch.tensor(STRENGTHS)
    # variance s_j^2 + sigma^2 along u_j; the two views' covariance there is s_j^2 (the shared feature)
    torch.testing.assert_close(along_1.var(0), strengths.square() + NOISE_STD**2, rtol=0.05, atol=0.0)
    torch.testing.assert_close((along_1 * along_2).mean(0), strengths.square(), rtol=0.05, atol=0.02)
    # the views differ by two independent isotropic noises: covariance 2 sigma^2 I in all 6 dimensions
    difference = pairs.view_1 - pairs.view_2
    torch.testing.assert_close(torch.cov(difference.T), 2 * NOISE_STD**2 * torch.eye(6), atol=0.03, rtol=0)


def test_second_layer_weights_features_more_unequally_than_the_first():
    """Seed 0: 512 pairs in 6 dimensions, 8-8 linear layers from N(0, 0.1^2), 1200 full-batch GD steps (lr 0.01)."""
    torch.set_num_threads(1)  # 1200 tiny steps: threads only contend on a loaded machine (conftest restores the count)
    generator = torch.Generator().manual_seed(0)
    pairs = synthetic_feature_pairs(512, STRENGTHS, input_dim=6, noise_std=NOISE_STD, generator=generator)
    first, second = train_two_layer_linear(
        pairs, hidden_dim=8, output_dim=8, steps=1200, lr=0.01, init_std=0.1, generator=generator
    )
    gains_1, gains_2 = layer_gains(first, second, pairs.directions)
    spread_1, spread_2 = float(gains_1.max() / gains_1.min()), float(gains_2.max() / gains_2.min())
    print(f"gains after layer 1: {gains_1.tolist()}, after layer 2: {gains_2.tolist()}")
    print(f"max/min gain ratio: layer 1 {spread_1:.3f}, layer 2 {spread_2:.3f}")
    assert spread_2 > spread_1 * 1.5  # the card's claim, with margin
    # the theory behind it: the end-to-end gains reach the population optimum s / (s^2 + sigma^2), and the balanced
    # layers split them evenly, so the first layer's gains are their square roots and its spread the square root
    optimum = optimal_gains(STRENGTHS, NOISE_STD).float()
    torch.testing.assert_close(gains_2, optimum, rtol=0.1, atol=0.0)
    torch.testing.assert_close(gains_1, optimum.sqrt(), rtol=0.1, atol=0.0)
    assert spread_2 == pytest.approx(spread_1**2, rel=0.15)


def test_untrained_small_network_has_no_such_spread():
    """The contrast: at the small initialization no feature is preferred much (the effect comes from training)."""
    generator = torch.Generator().manual_seed(0)
    pairs = synthetic_feature_pairs(512, STRENGTHS, input_dim=6, noise_std=NOISE_STD, generator=generator)
    first, second = train_two_layer_linear(
        pairs, hidden_dim=8, output_dim=8, steps=1, lr=1e-6, init_std=0.1, generator=generator
    )
    _, gains_2 = layer_gains(first, second, pairs.directions)
    assert float(gains_2.max() / gains_2.min()) < 2.0


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda g: synthetic_feature_pairs(1, STRENGTHS, 6, 0.5, g), "num_pairs must be >= 2, got 1"),
        (lambda g: synthetic_feature_pairs(8, (1.0, -1.0), 6, 0.5, g), r"positive numbers, got \[1.0, -1.0\]"),
        (lambda g: synthetic_feature_pairs(8, STRENGTHS, 3, 0.5, g), "input_dim=3 is smaller.*4"),
        (lambda g: synthetic_feature_pairs(8, STRENGTHS, 6, -0.1, g), "noise_std must be >= 0, got -0.1"),
        (
            lambda g: train_two_layer_linear(synthetic_feature_pairs(8, STRENGTHS, 6, 0.5, g), 0, 4, 10, 0.1, 0.1, g),
            "got 0, 4, 10",
        ),
        (
            lambda g: train_two_layer_linear(synthetic_feature_pairs(8, STRENGTHS, 6, 0.5, g), 4, 4, 10, 0.0, 0.1, g),
            "lr=0.0",
        ),
    ],
)
def test_bad_arguments_raise_clear_errors(build, match):
    with pytest.raises(ValueError, match=match):
        build(torch.Generator().manual_seed(0))
