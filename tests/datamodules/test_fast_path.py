"""The fast in-memory path: sampler semantics, equivalence with the torchvision path, on-device augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import chi2_contingency

from lit_methods.datamodules.fast import BatchAugment, InMemoryBatchLoader, ShardedEpochSampler, cutout, random_crop
from lit_methods.datamodules.normalization import Normalize
from lit_methods.datamodules.transforms import build_train_transforms

SIZE, PAD = 6, 2


def _coded_image() -> torch.Tensor:
    """A 1-channel SIZE x SIZE uint8 image whose pixel (r, c) holds 1 + r * SIZE + c (0 is left for padding)."""
    return (1 + torch.arange(SIZE * SIZE, dtype=torch.uint8)).view(1, 1, SIZE, SIZE)


def _candidates() -> dict[tuple[int, int, bool], torch.Tensor]:
    """Every crop offset and flip of the coded image, as produced by the reference ops."""
    image = _coded_image()
    out = {}
    for dy in range(2 * PAD + 1):
        for dx in range(2 * PAD + 1):
            padded = torch.nn.functional.pad(image, (PAD,) * 4)[..., dy : dy + SIZE, dx : dx + SIZE]
            out[(dy, dx, False)] = padded[0, 0]
            out[(dy, dx, True)] = padded[0, 0].flip(-1)
    return out


def _classify(images: torch.Tensor, candidates: dict) -> list[int]:
    keys = list(candidates)
    stack = torch.stack([candidates[k] for k in keys]).to(images.dtype)
    matches = (images.view(len(images), 1, SIZE, SIZE) == stack.unsqueeze(0)).flatten(2).all(-1)
    assert (matches.sum(1) == 1).all(), "an augmented image matched no crop/flip of the original"
    return matches.float().argmax(1).tolist()


def test_crop_and_flip_distribution_matches_torchvision():
    candidates = _candidates()
    n = 6000
    augment = BatchAugment(crop_padding=PAD, seed=0)
    fast = augment(_coded_image().expand(n, 1, SIZE, SIZE).contiguous())
    assert fast.dtype == torch.uint8  # pixels: normalization is a separate step
    torch.manual_seed(0)
    transform = build_train_transforms((0.0,), (1 / 255,), (SIZE, SIZE), crop_padding=PAD)
    pil = Image.fromarray(_coded_image()[0, 0].numpy())
    reference = torch.stack([transform(pil) for _ in range(n)]).round().to(torch.uint8)
    fast_counts = np.bincount(_classify(fast, candidates), minlength=len(candidates))
    ref_counts = np.bincount(_classify(reference, candidates), minlength=len(candidates))
    # every one of the (2p+1)^2 offsets x 2 flips occurs, and both paths draw them with the same frequencies
    assert (fast_counts > 0).all() and (ref_counts > 0).all()
    assert chi2_contingency(np.stack([fast_counts, ref_counts])).pvalue > 1e-3
    # and the frequencies are uniform
    expected = n / len(candidates)
    assert abs(fast_counts - expected).max() < 5 * np.sqrt(expected)


def _cutout_boxes(images: torch.Tensor) -> list[tuple[int, int, int, int]]:
    boxes = []
    for image in images:
        rows = torch.nonzero((image[0] == 0).any(1)).flatten()
        cols = torch.nonzero((image[0] == 0).any(0)).flatten()
        boxes.append((int(rows.min()), int(rows.max()), int(cols.min()), int(cols.max())))
    return boxes


def test_cutout_distribution_matches_torchvision():
    n, size = 4000, 3
    ones = torch.full((n, 1, SIZE, SIZE), 255, dtype=torch.uint8)
    augment = BatchAugment(crop_padding=0, horizontal_flip=False, cutout_size=size, cutout_fill=(0.0,), seed=1)
    fast = _cutout_boxes(augment(ones))
    torch.manual_seed(1)
    transform = build_train_transforms((0.0,), (1.0,), (SIZE, SIZE), 0, False, cutout_size=size)
    pil = Image.fromarray(np.full((SIZE, SIZE), 255, dtype=np.uint8))
    reference = _cutout_boxes(torch.stack([transform(pil) for _ in range(n)]))
    keys = sorted(set(fast) | set(reference))
    table = np.array([[fast.count(k) for k in keys], [reference.count(k) for k in keys]])
    # 36 centres, clipped at the border: boxes touching the border are merged categories with larger mass
    assert len(keys) == SIZE * SIZE
    assert chi2_contingency(table).pvalue > 1e-3


def test_cutout_square_is_clipped_and_centred():
    image = torch.ones(2, 1, 8, 8)
    out = cutout(image, torch.tensor([0, 5]), torch.tensor([7, 3]), 4)
    expected0 = torch.ones(8, 8)
    expected0[0:2, 5:8] = 0
    expected1 = torch.ones(8, 8)
    expected1[3:7, 1:5] = 0
    assert torch.equal(out[0, 0], expected0) and torch.equal(out[1, 0], expected1)


def test_random_crop_matches_padding_and_slicing():
    images = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    dy, dx = torch.tensor([0, 8, 3, 4, 1]), torch.tensor([8, 0, 5, 4, 2])
    out = random_crop(images, dy, dx, 4)
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    for i in range(5):
        assert torch.equal(out[i], padded[i, :, dy[i] : dy[i] + 8, dx[i] : dx[i] + 8])


def test_cutout_fills_with_the_mean_pixel_which_normalizes_to_exactly_zero():
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    images = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    augment = BatchAugment(crop_padding=0, horizontal_flip=False, cutout_size=3, cutout_fill=mean, seed=2)
    pixels = augment(images)
    assert pixels.dtype == torch.float32 and 0 <= pixels.min() and pixels.max() <= 1
    cut = pixels != images.float() / 255
    assert cut.any() and torch.equal(cut, cut[:, :1].expand_as(cut))  # the square covers every channel
    normalized = Normalize(mean, std)(pixels)
    assert (normalized[cut] == 0).all()  # as the paper's Cutout of the normalized image
    torch.testing.assert_close(normalized[~cut], Normalize(mean, std)(images)[~cut])


def test_normalize_of_uint8_matches_torchvision_normalize():
    images = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8)
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    out = Normalize(mean, std)(images)
    expected = (images.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(out, expected)


def test_augmentation_is_seeded():
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    a = BatchAugment(cutout_size=2, cutout_fill=(0.5,) * 3, seed=3)
    b = BatchAugment(cutout_size=2, cutout_fill=(0.5,) * 3, seed=3)
    c = BatchAugment(cutout_size=2, cutout_fill=(0.5,) * 3, seed=4)
    first = a(images)
    assert torch.equal(first, b(images))
    assert not torch.equal(first, c(images))
    assert not torch.equal(first, a(images))  # the generator advances


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(crop_padding=-1), "got -1"),
        (dict(cutout_size=-2), "got -2"),
        (dict(cutout_size=2), "cutout_size=2 needs cutout_fill"),
        (dict(cutout_size=2, cutout_fill=(128.0,)), r"\(128.0,\)"),
    ],
)
def test_batch_augment_rejects_bad_arguments(bad, match):
    with pytest.raises(ValueError, match=match):
        BatchAugment(**bad)


def test_sampler_epochs_are_seeded_permutations():
    sampler = ShardedEpochSampler(10, 4, shuffle=True, seed=5)
    epoch0 = torch.cat(list(sampler))
    assert sorted(epoch0.tolist()) == list(range(10)) and [len(b) for b in sampler] == [4, 4, 2]
    assert torch.equal(epoch0, torch.cat(list(sampler)))
    sampler.set_epoch(1)
    assert not torch.equal(epoch0, torch.cat(list(sampler)))
    sampler.set_epoch(0)
    assert torch.equal(epoch0, torch.cat(list(sampler)))


@pytest.mark.parametrize("num_samples,world_size", [(10, 2), (11, 2), (11, 3)])
def test_sampler_shards_are_disjoint_and_equal_sized_for_training(num_samples, world_size):
    shards = [
        torch.cat(list(ShardedEpochSampler(num_samples, 3, shuffle=True, seed=0, rank=r, world_size=world_size)))
        for r in range(world_size)
    ]
    seen = torch.cat(shards)
    assert len(set(seen.tolist())) == len(seen) == num_samples - num_samples % world_size
    assert len({len(s) for s in shards}) == 1


def test_sampler_eval_shards_cover_every_sample_once():
    shards = [list(ShardedEpochSampler(11, 2, shuffle=False, rank=r, world_size=3)) for r in range(3)]
    seen = torch.cat([torch.cat(s) for s in shards])
    assert sorted(seen.tolist()) == list(range(11))


def test_sampler_drop_last_and_len():
    sampler = ShardedEpochSampler(10, 4, shuffle=True, drop_last=True)
    assert len(sampler) == 2 and [len(b) for b in sampler] == [4, 4]
    assert len(ShardedEpochSampler(10, 4, shuffle=True)) == 3


@pytest.mark.parametrize(
    "kwargs,match",
    [(dict(num_samples=0), "num_samples"), (dict(batch_size=0), "batch_size"), (dict(rank=2), "rank 2")],
)
def test_sampler_rejects_bad_arguments(kwargs, match):
    args = dict(num_samples=8, batch_size=2, shuffle=True) | kwargs
    with pytest.raises(ValueError, match=match):
        ShardedEpochSampler(**args)


def test_loader_gathers_the_sampled_rows():
    images = torch.arange(10).view(10, 1, 1, 1).to(torch.uint8)
    labels = torch.arange(10) * 2
    loader = InMemoryBatchLoader(images, labels, ShardedEpochSampler(10, 3, shuffle=True, seed=1))
    batches = list(loader)
    assert len(loader) == len(batches) == 4
    for batch in batches:
        x, y = batch["inputs"], batch["targets"]
        assert x.dtype == torch.uint8 and torch.equal(x.flatten().long() * 2, y)


def test_loader_gathers_named_extras_and_refuses_unknown_names():
    images = torch.arange(10).view(10, 1, 1, 1).to(torch.uint8)
    sampler = ShardedEpochSampler(10, 4, shuffle=True, seed=2)
    loader = InMemoryBatchLoader(images, torch.arange(10), sampler, extras={"subgroup": -torch.arange(10)})
    for batch in loader:
        assert set(batch) == {"inputs", "targets", "subgroup"}
        assert torch.equal(batch["subgroup"], -batch["inputs"].flatten().long())
    with pytest.raises(ValueError, match=r"unknown extra batch fields \['group'\]"):
        InMemoryBatchLoader(images, torch.arange(10), sampler, extras={"group": images})
