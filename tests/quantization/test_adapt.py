"""AdaPT's switching rules against hand computations: gradient diversity, lookback and resolution, push-up step
sizes, KL push-down minimality, and the direction of a whole switch on constructed windows."""

from __future__ import annotations

import math

import pytest
import torch

from lit_methods.quantization.adapt import (
    AdaptivePrecisionController,
    gradient_diversity,
    next_lookback,
    next_resolution,
    push_down,
    push_up,
    push_up_increment,
    quantization_kl,
)
from lit_methods.quantization.codecs import fixed_point_quantize


def test_gradient_diversity_is_one_for_identical_and_sqrt_n_for_orthogonal_directions():
    direction = torch.randn(50)
    direction /= direction.norm()
    assert gradient_diversity(7, 7 * direction) == pytest.approx(1.0)
    assert gradient_diversity(16, torch.eye(16).sum(0)) == pytest.approx(4.0)
    assert gradient_diversity(3, torch.zeros(5)) == math.inf


def test_lookback_and_resolution_follow_the_rules():
    # ceil(clip(100 / GD, 25, 100)), blended by momentum, then ceil
    assert next_lookback(1.0, 60, 25, 100, 1.0) == 100
    assert next_lookback(3.0, 60, 25, 100, 1.0) == 34
    assert next_lookback(10.0, 60, 25, 100, 1.0) == 25
    assert next_lookback(3.0, 60, 25, 100, 0.5) == math.ceil(0.5 * 34 + 0.5 * 60)
    assert next_lookback(math.inf, 60, 25, 100, 1.0) == 25
    assert next_resolution(100, 70, 25, 100, 50, 150) == 71
    assert next_resolution(25, 70, 25, 100, 50, 150) == 69
    assert next_resolution(60, 70, 25, 100, 50, 150) == 70
    assert next_resolution(100, 150, 25, 100, 50, 150) == 150
    assert next_resolution(25, 50, 25, 100, 50, 150) == 50


@pytest.mark.parametrize("diversity", [1.0, 2.0, math.e, 3.2, 4.5, 10.0, 1e4, math.inf])
@pytest.mark.parametrize("fraction_length", [4, 10])
def test_push_up_increment_matches_the_hand_computation(diversity, fraction_length):
    excess = math.log(diversity) - 1 if diversity < math.inf else -1.0
    if excess <= 0:
        expected = {"min": 1, "mean": 1, "max": 1}
    else:
        s1 = max(math.ceil(1 / excess**2), 1)
        s2 = max(min(math.ceil(32 * excess**2), 32) - fraction_length, 0)
        expected = {"min": min(s1, s2), "mean": math.ceil((s1 + s2) / 2), "max": max(s1, s2)}
    for strategy, step in expected.items():
        assert push_up_increment(diversity, fraction_length, strategy) == step
    # a worked case: GD = e^1.5, L = 0.5: s1 = 4, s2 = 8 - FL
    assert push_up_increment(math.exp(1.5), 4, "min") == 4
    assert push_up_increment(math.exp(1.5), 4, "max") == 4
    assert push_up_increment(math.exp(1.5), 2, "max") == 6


def test_push_up_keeps_the_results_buffer():
    assert push_up(1.0, 12, 4, "min", 8) == (13, 5)  # FL + 1, WL = max(12, 5) + 1
    assert push_up(1.0, 6, 4, "min", 8) == (13, 5)  # WL raised to FL + buffer
    assert push_up(1.0, 32, 24, "min", 8) == (32, 24)  # FL capped at 32 - buffer


def test_push_down_finds_the_smallest_lossless_fraction_and_word_length():
    # std 0.5: the largest weights need two integer bits above the sign, so the word length is not at its floor (FL)
    weights = torch.randn(2000, generator=torch.Generator().manual_seed(0)) * 0.5
    word, fraction = push_down(weights, 32, 28, 4, 100, seed=5)

    def kl(w: int, f: int) -> float:
        return quantization_kl(weights, w, f, 100, torch.Generator().manual_seed(5))

    assert 4 < fraction < 28 and kl(32, fraction) == 0.0 and kl(32, fraction - 1) > 0.0
    assert fraction < word < 32 and kl(word, fraction) == 0.0 and kl(word - 1, fraction) > 0.0


def test_kl_is_zero_exactly_when_the_histogram_is_unchanged():
    weights = torch.randn(500, generator=torch.Generator().manual_seed(1)) * 0.1
    on_grid = fixed_point_quantize(weights, 16, 6, stochastic=False)
    assert quantization_kl(on_grid, 16, 6, 80) == 0.0  # values on the grid do not move
    quantized = fixed_point_quantize(weights, 8, 3, generator=torch.Generator().manual_seed(2))
    p = torch.histc(weights, 80, float(weights.min()), float(weights.max()))
    q = torch.histc(quantized.clamp(weights.min(), weights.max()), 80, float(weights.min()), float(weights.max()))
    kl = quantization_kl(weights, 8, 3, 80, torch.Generator().manual_seed(2))
    assert not torch.equal(p, q) and kl > 0.0


