"""Signed fixed-point numbers with stochastic rounding, and the fake-quantization pieces built on them.

A fixed-point format ``(word_length, fraction_length)`` holds the integers ``[-2^(WL-1), 2^(WL-1) - 1]`` scaled by
``2^-FL``: ``word_length`` bits in all (sign included), ``fraction_length`` of them after the binary point. This is
the format of qtorch's ``fixed_point_quantize`` used by AdaPT (Kummer et al., "AdaPT: Adaptive Precision Training",
https://arxiv.org/abs/2107.13490); it is written here in plain torch so nothing is compiled at import time.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["FixedPointQuantization", "check_fixed_point_format", "fixed_point_quantize", "straight_through"]

MAX_WORD_LENGTH = 32


def check_fixed_point_format(word_length: int, fraction_length: int) -> None:
    """Raise ``ValueError`` unless ``1 <= word_length <= 32`` and ``0 <= fraction_length <= 32`` are ints."""
    for name, value, low in (("word_length", word_length, 1), ("fraction_length", fraction_length, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= MAX_WORD_LENGTH:
            raise ValueError(f"{name} must be an integer in [{low}, {MAX_WORD_LENGTH}], got {value!r}")


def fixed_point_quantize(
    values: Tensor,
    word_length: int,
    fraction_length: int,
    stochastic: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Round ``values`` onto the signed ``(word_length, fraction_length)`` fixed-point grid (no gradient).

    Stochastic rounding takes ``floor(x * 2^FL + u)`` with ``u ~ U[0, 1)`` (unbiased inside the range); otherwise
    round to nearest. Values outside the range saturate to its ends. The arithmetic runs in float64 so formats up to
    32 bits are exact; the result has the dtype of ``values``.
    """
    check_fixed_point_format(word_length, fraction_length)
    scale = 2.0**fraction_length
    scaled = values.detach().double() * scale
    if stochastic:
        noise = torch.rand(scaled.shape, generator=generator, device=scaled.device, dtype=scaled.dtype)
        integers = torch.floor(scaled + noise)
    else:
        integers = torch.round(scaled)
    largest = 2.0 ** (word_length - 1)
    return (integers.clamp(-largest, largest - 1) / scale).to(values.dtype)


def straight_through(values: Tensor, quantized: Tensor) -> Tensor:
    """``quantized`` in the forward pass, identity gradient to ``values`` in the backward pass."""
    return values + (quantized - values).detach()


class FixedPointQuantization(nn.Module):
    """Fake-quantizes a tensor to a fixed-point format with a straight-through gradient.

    Meant as a ``torch.nn.utils.parametrize`` parametrization: the layer's registered parameter (``original``) stays
    the fp32 master copy the optimizer updates, while the layer computes with its quantized value. The format can be
    changed at any time (``word_length`` and ``fraction_length`` are plain attributes). Training rounds
    stochastically from ``generator`` (the global generator when ``None``); evaluation rounds to nearest, so
    evaluation is deterministic.

    Args:
        word_length: total bits, sign included (1..32).
        fraction_length: bits after the binary point (0..32).
    """

    def __init__(self, word_length: int, fraction_length: int) -> None:
        super().__init__()
        check_fixed_point_format(word_length, fraction_length)
        self.word_length = word_length
        self.fraction_length = fraction_length
        self.generator: torch.Generator | None = None

    def set_format(self, word_length: int, fraction_length: int) -> None:
        check_fixed_point_format(word_length, fraction_length)
        self.word_length, self.fraction_length = word_length, fraction_length

    def forward(self, values: Tensor) -> Tensor:
        quantized = fixed_point_quantize(
            values, self.word_length, self.fraction_length, stochastic=self.training, generator=self.generator
        )
        return straight_through(values, quantized)

    def extra_repr(self) -> str:
        return f"word_length={self.word_length}, fraction_length={self.fraction_length}"
