"""ImageClassifier under a 2-process CPU (gloo) DDP run: epoch metrics are synced across ranks."""

from __future__ import annotations

import pytest
import torch

from lit_methods.datamodules import DigitsDataModule
from lit_methods import ImageClassifier
from lit_methods.nets import ConvNet
from tests.ddp_helpers import run_distributed
from tests.helpers import cpu_trainer


def _validate(devices: int, strategy: str) -> dict[str, float]:
    torch.manual_seed(0)
    model = ImageClassifier(ConvNet(num_classes=10, in_channels=1, depth=2, width=8, image_size=8))
    trainer = cpu_trainer(devices=devices, strategy=strategy)
    (metrics,) = trainer.validate(model, datamodule=DigitsDataModule(batch_size=32, val_split=301), verbose=False)
    return metrics


@pytest.mark.ddp
def test_epoch_metrics_are_synced_across_ranks():
    single = _validate(1, "auto")
    rank0, rank1 = run_distributed(_validate, 2, "ddp")
    # each rank saw about half of the 301 validation images (151 and 150), yet both report the global values
    assert rank0 == rank1
    for name in ("val/acc", "val/acc_top5", "val/loss"):
        assert rank0[name] == pytest.approx(single[name], rel=1e-5), name
