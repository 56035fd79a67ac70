"""Per-sample gradient clipping: the factor that scales a gradient to at most a given norm.

Abadi et al., "Deep Learning with Differential Privacy", https://arxiv.org/abs/1607.00133 (clipping per sample);
the formula, with its small constant added to the norm, is opacus' (and the official DiceSGD code's).
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["NORM_EPS", "clip_factors"]

NORM_EPS = 1e-6  # added to every norm before dividing (as opacus' clipping and the official DiceSGD code do)


def clip_factors(norms: Tensor, clip_norm: float) -> Tensor:
    """``min(1, C / (||g|| + 1e-6))`` for each norm ``||g||`` in ``norms``: the factors that clip each gradient to
    norm ``C = clip_norm`` (``inf`` gives factors of 1)."""
    return (clip_norm / (norms + NORM_EPS)).clamp(max=1.0)
