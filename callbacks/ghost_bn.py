"""Ghost batch normalization as a callback: swap a model's batch norms for ghost batch norms at setup.

Hoffer, Hubara & Soudry, "Train longer, generalize better: closing the generalization gap in large batch training
of neural networks", NeurIPS 2017, https://arxiv.org/abs/1705.08741.

The paper's other two fixes for large batches are plain settings, written in the ``experiments/ghost-bn/`` configs:
the learning rate scaled by ``sqrt(B_large / B_small)`` (``model.lr``), training longer in proportion to
``B_large / B_small`` ("regime adaptation": ``trainer.max_epochs`` and any epoch milestone scaled by that ratio), and
gradient clipping at norm 5 as in the official code (``trainer.gradient_clip_val: 5.0``). ``B_large`` is the global
batch: per-process batch x processes x ``accumulate_grad_batches``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.data import extract_batch_size
from torch import nn

from lit_methods.nets.ghost_batchnorm import (
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    check_virtual_batch_size,
    convert_to_ghost_batchnorm,
)

__all__ = ["GhostBatchNorm"]

_SYNC_BN_MESSAGE = (
    "GhostBatchNorm normalizes each virtual batch of a process's own samples, while sync_batchnorm "
    "(SyncBatchNorm) normalizes over the whole global batch: the two contradict each other. Use "
    "Trainer(sync_batchnorm=False) with the GhostBatchNorm callback"
)


class GhostBatchNorm(Callback):
    """Replace every ``BatchNorm1d``/``BatchNorm2d`` of the LightningModule by ghost batch norm at ``setup``.

    Ghost batch norm (Hoffer et al. 2017, https://arxiv.org/abs/1705.08741) normalizes each virtual batch of
    ``virtual_batch_size`` samples with its own statistics in training; eval uses the running statistics as usual.
    The layers are :class:`lit_methods.nets.GhostBatchNorm1d`/``2d`` (see there how a batch is split, what happens
    when ``virtual_batch_size`` does not divide it, and how running statistics are updated).

    Requires a module with at least one ``BatchNorm1d``/``BatchNorm2d`` (other norms are left alone). The swap keeps
    every parameter, buffer and state-dict key, so checkpoints load into the model with or without the callback, and
    it happens before the optimizer is built. Under DDP each process splits its own local batch; the callback adds no
    communication (with DDP's default ``broadcast_buffers=True`` every process starts each forward from rank 0's
    running statistics, as with plain batch norm). ``Trainer(sync_batchnorm=True)`` is rejected at setup.

    Args:
        virtual_batch_size: samples per virtual batch (the paper uses 128 on CIFAR); a process's batches must be
            larger (an epoch's first batch is checked: an equal or smaller one would be plain batch norm).
    """

    slug: ClassVar[str] = "ghost-bn"

    def __init__(self, virtual_batch_size: int) -> None:
        check_virtual_batch_size(virtual_batch_size)
        self.virtual_batch_size = virtual_batch_size

    def setup(
        self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str
    ) -> None:
        # Lightning has no public flag for Trainer(sync_batchnorm=True): its parallel strategies hold the layer-sync
        # plugin in `_layer_sync` and apply it after this hook. Reading it here fails before any work is done (on CPU
        # the DDP wrapper rejects SyncBatchNorm before `on_fit_start` could); `on_fit_start` checks the result.
        if getattr(trainer.strategy, "_layer_sync", None) is not None:
            raise ValueError(_SYNC_BN_MESSAGE)
        _reject_sync_batchnorm(pl_module)
        convert_to_ghost_batchnorm(pl_module, self.virtual_batch_size)
        if not any(
            isinstance(m, (GhostBatchNorm1d, GhostBatchNorm2d))
            for m in pl_module.modules()
        ):
            raise ValueError(
                f"GhostBatchNorm found no BatchNorm1d or BatchNorm2d layer in {type(pl_module).__name__}; "
                "build the model with batch norm (e.g. norm='batchnorm') or remove the callback"
            )

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # an epoch's first batch no larger than a virtual batch: every batch is one virtual batch, plain batch norm
        if batch_idx != 0:
            return
        batch_size = extract_batch_size(batch)
        if batch_size <= self.virtual_batch_size:
            raise ValueError(
                f"GhostBatchNorm(virtual_batch_size={self.virtual_batch_size}) is given batches of {batch_size} "
                "samples per process: each batch is a single virtual batch, i.e. plain batch norm; use a smaller "
                "virtual_batch_size or a larger batch_size"
            )

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Trainer(sync_batchnorm=True) converts every batch norm, ghost ones included, to SyncBatchNorm after setup;
        # this catches it should the private attribute read in `setup` change.
        _reject_sync_batchnorm(pl_module)


def _reject_sync_batchnorm(module: nn.Module) -> None:
    synced = [
        name for name, m in module.named_modules() if isinstance(m, nn.SyncBatchNorm)
    ]
    if synced:
        raise ValueError(
            f"{_SYNC_BN_MESSAGE} (SyncBatchNorm layers found: {', '.join(synced[:3])})"
        )
