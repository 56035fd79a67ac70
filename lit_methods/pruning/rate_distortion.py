"""Layer-adaptive unstructured pruning by rate-distortion: per-layer output-distortion curves and their exact
dynamic-programming allocation under a global sparsity budget.

Xu, Wang et al., "Efficient Joint Optimization of Layer-Adaptive Weight Pruning in Deep Neural Networks", ICCV 2023,
https://arxiv.org/abs/2308.10438; after the official ``tools/pruners.py`` (``gen_rd_curves``) and ``tools/algo.py``
(``dp_pruning``) of github.com/Akimoto-Cris/RD_PRUNE as summarised in the project's card. Within a layer pruning is by
magnitude; the allocation assumes that the distortions of pruning several layers add up.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "dp_allocate",
    "fill_budget",
    "magnitude_mask",
    "output_distortion",
    "rd_curves",
]


def magnitude_mask(weight: Tensor, amount: float, mask: Tensor | None = None) -> Tensor:
    """Keep-mask (1 kept) of ``weight`` with the ``round(amount * numel)`` smallest ``|w|`` removed; entries already
    masked out by ``mask`` are removed first (they count towards ``amount``). Ties: lowest index first."""
    scores = weight.detach().abs().flatten().clone()
    if mask is not None:
        scores[mask.flatten() == 0] = -1.0
    removed = round(amount * scores.numel())
    keep = torch.ones_like(scores)
    keep[torch.argsort(scores, stable=True)[:removed]] = 0.0
    return keep.view_as(weight)


def output_distortion(reference: Tensor, output: Tensor, worst_case: bool) -> float:
    """Mean squared difference of ``output`` from ``reference`` (``(N, C)``); with ``worst_case`` the largest
    per-sample mean over classes (the official runs' ``worst_case_curve``)."""
    squared = (output - reference).pow(2).flatten(1).mean(1)
    return float(squared.max() if worst_case else squared.mean())


@torch.no_grad()
def rd_curves(
    model: nn.Module,
    weights: Mapping[str, Tensor],
    inputs: Tensor,
    amounts: Sequence[float],
    masks: Mapping[str, Tensor] | None = None,
    worst_case: bool = True,
) -> Tensor:
    """Distortion ``D[l, k]`` of ``model``'s output on ``inputs`` when only layer ``l``'s weight (``weights``, in
    order) is pruned by magnitude to the share ``amounts[k]`` (on top of ``masks``), the reference being the current
    model's output; each weight is restored after use. Run the model in eval mode."""
    reference = model(inputs)
    curves = torch.zeros(len(weights), len(amounts))
    for l, (name, weight) in enumerate(weights.items()):
        original = weight.detach().clone()
        mask = None if masks is None else masks[name]
        for k, amount in enumerate(amounts):
            weight.mul_(magnitude_mask(original, amount, mask))
            curves[l, k] = output_distortion(reference, model(inputs), worst_case)
            weight.copy_(original)
    return curves


def dp_allocate(
    sizes: Sequence[int],
    curves: Tensor,
    amounts: Sequence[float],
    kept_budget: int,
    min_amounts: Sequence[float] | None = None,
    unit: int = 1,
) -> list[int]:
    """The grid index ``k_l`` per layer minimising ``sum_l curves[l, k_l]`` with at most ``kept_budget`` weights kept
    in all (layer ``l`` keeps ``round(sizes[l] * (1 - amounts[k]))``), and ``amounts[k_l] >= min_amounts[l]``.

    Exact dynamic programming over kept counts in units of ``unit`` weights (each layer's count rounded up to whole
    units, so the budget holds; ``unit=1`` is exact). Raises when no allocation meets the budget.
    """
    amounts_t = torch.as_tensor(list(amounts), dtype=torch.float64)
    num_layers = len(sizes)
    if curves.shape != (num_layers, len(amounts_t)):
        raise ValueError(f"curves must have shape ({num_layers}, {len(amounts_t)}), got {tuple(curves.shape)}")
    minimum = torch.zeros(num_layers) if min_amounts is None else torch.as_tensor(list(min_amounts))
    capacity = kept_budget // unit
    inf = float("inf")
    best = torch.full((capacity + 1,), inf, dtype=torch.float64)
    best[0] = 0.0
    choices = torch.zeros(num_layers, capacity + 1, dtype=torch.long)
    for l, size in enumerate(sizes):
        kept = [-(-round(size * (1.0 - float(a))) // unit) for a in amounts_t]  # ceil to units
        new = torch.full_like(best, inf)
        for k, cost in enumerate(kept):
            if float(amounts_t[k]) < float(minimum[l]) - 1e-12 or cost > capacity:
                continue
            candidate = torch.full_like(best, inf)
            candidate[cost:] = best[: capacity + 1 - cost] + float(curves[l, k])
            better = candidate < new
            new = torch.where(better, candidate, new)
            choices[l] = torch.where(better, torch.full_like(choices[l], k), choices[l])
        best = new
    if torch.isinf(best).all():
        raise ValueError(f"no allocation keeps at most {kept_budget} weights within the grid and min_amounts")
    s = int(torch.argmin(best))
    picked = [0] * num_layers
    for l in range(num_layers - 1, -1, -1):
        k = int(choices[l, s])
        picked[l] = k
        s -= -(-round(sizes[l] * (1.0 - float(amounts_t[k]))) // unit)
    return picked


def fill_budget(weights: Mapping[str, Tensor], masks: dict[str, Tensor], kept_budget: int,
                frozen: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Give back the largest-magnitude masked weights (global ranking) until exactly ``min(kept_budget, numel)``
    weights are kept; ``frozen`` masks mark weights that may not come back (pruned in an earlier round)."""
    names = list(weights)
    flat_mask = torch.cat([masks[n].flatten() for n in names]).clone()
    slack = kept_budget - int(flat_mask.sum())
    if slack <= 0:
        return masks
    scores = torch.cat([weights[n].detach().abs().flatten() for n in names])
    eligible = flat_mask == 0
    if frozen is not None:
        eligible &= torch.cat([frozen[n].flatten() for n in names]) > 0
    scores = scores.masked_fill(~eligible, -1.0)
    order = torch.argsort(scores, descending=True, stable=True)[: min(slack, int(eligible.sum()))]
    flat_mask[order] = 1.0
    return {n: m.view_as(masks[n]) for n, m in zip(names, flat_mask.split([masks[n].numel() for n in names]))}
