"""Hard-batch re-training (DyBAT; Sahayam, Zakkam, Jayaraman, "Can we learn better with hard samples?",
arXiv:2304.03486, https://arxiv.org/abs/2304.03486; official code ``imjohnzakkam/DyBAT``)."""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor

from lit_methods.base import ImageClassifier
from lit_methods.datamodules.batch import as_batch

__all__ = ["HardBatchClassifier"]


class HardBatchClassifier(ImageClassifier):
    """:class:`~lit_methods.ImageClassifier` that reports each training batch's loss to the hard-batch selector.

    Train it on :class:`lit_methods.datamodules.hard_batches.HardBatchDataModule`, whose training batches are
    ``(images, labels, batch_id)``: every training step all-gathers ``(batch_id, loss)`` over the processes and hands
    them to the datamodule's :meth:`~lit_methods.datamodules.hard_batches.HardBatchDataModule.record_batch_losses`, so the
    selector ranks every fixed batch by its latest loss (the detached loss of the forward pass before that step's
    update, as the official code records it). Which batches a pass trains is decided by the datamodule; the
    objective, metrics and optimizer are those of :class:`~lit_methods.ImageClassifier`. Give the trainer
    ``max_steps = epochs * b`` (see :meth:`~lit_methods.datamodules.hard_batches.HardBatchDataModule.budget_steps`) and
    ``max_epochs: -1``; per-step LR schedules then span the whole budget. Resuming from any checkpoint (end of a
    pass, validation end, every ``n`` steps) continues exactly: the datamodule's checkpoint state holds the
    selector's losses and the loader's position (see :class:`~lit_methods.datamodules.hard_batches.HardBatchLoader` for how
    Lightning re-enters the saved epoch; the first epoch after a resume starts without ``on_train_epoch_start``, as
    Lightning restarts it). Under DDP the exact resume holds from pass boundaries.

    Args:
        **kwargs: the arguments of :class:`~lit_methods.ImageClassifier`.
    """

    slug: ClassVar[str] = "hard-batches"

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        batch = as_batch(batch)
        if "batch_id" not in batch:
            raise ValueError(
                f"HardBatchClassifier expects training batches with a batch_id field, got the fields {sorted(batch)}: "
                "train it on lit_methods.datamodules.hard_batches.HardBatchDataModule"
            )
        loss = super().training_step(batch, batch_idx)
        datamodule = self.trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "record_batch_losses"):
            raise RuntimeError("HardBatchClassifier needs a datamodule with record_batch_losses (HardBatchDataModule)")
        batch_ids = self.all_gather(batch["batch_id"]).reshape(-1)
        losses = self.all_gather(loss.detach()).reshape(-1)
        datamodule.record_batch_losses(batch_ids, losses)
        return loss
