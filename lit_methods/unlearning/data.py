"""The training split with each sample's position: what per-sample selection (worst-case forget sets) needs."""

from __future__ import annotations

from typing import Any

import torch

from lit_methods.datamodules import WrappingDataModule

__all__ = ["IndexedDataModule"]


class IndexedDataModule(WrappingDataModule):
    """``datamodule`` whose training batches also carry ``index``, each sample's position in the training split
    (validation and test batches are unchanged). The data facts (``num_classes``, ``in_channels``, ``image_size``,
    ``mean``, ``std``, ``inputs_normalized``) and the in-memory splits are those of ``datamodule``.

    Args:
        datamodule: the dataset, an :class:`~lit_methods.datamodules.InMemoryVisionDataModule`.
    """

    def train_dataloader(self) -> Any:
        dm = self.datamodule
        if dm.train_labels is None:
            raise RuntimeError("IndexedDataModule.setup('fit') has not loaded the training split yet")
        index = torch.arange(len(dm.train_labels))
        return dm.loader_of(dm.train_images, dm.train_labels, train=True, extras={"index": index})
