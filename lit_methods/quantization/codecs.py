"""Tensor codecs of the quantization techniques: fixed-point rounding (to nearest or stochastic) shared by AdaPT's
fake quantization and SlimFit's packed activations, and SlimFit's top-k pruned LayerNorm inputs.

A fixed-point format ``(word_length, fraction_length)`` holds the integers ``[-2^(WL-1), 2^(WL-1) - 1]`` (signed) or
``[0, 2^WL - 1]`` (unsigned) scaled by ``2^-FL``: ``word_length`` bits in all (the sign included when signed),
``fraction_length`` of them after the binary point. Values outside the range saturate to its ends.

- AdaPT (Kummer et al., "AdaPT: Adaptive Precision Training", https://arxiv.org/abs/2107.13490) fake-quantizes with
  the signed format of qtorch's ``fixed_point_quantize`` (:func:`fixed_point_quantize`,
  :class:`FixedPointQuantization`), written here in plain torch so nothing is compiled at import time.
- SlimFit (Ardakani et al., "SlimFit: Memory-Efficient Fine-Tuning of Transformer-based Models Using Training
  Dynamics", https://arxiv.org/abs/2305.18513) stores activations saved for backward as packed codes
  (:func:`pack_fixed_point`, :class:`FixedPointActivation`) and a frozen LayerNorm's input as its largest normalised
  values (:class:`PrunedLayerNormInput`).

Both round with :func:`fixed_point_integers`; neither uses a per-tensor scale (the formats are fixed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "MAX_WORD_LENGTH",
    "PACKABLE_BITS",
    "FixedPointActivation",
    "FixedPointQuantization",
    "PrunedLayerNormInput",
    "check_fixed_point_format",
    "fixed_point_integers",
    "fixed_point_quantize",
    "pack_fixed_point",
    "straight_through",
    "unpack_fixed_point",
]

MAX_WORD_LENGTH = 32
PACKABLE_BITS = (2, 4, 8)  # code widths that fill a byte exactly


def check_fixed_point_format(word_length: int, fraction_length: int) -> None:
    """Raise ``ValueError`` unless ``1 <= word_length <= 32`` and ``0 <= fraction_length <= 32`` are ints."""
    for name, value, low in (("word_length", word_length, 1), ("fraction_length", fraction_length, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= MAX_WORD_LENGTH:
            raise ValueError(f"{name} must be an integer in [{low}, {MAX_WORD_LENGTH}], got {value!r}")


def fixed_point_integers(
    values: Tensor,
    word_length: int,
    fraction_length: int,
    signed: bool = True,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The integers of the fixed-point grid that ``values * 2^FL`` rounds to, saturated to the format's range, in
    the dtype of ``values`` (pass float64 for exact formats up to 32 bits, float32 suffices up to 24).

    Stochastic rounding takes ``floor(x * 2^FL + u)`` with ``u ~ U[0, 1)`` drawn from ``generator`` (unbiased inside
    the range); otherwise round to nearest (ties to even). Nothing is validated here: callers check the format.
    """
    scaled = values * 2.0**fraction_length
    if stochastic:
        noise = torch.rand(scaled.shape, generator=generator, device=scaled.device, dtype=scaled.dtype)
        integers = torch.floor(scaled + noise)
    else:
        integers = torch.round(scaled)
    if signed:
        largest = 2.0 ** (word_length - 1)
        return integers.clamp(-largest, largest - 1)
    return integers.clamp(0, 2.0**word_length - 1)


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
    integers = fixed_point_integers(
        values.detach().double(), word_length, fraction_length, stochastic=stochastic, generator=generator
    )
    return (integers / 2.0**fraction_length).to(values.dtype)


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


def _check_packable(bits: int) -> None:
    if bits not in PACKABLE_BITS:
        raise ValueError(f"bits must be one of {PACKABLE_BITS} (codes that fill a byte), got {bits!r}")


