"""Self-supervised multi-view batches: the batched on-device ops against torchvision, multi-crop on both paths."""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image
from scipy.stats import chi2_contingency, ks_2samp
from torch import Tensor
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2 import functional as F

from lit_methods.datamodules.base import InMemoryVisionDataModule
from lit_methods.datamodules.ssl_views import (
    SSLViewAugment,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    resized_crop,
    rgb_to_grayscale,
    sample_resized_crop_boxes,
)
from lit_methods.datamodules.transforms import MultiView, build_ssl_view_transforms
from tests.helpers import cpu_trainer

RATIO = (3 / 4, 4 / 3)


def _test_images(channels: int = 3) -> Tensor:
    """Random float images in [0, 1] with the edge cases of the colour ops: a gray image, saturated black and white
    regions, pixels whose two largest channels tie."""
    images = torch.rand(12, channels, 9, 7, generator=torch.Generator().manual_seed(0))
    images[0] = 0.5
    images[1, :, :3] = 0.0
    images[2, :, :3] = 1.0
    images[3, :2] = 0.7
    return images


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize(
    "ours,reference,low,high",
    [
        (adjust_brightness, F.adjust_brightness, 0.0, 2.0),
        (adjust_contrast, F.adjust_contrast, 0.0, 2.0),
        (adjust_saturation, F.adjust_saturation, 0.0, 2.0),
        (adjust_hue, F.adjust_hue, -0.5, 0.5),
    ],
)
def test_per_sample_colour_ops_match_torchvision_per_image(ours, reference, low, high, channels):
    images = _test_images(channels)
    factors = torch.empty(len(images)).uniform_(low, high, generator=torch.Generator().manual_seed(1))
    expected = torch.stack([reference(image, float(f)) for image, f in zip(images, factors)])
    torch.testing.assert_close(ours(images.clone(), factors), expected, atol=2e-6, rtol=0)


def test_grayscale_matches_torchvision():
    images = _test_images()
    torch.testing.assert_close(rgb_to_grayscale(images), F.rgb_to_grayscale(images), atol=1e-6, rtol=0)


def test_resized_crop_matches_torchvision_on_the_same_boxes():
    images = _test_images()
    n, _, height, width = images.shape
    generator = torch.Generator().manual_seed(2)
    top, left, box_h, box_w = sample_resized_crop_boxes(n, height, width, (0.08, 1.0), RATIO, generator)
    flip = torch.arange(n) % 2 == 1
    for size in [(9, 7), (4, 3), (15, 11)]:  # same size, downscaled (antialiased), upscaled
        expected = []
        for i in range(n):
            crop = F.resized_crop(images[i], int(top[i]), int(left[i]), int(box_h[i]), int(box_w[i]), list(size))
            expected.append(F.horizontal_flip(crop) if flip[i] else crop)
        ours = resized_crop(images, top, left, box_h, box_w, size, flip)
        torch.testing.assert_close(ours, torch.stack(expected), atol=1e-5, rtol=0)
    # the box covering the whole image is the identity at the image's size and a plain resize otherwise
    whole = (torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long))
    sides = (torch.full((n,), height), torch.full((n,), width))
    assert torch.equal(resized_crop(images, *whole, *sides, (height, width)), images)
    resized = torch.nn.functional.interpolate(images, size=(5, 4), mode="bilinear", antialias=True)
    torch.testing.assert_close(resized_crop(images, *whole, *sides, (5, 4)), resized, atol=1e-6, rtol=0)


