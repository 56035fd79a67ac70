"""Index selections of a labelled training split: long-tailed (CIFAR-LT) and per-class subsets."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["long_tailed_counts", "long_tailed_indices", "per_class_subset_indices"]


def long_tailed_counts(max_count: int, num_classes: int, imbalance_factor: float) -> list[int]:
    """Images kept per class, ``floor(max_count * imbalance_factor ** (-i / (num_classes - 1)))`` for class ``i``.

    The exponential profile of CIFAR-10/100-LT (Cao et al., "Learning Imbalanced Datasets with Label-Distribution-
    Aware Margin Loss", arXiv:1906.07413): the head class keeps ``max_count`` images, the tail
    ``max_count / imbalance_factor``.
    """
    if imbalance_factor < 1:
        raise ValueError(f"imbalance_factor must be >= 1, got {imbalance_factor}")
    if num_classes == 1:
        return [max_count]
    return [int(max_count * imbalance_factor ** (-i / (num_classes - 1))) for i in range(num_classes)]


def _class_positions(labels: Tensor, num_classes: int) -> list[Tensor]:
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got range [{labels.min()}, {labels.max()}]")
    return [torch.nonzero(labels == c).flatten() for c in range(num_classes)]


def long_tailed_indices(labels: Tensor, num_classes: int, imbalance_factor: float) -> Tensor:
    """Keep the first ``long_tailed_counts(...)[c]`` images of each class ``c`` (in file order, as the LDAM code).

    The head size is the smallest class count of the balanced split, so every class can supply its share.
    """
    positions = _class_positions(labels, num_classes)
    max_count = min(len(p) for p in positions)
    counts = long_tailed_counts(max_count, num_classes, imbalance_factor)
    if min(counts) < 1:
        raise ValueError(
            f"imbalance_factor={imbalance_factor} leaves class {counts.index(min(counts))} empty "
            f"(head class has {max_count} images)"
        )
    return torch.cat([p[:n] for p, n in zip(positions, counts)]).sort().values


def per_class_subset_indices(labels: Tensor, num_classes: int, samples_per_class: int, seed: int) -> Tensor:
    """``samples_per_class`` images of every class, drawn without replacement with ``seed``."""
    positions = _class_positions(labels, num_classes)
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for c, p in enumerate(positions):
        if len(p) < samples_per_class:
            raise ValueError(f"samples_per_class={samples_per_class} but class {c} has only {len(p)} images")
        chosen.append(p[torch.randperm(len(p), generator=generator)[:samples_per_class]])
    return torch.cat(chosen).sort().values
