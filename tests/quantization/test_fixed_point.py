"""Fixed-point quantizer: the grid and range of the format, unbiased stochastic rounding, nearest rounding against a
naive reference, and the straight-through gradient reaching the fp32 master of a parametrized layer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from lit_methods.quantization.fixed_point import FixedPointQuantization, fixed_point_quantize


@pytest.mark.parametrize("word_length, fraction_length", [(8, 4), (4, 1), (12, 10), (16, 0)])
@pytest.mark.parametrize("stochastic", [True, False])
def test_outputs_lie_on_the_grid_inside_the_range(word_length, fraction_length, stochastic):
    values = torch.randn(5000, generator=torch.Generator().manual_seed(0)) * 2.0 ** (word_length - fraction_length)
    quantized = fixed_point_quantize(values, word_length, fraction_length, stochastic=stochastic)
    integers = quantized.double() * 2.0**fraction_length
    assert torch.equal(integers, integers.round())
    assert integers.min() >= -(2.0 ** (word_length - 1)) and integers.max() <= 2.0 ** (word_length - 1) - 1
    # the range's ends are reached by saturation, and nothing inside it moves by a grid step or more
    assert integers.min() == -(2.0 ** (word_length - 1)) and integers.max() == 2.0 ** (word_length - 1) - 1
    inside = values.abs() < 2.0 ** (word_length - 1 - fraction_length) - 1
    assert ((quantized - values)[inside].abs() < 2.0**-fraction_length).all()


def test_stochastic_rounding_is_unbiased():
    values = torch.tensor([0.3, -1.23, 0.01, 2.777])
    draws = fixed_point_quantize(values.repeat(10_000, 1), 8, 2, generator=torch.Generator().manual_seed(1))
    # grid step 0.25: the mean of 10k draws has a standard deviation <= 0.125 / 100; nearest rounding is off by >= 0.02
    assert (draws.mean(0) - values).abs().max() < 4e-3
    # a value exactly on the grid is never moved
    assert torch.equal(fixed_point_quantize(torch.full((100,), 0.75), 8, 2), torch.full((100,), 0.75))


def test_nearest_rounding_matches_a_naive_reference():
    values = torch.linspace(-3.1, 3.1, 997)
    quantized = fixed_point_quantize(values, 6, 3, stochastic=False)
    for value, result in zip(values.tolist(), quantized.tolist()):
        candidates = [k / 8 for k in range(-32, 32)]
        nearest = min(candidates, key=lambda c: (abs(c - value), abs(c * 8) % 2))  # ties to the even integer
        assert result == nearest, value


@pytest.mark.parametrize(
    "word_length, fraction_length, match",
    [(0, 0, "word_length.*0"), (33, 4, "word_length.*33"), (8, -1, "fraction_length.*-1"), (8.0, 4, "8.0")],
)
def test_bad_formats_are_rejected(word_length, fraction_length, match):
    with pytest.raises(ValueError, match=match):
        FixedPointQuantization(word_length, fraction_length)
    with pytest.raises(ValueError, match=match):
        fixed_point_quantize(torch.zeros(3), word_length, fraction_length)


def test_parametrized_layer_computes_with_quantized_weights_and_the_master_gets_the_straight_through_gradient():
    torch.manual_seed(0)
    layer = nn.Linear(6, 3)
    parametrize.register_parametrization(layer, "weight", FixedPointQuantization(8, 4))
    master = layer.parametrizations.weight.original
    assert master.dtype == torch.float32
    inputs, targets = torch.randn(5, 6), torch.randn(5, 3)
    generator = torch.Generator().manual_seed(3)
    layer.parametrizations.weight[0].generator = generator
    F.mse_loss(layer(inputs), targets).backward()
    # the reference: the same stochastic draw as an ordinary leaf tensor
    reference_weight = fixed_point_quantize(master, 8, 4, generator=torch.Generator().manual_seed(3))
    reference_weight.requires_grad_(True)
    F.mse_loss(F.linear(inputs, reference_weight, layer.bias), targets).backward()
    assert torch.equal(master.grad, reference_weight.grad)
    assert not torch.equal(master.detach(), reference_weight.detach())  # the master itself is not on the grid
    layer.eval()
    assert torch.equal(layer.weight, fixed_point_quantize(master, 8, 4, stochastic=False))