@pytest.mark.parametrize("height,width,scale", [(32, 32, (0.08, 1.0)), (12, 7, (0.5, 1.0)), (16, 16, (0.05, 0.14))])
def test_crop_boxes_follow_torchvision_random_resized_crop(height, width, scale):
    n = 3000
    generator = torch.Generator().manual_seed(3)
    top, left, box_h, box_w = sample_resized_crop_boxes(n, height, width, scale, RATIO, generator)
    assert (box_h >= 1).all() and (box_w >= 1).all() and (box_h <= height).all() and (box_w <= width).all()
    assert (top >= 0).all() and (left >= 0).all() and (top + box_h <= height).all() and (left + box_w <= width).all()
    torch.manual_seed(3)
    image = torch.zeros(1, height, width)
    reference = torch.tensor([RandomResizedCrop.get_params(image, list(scale), list(RATIO)) for _ in range(n)])
    ours = torch.stack([top, left, box_h, box_w], 1)
    # same distributions of area fraction, aspect ratio and relative position as torchvision's sampler
    for stat in (
        lambda b: b[:, 2] * b[:, 3] / (height * width),
        lambda b: b[:, 3] / b[:, 2],
        lambda b: (b[:, 0] + b[:, 2] / 2) / height,
        lambda b: (b[:, 1] + b[:, 3] / 2) / width,
    ):
        assert ks_2samp(stat(ours).numpy(), stat(reference).numpy()).pvalue > 1e-3
    # the offset of a box is uniform over its valid range: rescaled to [0, 1) it has mean 1/2
    relative_top = (top + 0.5) / (height - box_h + 1)
    assert abs(relative_top.mean().item() - 0.5) < 4 * math.sqrt(1 / 12 / n)


def test_crop_boxes_fall_back_to_torchvision_central_crop():
    # ratio (2, 3) with 90-100 % of a square image never fits: both samplers take the central 2:1 box
    generator = torch.Generator().manual_seed(4)
    top, left, box_h, box_w = sample_resized_crop_boxes(50, 8, 8, (0.9, 1.0), (2.0, 3.0), generator)
    expected = RandomResizedCrop.get_params(torch.zeros(1, 8, 8), [0.9, 1.0], [2.0, 3.0])
    assert set(zip(top.tolist(), left.tolist(), box_h.tolist(), box_w.tolist())) == {expected}


def _reference_view(image: Tensor, params: dict[str, Tensor], i: int, size: tuple[int, int]) -> Tensor:
    """One view built with torchvision's functional ops, image by image, from the drawn parameters."""
    box = [int(params[k][i]) for k in ("top", "left", "box_height", "box_width")]
    out = F.resized_crop(image, *box, list(size))
    out = F.horizontal_flip(out) if params["flip"][i] else out
    if params["jitter"][i]:
        ops = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)
        for op_index in params["order"][i].tolist():
            out = ops[op_index](out, float(params["factors"][i, op_index]))
    if params["grayscale"][i]:
        out = F.rgb_to_grayscale(out, num_output_channels=3)
    return out


def test_view_equals_torchvision_functional_ops_applied_per_image_in_the_drawn_order():
    augment = SSLViewAugment(seed=5)
    images = torch.rand(64, 3, 10, 10, generator=torch.Generator().manual_seed(5))
    for size in [(10, 10), (6, 6)]:
        params = augment.draw(len(images), 10, 10, (0.08, 1.0))
        # every op order, and samples with and without jitter/grayscale occur in the batch
        assert params["jitter"].any() and (~params["jitter"]).any() and params["grayscale"].any()
        assert len({tuple(o) for o in params["order"].tolist()}) > 10
        expected = torch.stack([_reference_view(images[i], params, i, size) for i in range(len(images))])
        torch.testing.assert_close(augment.apply(images, params, size), expected, atol=2e-5, rtol=0)