def pack_fixed_point(values: Tensor, bits: int, fraction_bits: int, signed: bool = True) -> Tensor:
    """Round ``values`` to nearest on the ``bits``-bit grid with ``fraction_bits`` fractional bits (saturating; signed:
    codes in ``[-2**(bits-1), 2**(bits-1))``, unsigned: in ``[0, 2**bits)``) and pack ``8 // bits`` codes into each byte
    of a flat ``uint8`` tensor (``bits`` one of :data:`PACKABLE_BITS`; the rounding runs in float32)."""
    _check_packable(bits)
    integers = fixed_point_integers(values.detach().float(), bits, fraction_bits, signed=signed)
    codes = integers + 2 ** (bits - 1) if signed else integers
    codes = codes.to(torch.uint8).flatten()
    per_byte = 8 // bits
    codes = torch.nn.functional.pad(codes, (0, (-codes.numel()) % per_byte)).view(-1, per_byte)
    packed = torch.zeros(codes.shape[0], dtype=torch.uint8, device=codes.device)
    for slot in range(per_byte):
        packed |= codes[:, slot] << (slot * bits)
    return packed


def unpack_fixed_point(
    packed: Tensor, bits: int, fraction_bits: int, shape: torch.Size, dtype: torch.dtype, signed: bool = True
) -> Tensor:
    """Inverse of :func:`pack_fixed_point`: the rounded values of the original ``shape`` and ``dtype``."""
    _check_packable(bits)
    per_byte = 8 // bits
    mask = 2**bits - 1
    codes = torch.stack([(packed >> (slot * bits)) & mask for slot in range(per_byte)], dim=1).flatten()
    count = shape.numel()
    offset = 2 ** (bits - 1) if signed else 0
    values = (codes[:count].float() - offset) / 2.0**fraction_bits
    return values.view(shape).to(dtype)


@dataclass(frozen=True)
class FixedPointActivation:
    """A tensor stored as packed fixed-point codes (see :func:`pack_fixed_point`): :meth:`pack` encodes,
    :meth:`restore` decodes to the rounded values of the original shape and dtype."""

    packed: Tensor
    bits: int
    fraction_bits: int
    signed: bool
    shape: torch.Size
    dtype: torch.dtype

    @classmethod
    def pack(cls, tensor: Tensor, bits: int, fraction_bits: int, signed: bool = True) -> FixedPointActivation:
        packed = pack_fixed_point(tensor, bits, fraction_bits, signed)
        return cls(packed, bits, fraction_bits, signed, tensor.shape, tensor.dtype)

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes

    def restore(self) -> Tensor:
        return unpack_fixed_point(self.packed, self.bits, self.fraction_bits, self.shape, self.dtype, self.signed)


@dataclass(frozen=True)
class PrunedLayerNormInput:
    """The input of a LayerNorm kept as its ``keep_ratio`` largest-magnitude normalised values (over the whole tensor,
    as SlimFit's official top-k) plus the per-row mean and standard deviation ``sqrt(var + eps)``.

    :meth:`restore` gives ``mean + std * pruned_normalised``, so LayerNorm's backward, which re-normalises its saved
    input with its own mean and rstd, computes the input gradient from the pruned normalised values.
    """

    values: Tensor
    indices: Tensor
    mean: Tensor
    std: Tensor
    shape: torch.Size

    @classmethod
    def prune(cls, tensor: Tensor, normalized_dims: int, eps: float, keep_ratio: float) -> PrunedLayerNormInput:
        dims = tuple(range(-normalized_dims, 0))
        variance, mean = torch.var_mean(tensor, dim=dims, correction=0, keepdim=True)
        std = torch.sqrt(variance + eps)
        normalised = ((tensor - mean) / std).flatten()
        kept = normalised.abs().topk(int(keep_ratio * normalised.numel()), sorted=False).indices
        index_dtype = torch.int32 if normalised.numel() <= torch.iinfo(torch.int32).max else torch.int64
        return cls(normalised[kept], kept.to(index_dtype), mean, std, tensor.shape)

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.indices.nbytes + self.mean.nbytes + self.std.nbytes

    def pruned_normalised(self) -> Tensor:
        flat = self.values.new_zeros(self.shape.numel()).scatter_(0, self.indices.long(), self.values)
        return flat.view(self.shape)

    def restore(self) -> Tensor:
        return self.mean + self.std * self.pruned_normalised()