def _fill_window(controller: AdaptivePrecisionController, gradients: list[torch.Tensor]) -> None:
    for gradient in gradients:
        controller.observe_gradient("layer", gradient / gradient.norm())


def test_precision_goes_down_when_nothing_is_lost_and_up_when_gradients_vanish():
    generator = torch.Generator().manual_seed(0)
    # coarse weights: every value is a multiple of 2^-5, so FL = 5 loses nothing; identical gradients (GD = 1)
    coarse = torch.randint(-8, 8, (300,), generator=generator) / 32.0
    down = AdaptivePrecisionController(["layer"], 24, 16, min_lookback=3, max_lookback=6, adapt_push_up_strategy=False)
    _fill_window(down, [torch.ones(300)] * 6)
    assert down.window_complete("layer")
    assert down.switch("layer", coarse, seed=0, step=6) == (5 + 1 + 8, 5 + 1)  # push-down to 5, +1, buffer 8
    # fine weights (no shorter format is lossless) with gradients that vanish in fixed point: far below the grid,
    # stochastic rounding turns them into sparse random signs, so the window's diversity is large
    fine = torch.randn(300, generator=generator) * 0.05
    tiny = [fixed_point_quantize(torch.full((300,), 1e-3), 16, 4, generator=generator) for _ in range(30)]
    up = AdaptivePrecisionController(
        ["layer"], 12, 4, min_lookback=5, max_lookback=30, push_up_strategy="max", adapt_push_up_strategy=False
    )
    _fill_window(up, [g if g.norm() > 0 else torch.randn(300, generator=generator) for g in tiny])
    diversity = gradient_diversity(up.window_count["layer"], up.window_sum["layer"])
    assert diversity > math.e
    assert up.window_complete("layer")  # a diverse window is short: ceil(30 / GD) < 30
    word, fraction = up.switch("layer", fine, seed=0, step=1)
    assert fraction == 4 + push_up_increment(diversity, 4, "max") > 5
    assert word >= fraction + 8
    assert up.switches[-1]["pushed_down"][1] == 4


def test_loss_escalates_the_push_up_strategy_and_a_falling_loss_resets_it():
    # window = mean lookback = 2; the code compares |sum of the last 3 losses| / 2 with the new loss
    controller = AdaptivePrecisionController(["a"], min_lookback=2, max_lookback=2)
    for loss in [1.0, 1.0, 1.0]:
        controller.observe_loss(loss)
    assert controller.push_up_strategy == "min"  # too few losses yet
    controller.observe_loss(2.0)  # (1 + 1 + 1) / 2 = 1.5 <= 2
    assert controller.push_up_strategy == "mean"
    controller.observe_loss(3.0)  # (1 + 1 + 2) / 2 = 2 <= 3
    assert controller.push_up_strategy == "max"
    controller.observe_loss(3.5)  # (1 + 2 + 3) / 2 = 3 <= 3.5: stays at max
    assert controller.push_up_strategy == "max"
    controller.observe_loss(0.1)  # (2 + 3 + 3.5) / 2 > 0.1
    assert controller.push_up_strategy == "min"


def test_state_dict_round_trip_and_bad_arguments():
    controller = AdaptivePrecisionController(["a", "b"], min_lookback=1, max_lookback=2)
    controller.observe_gradient("a", torch.ones(4) / 2)
    controller.observe_loss(0.5)
    copy = AdaptivePrecisionController(["a", "b"], min_lookback=1, max_lookback=2)
    copy.load_state_dict(controller.state_dict())
    assert copy.state_dict()["window_count"] == {"a": 1, "b": 0}
    assert torch.equal(copy.window_sum["a"], controller.window_sum["a"]) and copy.loss_history == [0.5]
    with pytest.raises(ValueError, match="covers tensors"):
        AdaptivePrecisionController(["c"]).load_state_dict(controller.state_dict())
    with pytest.raises(ValueError, match="min_lookback <= max_lookback.*30 and 20"):
        AdaptivePrecisionController(["a"], min_lookback=30, max_lookback=20)
    with pytest.raises(ValueError, match="push_up_strategy.*'median'"):
        AdaptivePrecisionController(["a"], push_up_strategy="median")
    with pytest.raises(ValueError, match="unique"):
        AdaptivePrecisionController(["a", "a"])
