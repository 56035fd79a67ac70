"""Digits datamodule on scikit-learn's bundled 8x8 digits (no download)."""

from __future__ import annotations

import math
from collections import Counter

import lightning as L
import pytest
import torch
from torch import nn

from lit_methods.datamodules.digits import DigitsDataModule, load_digits_uint8

sklearn_datasets = pytest.importorskip("sklearn.datasets")


def image_counter(images: torch.Tensor) -> Counter[bytes]:
    return Counter(image.numpy().tobytes() for image in images)


def test_load_digits_uint8_scales_0_16_to_0_255() -> None:
    images, labels = load_digits_uint8()
    bunch = sklearn_datasets.load_digits()
    assert images.shape == (1797, 1, 8, 8) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64 and labels.tolist() == bunch.target.tolist()
    assert int(images.min()) == 0 and int(images.max()) == 255
    expected = [[round(v * 255 / 16) for v in row] for row in bunch.images[0]]
    assert images[0, 0].tolist() == expected
    # Every grey level 0..16 maps to its own byte.
    mapping = {int(v): int(b) for v, b in zip(bunch.images.ravel(), images.numpy().ravel())}
    assert mapping == {v: round(v * 255 / 16) for v in range(17)}


def test_split_sizes_partition_and_stratification() -> None:
    dm = DigitsDataModule()
    dm.setup()
    assert dm.train_images is not None and dm.train_labels is not None
    assert dm.test_images is not None and dm.test_labels is not None
    assert len(dm.test_labels) == math.ceil(1797 * 0.25) == 450
    assert len(dm.train_labels) == 1797 - 450
    all_images, all_labels = load_digits_uint8()
    assert image_counter(dm.train_images) + image_counter(dm.test_images) == image_counter(all_images)
    assert torch.bincount(torch.cat([dm.train_labels, dm.test_labels])).tolist() == torch.bincount(all_labels).tolist()
    # Stratified: every class contributes its share to the test split, to within one image.
    for count, total in zip(torch.bincount(dm.test_labels, minlength=10), torch.bincount(all_labels)):
        assert abs(int(count) - int(total) * 0.25) <= 1
    assert dm.train_images.shape[1:] == (1, 8, 8) and dm.train_images.dtype == torch.uint8


def test_split_is_seeded_and_follows_test_fraction() -> None:
    def test_split(seed: int, test_fraction: float = 0.25) -> torch.Tensor:
        images, _ = DigitsDataModule(seed=seed, test_fraction=test_fraction).load_split(train=False)
        return images

    first = test_split(0)
    torch.testing.assert_close(test_split(0), first, rtol=0, atol=0)
    assert image_counter(test_split(1)) != image_counter(first)
    assert len(test_split(0, 0.1)) == math.ceil(1797 * 0.1)


def test_mean_and_std_attributes_match_the_data() -> None:
    images, _ = load_digits_uint8()
    pixels = images.double() / 255.0
    assert DigitsDataModule.mean[0] == pytest.approx(pixels.mean().item(), abs=1e-4)
    assert DigitsDataModule.std[0] == pytest.approx(pixels.std(unbiased=False).item(), abs=1e-4)


def test_attributes_and_defaults() -> None:
    dm = DigitsDataModule()
    assert (dm.num_classes, dm.in_channels, dm.image_size) == (10, 1, (8, 8))
    assert (dm.crop_padding, dm.horizontal_flip, dm.test_fraction) == (1, False, 0.25)
    assert (dm.augment.crop_padding, dm.augment.horizontal_flip) == (1, False)


def test_download_is_a_no_op(tmp_path) -> None:
    DigitsDataModule(data_dir=tmp_path / "nowhere", download=True).prepare_data()
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("test_fraction", [0.0, 1.0, 1.5, -0.1, float("nan")])
def test_invalid_test_fraction(test_fraction: float) -> None:
    with pytest.raises(ValueError, match=f"test_fraction.*{test_fraction}"):
        DigitsDataModule(test_fraction=test_fraction)


def test_val_split_and_samples_per_class() -> None:
    dm = DigitsDataModule(val_split=100, samples_per_class=50, seed=3)
    dm.setup("fit")
    assert dm.train_labels is not None and dm.val_labels is not None
    assert len(dm.val_labels) == 100 and len(dm.train_labels) == 400
    assert torch.bincount(torch.cat([dm.train_labels, dm.val_labels])).tolist() == [50] * 10


def test_trains_one_epoch_through_the_fast_path(tmp_path) -> None:
    """End to end with a Trainer: training batches arrive augmented as float32, validation batches normalized."""

    class Probe(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
            self.seen: dict[str, list[torch.Tensor]] = {"train": [], "val": []}

        def step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
            images, labels = batch["inputs"], batch["targets"]
            self.seen[stage].append(images)
            return nn.functional.cross_entropy(self.net(images), labels)

        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            return self.step(batch, "train")

        def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
            self.step(batch, "val")

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = DigitsDataModule(batch_size=256, val_split=0.2, seed=0)
    model = Probe()
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=dm)
    assert dm.val_images is not None
    train, val = model.seen["train"], model.seen["val"]
    assert len(train) == math.ceil((1347 - 269) / 256) and all(b.dtype == torch.float32 for b in train + val)
    expected_val = (dm.val_images.double() / 255.0 - dm.mean[0]) / dm.std[0]
    torch.testing.assert_close(torch.cat(val).double(), expected_val, rtol=0, atol=1e-5)
