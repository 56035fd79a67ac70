"""Gradient and distribution matching: the DC layer-wise distance and the DM loss, shared by DCC and FYI's DM."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["gradient_distance", "layer_distance"]


def layer_distance(real: Tensor, syn: Tensor) -> Tensor:
    """DC's distance of one parameter's gradients (Zhao et al., arXiv:2006.05929): the gradient is viewed as one row
    per output unit (conv: ``(out, in * kh * kw)``, linear: ``(out, in)``) and the distance is the sum over rows of
    ``1 - cos(real_row, syn_row)`` (with 1e-6 in the denominator as the official code); 1-d gradients (biases, norm
    parameters) count 0, as in the official code."""
    if real.ndim == 1:
        return torch.zeros((), device=syn.device, dtype=syn.dtype)
    real, syn = real.reshape(real.shape[0], -1), syn.reshape(syn.shape[0], -1)
    cosine = (real * syn).sum(-1) / (real.norm(dim=-1) * syn.norm(dim=-1) + 1e-6)
    return (1.0 - cosine).sum()


def gradient_distance(real: Sequence[Tensor], syn: Sequence[Tensor]) -> Tensor:
    """Sum of :func:`layer_distance` over the parameters of a network."""
    return sum((layer_distance(r, s) for r, s in zip(real, syn)), torch.zeros((), device=syn[0].device))
