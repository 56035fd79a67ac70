"""Codecs: the fixed-point quantizer's grid and range, unbiased stochastic rounding, nearest rounding against a naive
reference, the straight-through gradient reaching the fp32 master of a parametrized layer; packed fixed-point codes
(round trip, agreement with the quantizer's nearest rounding) and the top-k pruned LayerNorm input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from lit_methods.quantization.codecs import (
    FixedPointActivation,
    FixedPointQuantization,
    PrunedLayerNormInput,
    fixed_point_quantize,
    pack_fixed_point,
    unpack_fixed_point,
)


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


def test_fixed_point_packing_round_trip():
    values = torch.tensor([-5.0, -4.0, -0.3, 0.0, 0.26, 0.74, 3.5, 9.0, 1.2])
    packed = pack_fixed_point(values, 4, 1)
    assert packed.dtype == torch.uint8 and packed.numel() == 5  # two 4-bit codes a byte
    restored = unpack_fixed_point(packed, 4, 1, values.shape, values.dtype)
    assert torch.equal(restored, torch.tensor([-4.0, -4.0, -0.5, 0.0, 0.5, 0.5, 3.5, 3.5, 1.0]))
    grid = torch.arange(-128, 128, dtype=torch.float32) / 16
    assert torch.equal(unpack_fixed_point(pack_fixed_point(grid, 8, 4), 8, 4, grid.shape, grid.dtype), grid)
    two_bit = pack_fixed_point(torch.tensor([-2.0, -1.0, 0.0, 1.0, 5.0]), 2, 0)
    assert two_bit.numel() == 2
    assert unpack_fixed_point(two_bit, 2, 0, torch.Size([5]), torch.float32).tolist() == [-2, -1, 0, 1, 1]
    probabilities = torch.arange(256, dtype=torch.float32) / 256  # unsigned, 8 fractional bits: [0, 255/256]
    packed = pack_fixed_point(probabilities, 8, 8, signed=False)
    assert torch.equal(
        unpack_fixed_point(packed, 8, 8, probabilities.shape, torch.float32, signed=False), probabilities
    )
    edges = unpack_fixed_point(
        pack_fixed_point(torch.tensor([-0.1, 1.0]), 8, 8, False), 8, 8, torch.Size([2]), torch.float32, False
    )
    assert edges.tolist() == [0.0, 255 / 256]


def test_packed_codes_round_like_the_quantizer_and_restore_shape_and_dtype():
    values = 5 * torch.randn(3, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    stored = FixedPointActivation.pack(values, 8, 4)
    assert stored.nbytes == 21 and stored.packed.dtype == torch.uint8
    restored = stored.restore()
    assert restored.shape == values.shape and restored.dtype == torch.float64
    assert torch.equal(restored, fixed_point_quantize(values, 8, 4, stochastic=False))  # one rounding rule
    assert 0 < int((restored != values).sum())
    with pytest.raises(ValueError, match=r"bits must be one of \(2, 4, 8\).*got 3"):
        pack_fixed_point(values, 3, 1)


def test_pruned_layer_norm_input_keeps_the_largest_normalised_values_and_the_row_statistics():
    x = torch.randn(4, 5, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    stored = PrunedLayerNormInput.prune(x, normalized_dims=1, eps=1e-5, keep_ratio=0.1)
    mean = x.mean(-1, keepdim=True)
    std = torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
    normalised = (x - mean) / std
    threshold = normalised.abs().flatten().sort(descending=True).values[31]  # int(0.1 * 320) = 32 kept
    expected = torch.where(normalised.abs() >= threshold, normalised, torch.zeros_like(normalised))
    torch.testing.assert_close(stored.pruned_normalised(), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stored.restore(), mean + std * expected, rtol=1e-12, atol=1e-12)
    assert stored.indices.dtype == torch.int32 and stored.nbytes == 32 * 8 + 32 * 4 + 2 * 20 * 8
