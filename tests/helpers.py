"""Small builders shared by the tests."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import nn

from lit_methods.datamodules import InMemoryVisionDataModule
from lit_methods.ssl.monitors import WeightedKNNClassifier


def cpu_trainer(**overrides: Any) -> L.Trainer:
    """A quiet single-process CPU Trainer for tests: no logger, checkpoints, progress bar or summary."""
    defaults: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return L.Trainer(**(defaults | overrides))


def frozen_knn_accuracy(model: nn.Module, datamodule: InMemoryVisionDataModule, k: int = 20) -> float:
    """Weighted kNN (``k``, T=0.1) accuracy of ``model``'s eval-mode features (``forward_features`` of a backbone,
    else the forward of an SSL method): the datamodule's un-augmented training images as the bank, its test images
    as the queries, turned into inputs as the datamodule's batches are (:meth:`to_inputs`). The model's train/eval
    mode is restored."""
    datamodule.setup("fit")
    datamodule.setup("test")
    featurize = getattr(model, "forward_features", model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            knn = WeightedKNNClassifier(datamodule.num_classes, k=k, temperature=0.1)
            knn.update(
                bank_features=featurize(datamodule.to_inputs(datamodule.train_images)),
                bank_targets=datamodule.train_labels,
                test_features=featurize(datamodule.to_inputs(datamodule.test_images)),
                test_targets=datamodule.test_labels,
            )
            return float(knn.compute())
    finally:
        model.train(was_training)
