"""Fixed-point quantization layers and AdaPT's precision-switching rules (shared pieces, like ``nets`` and
``losses``: callbacks may import them)."""

from .adapt import AdaptivePrecisionController, push_down, push_up, push_up_increment, quantization_kl
from .fixed_point import FixedPointQuantization, fixed_point_quantize, straight_through

__all__ = [
    "AdaptivePrecisionController",
    "FixedPointQuantization",
    "fixed_point_quantize",
    "push_down",
    "push_up",
    "push_up_increment",
    "quantization_kl",
    "straight_through",
]