@pytest.mark.parametrize("color_jitter", [None, (0.4, 0.4, 0.2, 0.1), (0.0, 0.8, 0.3, 0.5)])
def test_parameters_follow_the_torchvision_path_settings(color_jitter):
    """With ``color_jitter`` given to both paths, the fast path's factors span the torchvision ColorJitter's ranges
    (checked to fail when ``SSLViewAugment`` ignores its ``color_jitter`` and keeps SimCLR's strengths)."""
    jitter_option = {} if color_jitter is None else {"color_jitter": color_jitter}
    crop, flip, jitter, grayscale = build_ssl_view_transforms((0.5,), (0.5,), (8, 8), **jitter_option).transforms[:4]
    augment = SSLViewAugment(seed=6, **jitter_option)
    assert augment.ratio == crop.ratio and augment.global_scale == crop.scale
    params = augment.draw(20000, 8, 8, (0.08, 1.0))
    for key, p in (("flip", flip.p), ("jitter", jitter.p), ("grayscale", grayscale.p)):
        assert abs(params[key].float().mean().item() - p) < 4 * math.sqrt(p * (1 - p) / 20000), key
    # the jitter factors are uniform over the ranges of the torchvision path's ColorJitter
    color_jitter = jitter.transforms[0]
    for column, name in enumerate(("brightness", "contrast", "saturation", "hue")):
        low, high = (0.0, 0.0) if getattr(color_jitter, name) is None else getattr(color_jitter, name)
        factors = params["factors"][:, column]
        if low == high:  # strength 0: torchvision leaves the op out, the fast path applies the identity factor
            assert torch.all(factors == (0.0 if name == "hue" else 1.0)), name
            continue
        assert low <= factors.min() < low + 1e-3 and high - 1e-3 < factors.max() <= high, name
        assert abs(factors.mean().item() - (low + high) / 2) < 4 * (high - low) / math.sqrt(12 * 20000), name
    # each of the 24 orders of the four jitter ops is equally likely
    codes = (params["order"] * torch.tensor([64, 16, 4, 1])).sum(1)
    counts = np.bincount(codes.numpy(), minlength=256)[np.unique(codes.numpy())]
    assert len(counts) == 24 and abs(counts - 20000 / 24).max() < 5 * math.sqrt(20000 / 24)


CONSTANTS = (1, 6, 18, 50, 140)
"""Pixel values of the constant test images: brightness (x 0.6 to 1.4, then uint8 rounding on the torchvision path)
(PIL rounds) keeps them in disjoint ranges, and every other op keeps a constant gray image as it is."""


def _which_constant(values: Tensor) -> Tensor:
    """Index of the constant whose range [0.6 c - 1, 1.4 c + 1] holds each value (-1: none)."""
    c = torch.tensor(CONSTANTS, dtype=torch.float32)
    inside = (values.unsqueeze(1) >= 0.6 * c - 1) & (values.unsqueeze(1) <= 1.4 * c + 1)
    assert (inside.sum(1) <= 1).all()
    return torch.where(inside.any(1), inside.float().argmax(1), -1)


class ConstantImages(InMemoryVisionDataModule):
    """Image ``i`` is gray with every pixel ``CONSTANTS[i]``, labelled ``i``; identity normalization x 255."""

    num_classes = len(CONSTANTS)
    in_channels = 3
    image_size = (8, 8)
    mean = (0.0, 0.0, 0.0)
    std = (1 / 255, 1 / 255, 1 / 255)

    def load_split(self, train: bool) -> tuple[Tensor, Tensor]:
        images = torch.tensor(CONSTANTS, dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, 8, 8).contiguous()
        return images, torch.arange(len(CONSTANTS))


class RandomImages(ConstantImages):
    def load_split(self, train: bool) -> tuple[Tensor, Tensor]:
        generator = torch.Generator().manual_seed(int(train))
        return torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8, generator=generator), torch.arange(10) % 6


