"""The training split with each sample's position: what per-sample selection (worst-case forget sets) needs."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor

from lit_methods.datamodules import InMemoryVisionDataModule

__all__ = ["IndexedDataModule"]


class IndexedDataModule(L.LightningDataModule):
    """``datamodule`` whose training batches also carry ``index``, each sample's position in the training split
    (validation and test batches are unchanged). The data facts (``num_classes``, ``in_channels``, ``image_size``,
    ``mean``, ``std``, ``inputs_normalized``) and the in-memory splits are those of ``datamodule``.

    Args:
        datamodule: the dataset, an :class:`~lit_methods.datamodules.InMemoryVisionDataModule`.
    """

    def __init__(self, datamodule: InMemoryVisionDataModule) -> None:
        super().__init__()
        if not isinstance(datamodule, InMemoryVisionDataModule):
            raise ValueError(f"IndexedDataModule wraps an InMemoryVisionDataModule, got {datamodule!r}")
        self.datamodule = datamodule

    num_classes = property(lambda self: self.datamodule.num_classes)
    in_channels = property(lambda self: self.datamodule.in_channels)
    image_size = property(lambda self: self.datamodule.image_size)
    mean = property(lambda self: self.datamodule.mean)
    std = property(lambda self: self.datamodule.std)
    inputs_normalized = property(lambda self: self.datamodule.inputs_normalized)
    train_images = property(lambda self: self.datamodule.train_images)
    train_labels = property(lambda self: self.datamodule.train_labels)
    test_images = property(lambda self: self.datamodule.test_images)
    test_labels = property(lambda self: self.datamodule.test_labels)

    def prepare_data(self) -> None:
        self.datamodule.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        self.datamodule.trainer = self.trainer
        self.datamodule.setup(stage)

    def train_dataloader(self) -> Any:
        dm = self.datamodule
        if dm.train_labels is None:
            raise RuntimeError("IndexedDataModule.setup('fit') has not loaded the training split yet")
        index = torch.arange(len(dm.train_labels))
        return dm._loader(dm.train_images, dm.train_labels, train=True, extras={"index": index})

    def val_dataloader(self) -> Any:
        return self.datamodule.val_dataloader()

    def test_dataloader(self) -> Any:
        return self.datamodule.test_dataloader()

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return self.datamodule.on_after_batch_transfer(batch, dataloader_idx)

    def to_inputs(self, pixels: Tensor) -> Tensor:
        return self.datamodule.to_inputs(pixels)
