"""The fast path's pluggable augment: the protocol (pixels or views out, per-epoch seeding of a ``generator``), the
refusal of an augment together with the flags of the default one, and the default augments it replaces."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lit_methods.datamodules import DigitsDataModule, TinyImageNetDataModule
from lit_methods.datamodules.fast import BatchAugment
from lit_methods.datamodules.ssl_views import SSLViewAugment
from tests.downstream_project.augments import ConstantPixels, NoisyViews


class FakeTrainer:
    training = True
    global_rank = 0
    world_size = 1

    def __init__(self, epoch: int) -> None:
        self.current_epoch = epoch


def _training_batch(dm: DigitsDataModule, epoch: int = 0) -> dict:
    dm.setup("fit")
    dm.trainer = FakeTrainer(epoch)  # type: ignore[assignment]
    return dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)


def test_the_flags_build_the_default_augments():
    dm = DigitsDataModule(cutout_size=2)
    assert isinstance(dm.augment, BatchAugment) and dm.augment.cutout_fill == dm.mean
    assert (dm.augment.crop_padding, dm.augment.horizontal_flip, dm.augment.cutout_size) == (1, False, 2)
    ssl = DigitsDataModule(ssl_views=3, ssl_local_views=1, ssl_local_size=4)
    assert isinstance(ssl.augment, SSLViewAugment)
    assert (ssl.augment.global_views, ssl.augment.local_views, ssl.augment.local_size) == (3, 1, 4)


@pytest.mark.parametrize("normalize", [True, False])
def test_an_augment_returning_views_makes_a_views_batch_and_its_generator_is_seeded_per_epoch(normalize):
    augment = NoisyViews(strength=0.2)
    dm = DigitsDataModule(batch_size=16, num_workers=0, augment=augment, normalize=normalize, seed=5)
    batch = _training_batch(dm, epoch=3)
    assert set(batch) == {"views", "targets"} and len(batch["views"]) == 2
    assert augment.generator.initial_seed() == np.random.SeedSequence([5, 0, 3]).generate_state(1)[0]
    raw = dm.train_images[torch.randperm(len(dm.train_images), generator=torch.Generator().manual_seed(5))[:16]]
    augment.generator.manual_seed(int(np.random.SeedSequence([5, 0, 3]).generate_state(1)[0]))
    expected = [dm.to_inputs(view) for view in augment(raw)]  # the same draws: augment, then the inputs step
    for got, want in zip(batch["views"], expected, strict=True):
        torch.testing.assert_close(got, want)
    pixels = not normalize
    assert all((0 <= view.min() and view.max() <= 1) == pixels for view in batch["views"])


def test_an_augment_with_the_flags_of_the_default_one_is_refused():
    augment = ConstantPixels()
    for flags in ({"crop_padding": 3}, {"horizontal_flip": True}, {"ssl_views": 2}, {"cutout_size": 4}):
        with pytest.raises(ValueError, match=f"not both: got {flags}"):
            DigitsDataModule(augment=augment, **flags)
    # a subclass's own defaults are defaults (Digits: crop_padding=1, Tiny-ImageNet: crop_padding=8)
    assert DigitsDataModule(augment=augment, crop_padding=1).augment is augment
    assert TinyImageNetDataModule(augment=augment).augment is augment
    with pytest.raises(ValueError, match="runs on the fast path: set fast_loader=True"):
        DigitsDataModule(augment=augment, fast_loader=False)
    with pytest.raises(TypeError, match="augment must be callable"):
        DigitsDataModule(augment=3)  # type: ignore[arg-type]


def test_an_augment_returning_something_else_is_named():
    dm = DigitsDataModule(batch_size=8, num_workers=0, augment=lambda images: images.tolist())
    with pytest.raises(TypeError, match="returned list: an augment returns an image tensor or a non-empty list"):
        _training_batch(dm)