class RecordViews(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[tuple[int, list[Tensor], Tensor]] = []

    def training_step(self, batch, batch_idx):
        views, labels = batch["views"], batch["targets"]
        self.seen.append((self.current_epoch, [v.clone() for v in views], labels.clone()))
        return self.weight * views[0].mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.parametrize("fast_loader", [True, False])
def test_multi_crop_batches_hold_global_then_local_views_of_the_same_images(fast_loader):
    data = ConstantImages(
        batch_size=3, num_workers=0, fast_loader=fast_loader, ssl_views=2, ssl_local_views=3, ssl_local_size=4, seed=0
    )
    model = RecordViews()
    cpu_trainer(max_epochs=2, limit_val_batches=0).fit(model, datamodule=data)
    assert len(model.seen) == 4
    for _, views, labels in model.seen:
        n = len(labels)
        assert [tuple(v.shape) for v in views] == [(n, 3, 8, 8)] * 2 + [(n, 3, 4, 4)] * 3
        for view in views:
            values = view.flatten(1)
            # every view is a constant image (crops, flips and colour ops keep a gray constant image constant) ...
            assert (values.amax(1) - values.amin(1) <= 1e-3).all()
            # ... whose value is that of the sample's own image
            assert torch.equal(_which_constant(values[:, 0]), labels)
    # the views are differently augmented: the brightness of one sample's views differs
    assert any(not torch.equal(views[0], views[1]) for _, views, _ in model.seen)


@pytest.mark.parametrize("fast_loader", [True, False])
def test_datamodule_colour_jitter_reaches_both_paths(fast_loader):
    """``ssl_color_jitter`` sets the strengths of the fast path's augment and of every torchvision view (global and
    local); checked to fail when the datamodule keeps SimCLR's default on either path."""
    data = ConstantImages(
        fast_loader=fast_loader,
        ssl_views=2,
        ssl_local_views=1,
        ssl_local_size=4,
        ssl_global_scale=(0.2, 1.0),
        ssl_color_jitter=(0.4, 0.4, 0.2, 0.1),
    )
    if fast_loader:
        assert data.augment.color_jitter == (0.4, 0.4, 0.2, 0.1) and data.augment.global_scale == (0.2, 1.0)
        return
    views = data.default_train_transforms()
    for transform in (views.transform, views.local_transform):
        color_jitter = transform.transforms[2].transforms[0]
        assert color_jitter.saturation == pytest.approx((0.8, 1.2)) and color_jitter.hue == pytest.approx((-0.1, 0.1))
        assert color_jitter.brightness == pytest.approx((0.6, 1.4))
    assert views.transform.transforms[0].scale == (0.2, 1.0)


def test_fast_views_have_the_torchvision_path_distribution():
    image = torch.randint(0, 256, (1, 3, 6, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(7))
    n = 2000
    fast = 255 * SSLViewAugment(seed=8).view(image.expand(n, -1, -1, -1) / 255.0, (6, 6), (0.08, 1))
    torch.manual_seed(8)
    transform = build_ssl_view_transforms((0.0,) * 3, (1 / 255,) * 3, (6, 6))
    pil = Image.fromarray(image[0].permute(1, 2, 0).numpy())
    reference = torch.stack([transform(pil) for _ in range(n)])
    # the same share of grayscale views (R = G = B up to uint8 rounding) ...
    gray = [
        ((v[0] - v[1]).abs().amax(dim=(-2, -1)) <= 1.0) & ((v[1] - v[2]).abs().amax(dim=(-2, -1)) <= 1.0)
        for v in (fast.transpose(0, 1), reference.transpose(0, 1))
    ]
    table = np.array([[int(g.sum()), int((~g).sum())] for g in gray])
    assert chi2_contingency(table).pvalue > 1e-3
    # ... and the same distributions of mean brightness, contrast and colour balance
    for stat in (
        lambda v: v.mean(dim=(1, 2, 3)),
        lambda v: v.std(dim=(1, 2, 3)),
        lambda v: (v[:, 0] - v[:, 2]).mean(dim=(1, 2)),
        lambda v: (v[:, 1] - v[:, 0]).mean(dim=(1, 2)),
    ):
        assert ks_2samp(stat(fast).numpy(), stat(reference).numpy()).pvalue > 1e-3


def _fit(tmp_path, max_epochs: int, ckpt_path: str | None = None) -> list[tuple[int, list[Tensor], Tensor]]:
    model = RecordViews()
    data = RandomImages(batch_size=4, ssl_views=2, ssl_local_views=2, ssl_local_size=4, seed=8)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
    trainer = cpu_trainer(
        max_epochs=max_epochs,
        limit_val_batches=0,
        deterministic=True,
        enable_checkpointing=True,
        callbacks=[checkpoint],
    )
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return model.seen


def test_fast_views_are_reproducible_and_resume_exactly(tmp_path):
    full = _fit(tmp_path / "full", max_epochs=2)
    again = _fit(tmp_path / "again", max_epochs=2)
    _fit(tmp_path / "first", max_epochs=1)
    checkpoint = next((tmp_path / "first").glob("epoch=0*.ckpt"))
    resumed = _fit(tmp_path / "resumed", max_epochs=2, ckpt_path=str(checkpoint))
    second_epoch = [step for step in full if step[0] == 1]
    assert len(second_epoch) == len(resumed) == 3
    for reference, runs in ((full, [again]), (second_epoch, [resumed])):
        for run in runs:
            for (_, views_a, labels_a), (_, views_b, labels_b) in zip(reference, run, strict=True):
                assert torch.equal(labels_a, labels_b)
                assert all(torch.equal(a, b) for a, b in zip(views_a, views_b, strict=True))
    # and the two epochs draw different views of the same images
    assert not torch.equal(full[0][1][0], second_epoch[0][1][0])


def test_bad_view_settings_are_refused():
    with pytest.raises(ValueError, match="ssl_views must be 0.*got 1"):
        ConstantImages(ssl_views=1)
    with pytest.raises(ValueError, match="ssl_local_views=2.*need ssl_views"):
        ConstantImages(ssl_local_views=2, ssl_local_size=4)
    with pytest.raises(ValueError, match="ssl_local_views=2.*local view size"):
        ConstantImages(ssl_views=2, ssl_local_views=2)
    with pytest.raises(ValueError, match="local view size \\(4\\) was given without local views"):
        ConstantImages(ssl_views=2, ssl_local_size=4)
    with pytest.raises(ValueError, match="local view size must be >= 1, got 0"):
        ConstantImages(ssl_views=2, ssl_local_views=2, ssl_local_size=0)
    with pytest.raises(ValueError, match="local views must be >= 0, got -1"):
        ConstantImages(ssl_views=2, ssl_local_views=-1)
    with pytest.raises(ValueError, match=r"ssl_global_scale must be a pair .*got \(0.5, 0.2\)"):
        ConstantImages(ssl_views=2, ssl_global_scale=(0.5, 0.2))
    with pytest.raises(ValueError, match=r"ssl_local_scale must be a pair .*got \(0.0, 0.1\)"):
        ConstantImages(ssl_views=2, ssl_local_views=1, ssl_local_size=4, ssl_local_scale=(0.0, 0.1))
    with pytest.raises(ValueError, match=r"ssl_color_jitter needs .* got \(0.4, 0.4, 1.5, 0.1\)"):
        ConstantImages(ssl_views=2, ssl_color_jitter=(0.4, 0.4, 1.5, 0.1))
    with pytest.raises(ValueError, match=r"color_jitter must be \(brightness, contrast, saturation, hue\), got \(0.4,"):
        SSLViewAugment(color_jitter=(0.4, 0.4, 0.4))
    with pytest.raises(ValueError, match=r"color_jitter needs .* got \(0.4, 0.4, 0.4, 0.6\)"):
        build_ssl_view_transforms((0.5,), (0.5,), (8, 8), color_jitter=(0.4, 0.4, 0.4, 0.6))
    with pytest.raises(ValueError, match="num_local_views=2 and local_transform=None"):
        MultiView(lambda x: x, 2, None, 2)
    with pytest.raises(ValueError, match="1- or 3-channel images, got 2 channels"):
        SSLViewAugment()(torch.zeros(2, 2, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="takes uint8 images, got torch.float32"):
        SSLViewAugment()(torch.zeros(2, 3, 4, 4))
