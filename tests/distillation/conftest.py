"""Fixtures of the distillation tests: a small buffer of expert trajectories on digits, built once per session."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from lit_methods import ImageClassifier
from lit_methods.datamodules import DigitsDataModule
from lit_methods.distillation.experts import ExpertTrajectorySaver, ZCAWhitenedDataModule
from lit_methods.nets import ConvNet
from tests.distillation.helpers import TINY_NET, digits, one_intra_op_thread
from tests.helpers import cpu_trainer

EXPERTS = 2
EXPERT_EPOCHS = 4


def train_expert(
    buffer: Path, seed: int, width: int = TINY_NET["net_width"], epochs: int = EXPERT_EPOCHS, datamodule=None
) -> None:
    """One expert as the buffer config trains it: the tiny ConvNet, SGD 0.01 without momentum (MTT's buffer.py), on
    ``datamodule`` (default: the shared normalized digits)."""
    L.seed_everything(seed, verbose=False)
    backbone = ConvNet(num_classes=10, in_channels=1, depth=TINY_NET["net_depth"], width=width, image_size=8)
    classifier = ImageClassifier(
        backbone, lr=0.01, momentum=0.0, weight_decay=0.0, nesterov=False, lr_schedule="constant"
    )
    trainer = cpu_trainer(max_epochs=epochs, callbacks=[ExpertTrajectorySaver(str(buffer), seed=seed)])
    trainer.fit(classifier, datamodule=digits() if datamodule is None else datamodule)


@pytest.fixture(scope="session")
def expert_buffer(tmp_path_factory) -> Path:
    buffer = tmp_path_factory.mktemp("experts")
    with one_intra_op_thread():
        for seed in range(EXPERTS):
            train_expert(buffer, seed)
    return buffer


ZCA_EXPERT_EPOCHS = 3


def pixel_digits() -> DigitsDataModule:
    """Digits as [0, 1] pixels (what ZCA whitens)."""
    datamodule = DigitsDataModule(batch_size=64, num_workers=0, normalize=False)
    datamodule.setup("fit")
    return datamodule


@pytest.fixture(scope="session")
def zca_expert_buffer(tmp_path_factory) -> Path:
    """One expert trained on ZCA-whitened digits (3 epochs): a buffer with ``zca.pt``."""
    buffer = tmp_path_factory.mktemp("zca_experts")
    with one_intra_op_thread():
        train_expert(buffer, 0, epochs=ZCA_EXPERT_EPOCHS, datamodule=ZCAWhitenedDataModule(pixel_digits()))
    return buffer


@pytest.fixture(autouse=True)
def one_thread() -> None:
    """Tiny nets on a shared CPU: one intra-op thread is much faster than several (the root conftest restores it)."""
    torch.set_num_threads(1)
