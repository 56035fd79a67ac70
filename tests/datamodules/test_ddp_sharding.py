"""The fast loader under a 2-process CPU (gloo) DDP run driven by Lightning."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import Tensor

from lit_methods.datamodules.base import InMemoryVisionDataModule
from lit_methods.datamodules.fast import ShardedEpochSampler
from tests.ddp_helpers import run_distributed

NUM_SAMPLES = 23


class IndexedData(InMemoryVisionDataModule):
    """Each image's pixels and label hold its own index, so a batch tells which samples it contains."""

    num_classes = NUM_SAMPLES
    in_channels = 1
    image_size = (4, 4)
    mean = (0.0,)
    std = (1.0,)

    def load_split(self, train: bool) -> tuple[Tensor, Tensor]:
        index = torch.arange(NUM_SAMPLES)
        return index.view(-1, 1, 1, 1).expand(-1, 1, 4, 4).to(torch.uint8).contiguous(), index


class RecordBatches(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.train_seen: dict[int, list[int]] = {}
        self.val_seen: list[int] = []
        self.train_images: list[Tensor] = []

    def training_step(self, batch, batch_idx):
        images, labels = batch["inputs"], batch["targets"]
        self.train_seen.setdefault(self.current_epoch, []).extend(labels.tolist())
        self.train_images.append(images)
        return (self.weight * images.mean()).sum()

    def validation_step(self, batch, batch_idx):
        self.val_seen.extend(batch["targets"].tolist())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _fit_and_record() -> dict:
    torch.manual_seed(0)
    model = RecordBatches()
    data = IndexedData(batch_size=4, crop_padding=1, seed=3)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=data)
    return {"train": model.train_seen, "val": model.val_seen, "first_images": model.train_images[0].tolist()}


@pytest.mark.ddp
def test_each_rank_gets_its_own_shard_without_repeats():
    rank0, rank1 = run_distributed(_fit_and_record)
    for epoch in (0, 1):
        a, b = rank0["train"][epoch], rank1["train"][epoch]
        assert len(a) == len(b) == NUM_SAMPLES // 2
        assert not set(a) & set(b) and len(set(a) | set(b)) == len(a) + len(b)
    # the epochs are different permutations
    assert rank0["train"][0] != rank0["train"][1]
    # validation sees every sample exactly once across the ranks
    assert sorted(rank0["val"] + rank1["val"]) == sorted(list(range(NUM_SAMPLES)) * 2)  # 2 epochs
    # the ranks draw different augmentation parameters
    assert rank0["first_images"] != rank1["first_images"]
    # and the shards are those of the sampler's documented split of the seeded permutation
    for rank, seen in enumerate((rank0, rank1)):
        sampler = ShardedEpochSampler(NUM_SAMPLES, 4, shuffle=True, seed=3, rank=rank, world_size=2)
        sampler.set_epoch(1)
        assert seen["train"][1] == sampler.rank_indices().tolist()
