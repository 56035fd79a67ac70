"""Which weights survive a pruning step: global magnitude pruning with AP's removal of negative, least-moved weights.

Liu et al., "AP: Selective Activation for De-sparsifying Pruned Neural Networks", TMLR 2023,
https://arxiv.org/abs/2212.06145, on the lottery-ticket pruner (Frankle & Carbin 2019,
https://arxiv.org/abs/1803.03635): remove the smallest-magnitude surviving weights globally; AP spends a share of
that budget on surviving *negative* weights that moved least during the cycle (removing negative inputs raises
pre-activations, so fewer ReLUs are dead). Everything works on flat vectors of all prunable weights.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

__all__ = ["masked_share", "select_surviving_weights", "smallest_indices"]


def smallest_indices(eligible: Tensor, scores: Tensor, count: int) -> Tensor:
    """Indices of the ``count`` smallest ``scores`` among ``eligible`` entries (ties: lowest index first)."""
    return torch.argsort(scores.masked_fill(~eligible, math.inf), stable=True)[:count]


@torch.no_grad()
def select_surviving_weights(
    weights: Tensor, cycle_start: Tensor, alive: Tensor, prune_rate: float, ap_rate: float
) -> tuple[Tensor, dict[str, int]]:
    """One pruning step of IMP + AP on flat vectors; returns the new alive mask and the removal counts.

    With ``n = alive.sum()``: ``round(prune_rate * n)`` weights are removed in all. First the base pruner removes
    ``round(prune_rate * n) - round(ap_rate * n)`` alive weights of smallest ``|w|``; then AP removes
    ``round(ap_rate * n)`` of the still-alive weights with ``w < 0``, those of smallest movement
    ``|w - cycle_start|`` (the official code's order and counts). If fewer negative weights are alive, the shortfall
    is removed by magnitude so that the schedule holds. Ties are broken by position, deterministically.
    """
    alive = alive.clone()
    n_alive = int(alive.sum())
    n_total = round(prune_rate * n_alive)
    n_ap = round(ap_rate * n_alive)
    magnitude = weights.abs()
    alive[smallest_indices(alive, magnitude, n_total - n_ap)] = False
    negative = alive & (weights < 0)
    n_ap_removed = min(n_ap, int(negative.sum()))
    alive[smallest_indices(negative, (weights - cycle_start).abs(), n_ap_removed)] = False
    alive[smallest_indices(alive, magnitude, n_ap - n_ap_removed)] = False
    counts = {"magnitude": n_total - n_ap, "ap": n_ap_removed, "shortfall": n_ap - n_ap_removed}
    return alive, counts


def masked_share(masks: Iterable[Tensor]) -> float:
    """Share of the entries of ``masks`` (1 kept, 0 pruned) that are pruned: the sparsity of the masked weights."""
    masks = list(masks)
    total = sum(m.numel() for m in masks)
    return 1.0 - sum(int(m.sum()) for m in masks) / total
