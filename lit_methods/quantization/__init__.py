"""Fixed-point codecs, quantization layers and AdaPT's precision-switching rules (a library module, like ``nets``
and ``losses``: callbacks may import it)."""

from .adapt import AdaptivePrecisionController, push_down, push_up, push_up_increment, quantization_kl
from .codecs import (
    FixedPointActivation,
    FixedPointQuantization,
    PrunedLayerNormInput,
    fixed_point_integers,
    fixed_point_quantize,
    pack_fixed_point,
    straight_through,
    unpack_fixed_point,
)

__all__ = [
    "AdaptivePrecisionController",
    "FixedPointActivation",
    "FixedPointQuantization",
    "PrunedLayerNormInput",
    "fixed_point_integers",
    "fixed_point_quantize",
    "pack_fixed_point",
    "push_down",
    "push_up",
    "push_up_increment",
    "quantization_kl",
    "straight_through",
    "unpack_fixed_point",
]
