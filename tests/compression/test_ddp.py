"""The compression rows that keep state take identical decisions on every rank of a 2-process (gloo) DDP run."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lit_methods.compression import LotteryOwnership, OTOv2, Polarization, RDPrune
from lit_methods.datamodules import DigitsDataModule
from lit_methods.nets import ConvNet
from tests.compression.nets import TinyResNet
from tests.ddp_helpers import run_distributed
from tests.helpers import cpu_trainer


def _decisions() -> dict[str, list[list]]:
    """Each rank trains every stateful row briefly on its own shard and returns its decisions (as lists: tensors
    sent through the result queue would be shared memory that dies with the worker)."""
    torch.set_num_threads(1)
    data = dict(in_channels=1, image_size=(8, 8), num_classes=10, lr=0.05)

    def fit(model: L.LightningModule, epochs: int) -> None:
        L.seed_everything(0)
        trainer = cpu_trainer(devices=2, strategy="ddp", max_epochs=epochs, limit_train_batches=3, limit_val_batches=0)
        trainer.fit(model, datamodule=DigitsDataModule(batch_size=32))

    def convnet() -> ConvNet:
        return ConvNet(num_classes=10, in_channels=1, depth=2, width=32, norm="batchnorm", image_size=8)

    L.seed_everything(0)
    polarization = Polarization(TinyResNet(width=8, blocks=2), gate_lr=5.0, **data)
    fit(polarization, 1)
    L.seed_everything(0)
    otov2 = OTOv2(TinyResNet(width=8, blocks=2), partition_step=1, projection_step=2, lmbda=5.0, **data)
    fit(otov2, 2)
    L.seed_everything(0)
    rd = RDPrune(convnet(), pretrain_epochs=1, amount_per_iteration=0.5, calibration_size=64, grid_size=20, **data)
    fit(rd, 2)  # prunes at the start of epoch 1, each rank with its own calibration images: rank 0's are broadcast
    L.seed_everything(0)
    lottery = LotteryOwnership(convnet(), signature_layer="features.4", **data)
    fit(lottery, 1)
    decisions = {
        "polarization": list(polarization.keep_masks().values()),
        "otov2": list(otov2.zero_masks().values()),
        "rd-prune": list(rd.mask_dict().values()),
        "lottery-ownership": [*lottery.mask_dict().values(), lottery.offset],
    }
    return {slug: [t.cpu().int().tolist() for t in tensors] for slug, tensors in decisions.items()}


@pytest.mark.ddp
def test_stateful_rows_decide_identically_on_every_rank() -> None:
    rank0, rank1 = run_distributed(_decisions)
    for slug in rank0:
        assert rank0[slug] == rank1[slug], slug
    decided = {slug: [torch.tensor(m) for m in masks] for slug, masks in rank0.items()}
    assert any(not m.all() for m in decided["polarization"])  # decisions were taken (some gates off)
    assert any(m.any() for m in decided["otov2"])  # some exact-zero groups
    assert any(not m.all() for m in decided["rd-prune"])
