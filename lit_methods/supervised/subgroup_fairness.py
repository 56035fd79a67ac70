"""Subgroup discrepancy (Chiu, Chen & Ma, "Better May Not Be Fairer: A Study on Subgroup Discrepancy in Image
Classification", ICCV 2023, arXiv:2212.08649): per-subgroup accuracy and the MacroStd metric."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from lit_methods.base import ImageClassifier
from lit_methods.datamodules.batch import as_batch
from lit_methods.supervised.flowaug import FlowAug

__all__ = ["MacroStd", "SubgroupClassifier"]


class MacroStd(Metric):
    """Macro average over classes of the subgroup-size-weighted standard deviation of subgroup accuracies.

    For class ``c`` with ``n[c, g]`` images and accuracy ``acc[c, g]`` in subgroup ``g``:
    ``std_c = sqrt(sum_g n[c, g] (acc[c, g] - mu_c)^2 / sum_g n[c, g])`` with ``mu_c`` the class accuracy
    (the size-weighted mean); MacroStd is the mean of ``std_c`` over the classes that have images. Empty subgroups
    are skipped. Lower is more consistent across subgroups. The states are per-(class, subgroup) counts summed
    across processes, so the value under DDP equals the single-process value on the union of the data.
    """

    slug: ClassVar[str] = "subgroup-fairness"

    full_state_update = False
    higher_is_better = False

    def __init__(self, num_classes: int, num_subgroups: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if num_classes < 1 or num_subgroups < 1:
            raise ValueError(f"num_classes and num_subgroups must be >= 1, got {num_classes}, {num_subgroups}")
        self.num_classes = num_classes
        self.num_subgroups = num_subgroups
        self.add_state("correct", torch.zeros(num_classes, num_subgroups), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(num_classes, num_subgroups), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor, subgroup: Tensor) -> None:
        """``preds``: class indices ``(N,)`` or scores ``(N, C)``; ``target`` and ``subgroup``: ``(N,)``."""
        if preds.dim() == 2:
            preds = preds.argmax(dim=1)
        if subgroup.min() < 0 or subgroup.max() >= self.num_subgroups:
            raise ValueError(f"subgroup ids must lie in [0, {self.num_subgroups}), got {subgroup.unique().tolist()}")
        cell = target * self.num_subgroups + subgroup
        size = self.num_classes * self.num_subgroups
        self.total += torch.bincount(cell, minlength=size).view_as(self.total).to(self.total.dtype)
        hits = torch.bincount(cell, weights=(preds == target).to(self.total.dtype), minlength=size)
        self.correct += hits.view_as(self.correct)

    def subgroup_accuracy(self) -> Tensor:
        """``(C, G)`` accuracies, NaN where a (class, subgroup) cell is empty."""
        return self.correct / self.total

    def compute(self) -> Tensor:
        per_class = self.total.sum(dim=1)
        present = per_class > 0
        accuracy = torch.where(self.total > 0, self.correct / self.total.clamp(min=1), torch.zeros_like(self.total))
        mean = self.correct.sum(dim=1) / per_class.clamp(min=1)
        variance = (self.total * (accuracy - mean[:, None]) ** 2).sum(dim=1) / per_class.clamp(min=1)
        return variance.sqrt()[present].mean()


class SubgroupClassifier(ImageClassifier):
    """:class:`~lit_methods.ImageClassifier` that also reports subgroup discrepancy on test batches
    with a ``subgroup`` field (e.g. from :class:`lit_methods.datamodules.CIFAR10BDataModule`): ``test/macro_std`` and
    ``test/worst_subgroup_acc`` (the lowest accuracy over the non-empty (class, subgroup) cells). With
    ``flow_augmentation`` the training images pass through :class:`~lit_methods.supervised.FlowAug` (the paper's
    semantic augmentation) after the datamodule's augmentation.

    Args:
        num_subgroups: number of subgroups (8 background colours in CIFAR10-B; linked from the datamodule).
        flow_augmentation: FlowAug applied to training batches, or None.
        **kwargs: the arguments of :class:`~lit_methods.ImageClassifier`.
    """

    def __init__(
        self, backbone: nn.Module, num_subgroups: int = 8, flow_augmentation: FlowAug | None = None, **kwargs: Any
    ) -> None:
        super().__init__(backbone, **kwargs)
        self.num_subgroups = num_subgroups
        self.flow_augmentation = flow_augmentation
        self.test_macro_std = MacroStd(self.num_classes, num_subgroups)

    def shared_step(self, batch: Any, stage: str) -> tuple[Tensor, Tensor, Tensor]:
        batch = as_batch(batch)
        if stage == "train" and self.flow_augmentation is not None:
            batch["inputs"] = self.flow_augmentation(batch["inputs"])
        loss, logits, targets = super().shared_step(batch, stage)
        if stage == "test" and "subgroup" in batch:
            self.test_macro_std.update(logits.detach(), targets, batch["subgroup"])
        return loss, logits, targets

    def on_test_epoch_end(self) -> None:
        if self.test_macro_std.update_count:
            self.log("test/macro_std", self.test_macro_std.compute())
            with self.test_macro_std.sync_context():
                accuracy = self.test_macro_std.subgroup_accuracy()
            self.log("test/worst_subgroup_acc", accuracy[~accuracy.isnan()].min())
        self.test_macro_std.reset()
