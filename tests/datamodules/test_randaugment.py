"""RandAugment as a datamodule option: torchvision's op with the paper's 0-10 magnitude scale."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from lit_methods.datamodules import CIFAR10DataModule
from lit_methods.datamodules.transforms import PaperScaleRandAugment, randaugment

# the paper's maxima (Cubuk et al. 2020; AutoAugment's scale): M / 10 of each
PAPER_MAXIMA = {"Rotate": 30.0, "ShearX": 0.3, "ShearY": 0.3, "Brightness": 0.9, "Contrast": 0.9, "Sharpness": 0.9}


def _record_ops(transform: v2.RandAugment, monkeypatch) -> list[tuple[str, float]]:
    """Record (op name, signed magnitude) of every op torchvision applies."""
    calls: list[tuple[str, float]] = []
    original = transform._apply_image_or_video_transform

    def recording(image, transform_id, magnitude, **kwargs):
        calls.append((transform_id, magnitude))
        return original(image, transform_id, magnitude, **kwargs)

    monkeypatch.setattr(transform, "_apply_image_or_video_transform", recording)
    return calls


def _digit_images(n: int = 100) -> list[Image.Image]:
    from sklearn.datasets import load_digits

    digits = load_digits().images[:n] * (255 / 16)
    return [Image.fromarray(d.astype(np.uint8)).resize((32, 32)).convert("RGB") for d in digits]


@pytest.mark.parametrize("num_ops,magnitude", [(1, 5), (3, 9), (2, 0)])
def test_each_image_gets_n_ops_of_the_paper_magnitude(num_ops, magnitude, monkeypatch):
    dm = CIFAR10DataModule(fast_loader=False, randaugment_num_ops=num_ops, randaugment_magnitude=magnitude)
    (transform,) = [t for t in dm.default_train_transforms().transforms if isinstance(t, v2.RandAugment)]
    calls = _record_ops(transform, monkeypatch)
    torch.manual_seed(0)
    images = _digit_images(60)
    for image in images:
        transform(image)
    assert len(calls) == num_ops * len(images)
    seen = set()
    for name, value in calls:
        if name in PAPER_MAXIMA:
            assert abs(value) == pytest.approx(PAPER_MAXIMA[name] * magnitude / 10), name
            seen.add(name)
    assert seen, "no magnitude-dependent op was drawn"


def test_pipeline_order_is_crop_flip_randaugment_then_normalize():
    dm = CIFAR10DataModule(fast_loader=False, randaugment_num_ops=2, randaugment_magnitude=5, cutout_size=16)
    kinds = [type(t).__name__ for t in dm.default_train_transforms().transforms]
    assert kinds == [
        "RandomCrop", "RandomHorizontalFlip", "PaperScaleRandAugment", "ToImage", "ToDtype", "Normalize", "Cutout"
    ]
    assert not any(isinstance(t, v2.RandAugment) for t in dm.default_val_transforms().transforms)


def _mean_change(num_ops: int, magnitude: int, images: list[Image.Image]) -> float:
    torch.manual_seed(0)
    transform = randaugment(num_ops, magnitude)
    return float(np.mean([np.abs(np.asarray(transform(i), dtype=float) - np.asarray(i, dtype=float)).mean() for i in images]))


def test_distortion_grows_with_magnitude_and_with_the_number_of_ops():
    images = _digit_images(100)
    assert _mean_change(0, 9, images) == 0.0
    by_magnitude = [_mean_change(2, m, images) for m in (0, 3, 6, 9)]
    by_ops = [_mean_change(n, 9, images) for n in (1, 2, 3)]
    assert by_magnitude == sorted(by_magnitude) and by_magnitude[0] < by_magnitude[-1]
    assert by_ops == sorted(by_ops) and by_ops[0] < by_ops[-1]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(randaugment_num_ops=2), "randaugment_num_ops=2.*fast_loader=False"),
        (dict(fast_loader=False, randaugment_num_ops=1, randaugment_magnitude=-1), r"magnitude must be >= 0.*got -1"),
        (dict(fast_loader=False, randaugment_num_ops=-1), "num_ops.*-1"),
    ],
)
def test_bad_randaugment_settings_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CIFAR10DataModule(**kwargs)


def test_magnitudes_up_to_10_are_torchvisions_11_bin_table():
    """For M <= 10 the paper-scale table is torchvision's own ``RandAugment`` table with 11 bins, op by op."""
    ours = PaperScaleRandAugment(num_ops=2, magnitude=10)
    reference = v2.RandAugment(num_ops=2, magnitude=10, num_magnitude_bins=11)
    assert ours._AUGMENTATION_SPACE.keys() == reference._AUGMENTATION_SPACE.keys()
    for name, (magnitudes, signed) in reference._AUGMENTATION_SPACE.items():
        expected, got = magnitudes(11, 32, 24), ours._AUGMENTATION_SPACE[name][0](11, 32, 24)
        assert ours._AUGMENTATION_SPACE[name][1] == signed, name
        if expected is None:
            assert got is None, name
        else:
            assert got.dtype == expected.dtype, name
            torch.testing.assert_close(got, expected, atol=1e-6, rtol=0, msg=name)


def test_magnitude_14_applies_1_4_times_the_magnitude_10_rotation(monkeypatch):
    """CIFAR-100's (N, M) = (2, 14): every rotation drawn at M = 14 is 42 degrees, 1.4 x the 30 degrees of M = 10
    (fails with torchvision's RandAugment, which indexes past its 11 bins or, with 15 bins, rescales M = 14 to the
    30-degree maximum). Enhancement ops stop at magnitude 1 (a negative factor is undefined)."""
    images = _digit_images(40)
    rotations = {}
    for magnitude in (10, 14):
        transform = randaugment(2, magnitude)
        calls = _record_ops(transform, monkeypatch)
        torch.manual_seed(0)
        for image in images:
            transform(image)
        rotations[magnitude] = [abs(value) for name, value in calls if name == "Rotate"]
        monkeypatch.undo()
    assert rotations[10] and rotations[14]
    assert rotations[10] == pytest.approx([30.0] * len(rotations[10]))
    assert rotations[14] == pytest.approx([42.0] * len(rotations[14]))
    table = PaperScaleRandAugment(num_ops=2, magnitude=14)._AUGMENTATION_SPACE
    assert table["ShearX"][0](15, 32, 32)[14].item() == pytest.approx(1.4 * 0.3)
    assert table["Brightness"][0](15, 32, 32)[14].item() == 1.0
    assert table["Posterize"][0](15, 32, 32)[14].item() == 2 and table["Solarize"][0](15, 32, 32)[14].item() == 0.0


def test_negative_randaugment_values_are_refused_naming_them():
    with pytest.raises(ValueError, match="magnitude must be >= 0.*got -3"):
        randaugment(2, -3)
    with pytest.raises(ValueError, match="num_ops must be >= 0, got -2"):
        randaugment(-2, 5)
