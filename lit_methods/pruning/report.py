"""Per-layer sparsity of a network and its bar chart (the picture users look at after pruning)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["layer_sparsity", "mask_sparsity", "save_sparsity_bar_chart"]

WEIGHTED_TYPES = (nn.modules.conv._ConvNd, nn.Linear)


@torch.no_grad()
def layer_sparsity(model: nn.Module, layer_types: tuple[type[nn.Module], ...] = WEIGHTED_TYPES) -> dict[str, float]:
    """Share of exactly-zero entries of the ``weight`` of every layer of ``layer_types``, by module name."""
    return {
        name: float((module.weight == 0).float().mean())
        for name, module in model.named_modules()
        if isinstance(module, layer_types) and isinstance(getattr(module, "weight", None), Tensor)
    }


def mask_sparsity(masks: Mapping[str, Tensor]) -> dict[str, float]:
    """Share of zero entries of each mask (1 kept, 0 pruned), by name."""
    return {name: 1.0 - float(mask.float().mean()) for name, mask in masks.items()}


def save_sparsity_bar_chart(sparsity: Mapping[str, float], path: str | Path, title: str = "sparsity per layer") -> Path:
    """Write a horizontal bar chart of ``sparsity`` (name -> share in [0, 1]) as a PNG at ``path``; returns it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not sparsity:
        raise ValueError("sparsity is empty: there is no layer to draw")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(sparsity)
    values = [sparsity[name] for name in names]
    figure, axes = plt.subplots(figsize=(7, 0.3 * len(names) + 1.2))
    axes.barh(range(len(names)), values, color="tab:blue")
    axes.set_yticks(range(len(names)), names, fontsize=7)
    axes.invert_yaxis()
    axes.set_xlim(0.0, 1.0)
    axes.set_xlabel("pruned share")
    overall = sum(values) / len(values)
    axes.set_title(f"{title} (mean over layers {overall:.2f})", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
