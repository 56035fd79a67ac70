"""CIFAR-10/100(-LT) datamodules on small files written in the real on-disk format (no download)."""

from __future__ import annotations

import inspect
import math
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.datasets import CIFAR10, CIFAR100

import lit_methods.datamodules.cifar as cifar_module
from lit_methods.datamodules.base import InMemoryVisionDataModule
from lit_methods.datamodules.normalization import Normalize
from lit_methods.datamodules.cifar import (
    CIFAR10DataModule,
    CIFAR10LTDataModule,
    CIFAR100DataModule,
    CIFAR100LTDataModule,
    read_cifar_batch,
)
from tests.datamodules.real_formats import CIFARArrays, write_cifar10, write_cifar100, write_cifar_pickle

N_PER_BATCH = 20
N_TEST = 30


@pytest.fixture
def cifar10(tmp_path: Path) -> tuple[Path, CIFARArrays]:
    return tmp_path, write_cifar10(tmp_path, n_train_per_batch=N_PER_BATCH, n_test=N_TEST, seed=1)


def normalized(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """The reference normalization, ``(x / 255 - mean) / std`` per channel, in float64."""
    x = images.numpy().astype(np.float64) / 255.0
    return (x - np.array(mean).reshape(1, -1, 1, 1)) / np.array(std).reshape(1, -1, 1, 1)


def image_keys(images: torch.Tensor) -> list[bytes]:
    return [image.numpy().tobytes() for image in images]


# -- reading ------------------------------------------------------------------------------------------------------
def test_cifar10_reads_both_splits_pixel_exact(cifar10: tuple[Path, CIFARArrays]) -> None:
    root, written = cifar10
    dm = CIFAR10DataModule(data_dir=root)
    dm.setup()
    assert dm.train_images is not None and dm.train_labels is not None
    assert dm.train_images.dtype == torch.uint8 and dm.train_images.shape == (5 * N_PER_BATCH, 3, 32, 32)
    assert dm.train_labels.dtype == torch.int64
    np.testing.assert_array_equal(dm.train_images.numpy(), written.train_images)
    np.testing.assert_array_equal(dm.train_labels.numpy(), written.train_labels)
    assert dm.test_images is not None and dm.test_labels is not None
    np.testing.assert_array_equal(dm.test_images.numpy(), written.test_images)
    np.testing.assert_array_equal(dm.test_labels.numpy(), written.test_labels)


def test_cifar10_train_split_is_data_batch_1_to_5_in_order(cifar10: tuple[Path, CIFARArrays]) -> None:
    root, _ = cifar10
    images, labels = CIFAR10DataModule(data_dir=root).load_split(train=True)
    for b in range(5):
        with (root / "cifar-10-batches-py" / f"data_batch_{b + 1}").open("rb") as f:
            entry = pickle.load(f, encoding="bytes")
        part = slice(b * N_PER_BATCH, (b + 1) * N_PER_BATCH)
        assert labels[part].tolist() == entry[b"labels"]
        np.testing.assert_array_equal(images[part].reshape(N_PER_BATCH, -1).numpy(), entry[b"data"])


def test_channel_planes_and_row_major_layout(tmp_path: Path) -> None:
    """Decode a hand-built row: R, G, B planes one after the other, pixel (y, x) at ``y * 32 + x`` in its plane."""
    rows = np.zeros((2, 3072), dtype=np.uint8)
    y, x = 1, 2
    rows[0, 0 * 1024 + y * 32 + x] = 10
    rows[0, 1 * 1024 + y * 32 + x] = 20
    rows[0, 2 * 1024 + y * 32 + x] = 30
    rows[1] = np.repeat([200, 100, 50], 1024)
    path = write_cifar_pickle(tmp_path / "batch", {b"data": rows, b"labels": [3, 7]})
    images, labels = read_cifar_batch(path, b"labels")
    assert images.shape == (2, 3, 32, 32) and images.dtype == np.uint8
    assert images[0, :, y, x].tolist() == [10, 20, 30]
    assert images[0, :, x, y].tolist() == [0, 0, 0]  # rows and columns not swapped
    assert int(images[0].sum()) == 60
    assert [int(images[1, c].min()) for c in range(3)] == [200, 100, 50]
    assert [int(images[1, c].max()) for c in range(3)] == [200, 100, 50]
    assert labels.dtype == np.int64 and labels.tolist() == [3, 7]


def test_meta_files_are_optional(tmp_path: Path) -> None:
    written10 = write_cifar10(tmp_path, n_train_per_batch=2, n_test=3, write_meta=False)
    written100 = write_cifar100(tmp_path, n_train=4, n_test=3, write_meta=False)
    assert not (tmp_path / "cifar-10-batches-py" / "batches.meta").exists()
    assert not (tmp_path / "cifar-100-python" / "meta").exists()
    images, _ = CIFAR10DataModule(data_dir=tmp_path).load_split(train=False)
    np.testing.assert_array_equal(images.numpy(), written10.test_images)
    images, _ = CIFAR100DataModule(data_dir=tmp_path).load_split(train=True)
    np.testing.assert_array_equal(images.numpy(), written100.train_images)


@pytest.mark.parametrize("label_type", ["fine", "coarse"])
def test_cifar100_fine_and_coarse_labels(tmp_path: Path, label_type: str) -> None:
    written = write_cifar100(tmp_path, n_train=200, n_test=100, seed=3)
    dm = CIFAR100DataModule(data_dir=tmp_path, label_type=label_type)  # type: ignore[arg-type]
    assert dm.num_classes == (100 if label_type == "fine" else 20)
    assert CIFAR100DataModule.num_classes == 100  # the instance attribute does not leak into the class
    dm.setup()
    assert dm.train_images is not None and dm.test_images is not None
    np.testing.assert_array_equal(dm.train_images.numpy(), written.train_images)
    np.testing.assert_array_equal(dm.test_images.numpy(), written.test_images)
    expected_train = written.train_fine if label_type == "fine" else written.train_coarse
    expected_test = written.test_fine if label_type == "fine" else written.test_coarse
    np.testing.assert_array_equal(dm.train_labels.numpy(), expected_train)
    np.testing.assert_array_equal(dm.test_labels.numpy(), expected_test)
    if label_type == "coarse":
        assert set(dm.train_labels.tolist()) == set(range(20))


def test_cifar_class_attributes() -> None:
    assert (CIFAR10DataModule.num_classes, CIFAR10DataModule.in_channels) == (10, 3)
    assert CIFAR10DataModule.image_size == CIFAR100DataModule.image_size == (32, 32)
    assert CIFAR10DataModule.mean == (0.4914, 0.4822, 0.4465)
    assert CIFAR10DataModule.std == (0.2470, 0.2435, 0.2616)
    assert CIFAR100DataModule.mean == (0.5071, 0.4865, 0.4409)
    assert CIFAR100DataModule.std == (0.2673, 0.2564, 0.2762)
    names = {cls.name for cls in (CIFAR10DataModule, CIFAR100DataModule, CIFAR10LTDataModule, CIFAR100LTDataModule)}
    assert len(names) == 4 and "" not in names
    assert CIFAR10LTDataModule().imbalance_factor == CIFAR100LTDataModule().imbalance_factor == 100.0
    assert CIFAR10DataModule().imbalance_factor == CIFAR100DataModule().imbalance_factor == 1.0
    assert CIFAR100LTDataModule(label_type="coarse").num_classes == 20


# -- long-tailed and per-class subsets ---------------------------------------------------------------------------
def test_cifar10_lt_keeps_the_first_images_of_each_class_with_exponential_counts(tmp_path: Path) -> None:
    written = write_cifar10(tmp_path, n_train_per_batch=200, n_test=10, seed=4)  # 100 images per class
    dm = CIFAR10LTDataModule(data_dir=tmp_path)
    dm.setup("fit")
    assert dm.train_labels is not None and dm.train_images is not None
    expected = [math.floor(100 * 100 ** (-i / 9)) for i in range(10)]
    assert expected == [100, 59, 35, 21, 12, 7, 4, 2, 1, 1]
    assert torch.bincount(dm.train_labels, minlength=10).tolist() == expected
    # LDAM keeps the first images of each class in file order, and the split keeps the file order.
    keep = np.sort(np.concatenate([np.flatnonzero(written.train_labels == c)[:n] for c, n in enumerate(expected)]))
    np.testing.assert_array_equal(dm.train_images.numpy(), written.train_images[keep])
    np.testing.assert_array_equal(dm.train_labels.numpy(), written.train_labels[keep])
    # The test split stays balanced.
    assert dm.test_labels is not None and len(dm.test_labels) == 10


def test_cifar100_lt_counts(tmp_path: Path) -> None:
    write_cifar100(tmp_path, n_train=1000, n_test=10, seed=5)  # 10 images per fine class
    dm = CIFAR100LTDataModule(data_dir=tmp_path, imbalance_factor=10.0)
    dm.setup("fit")
    assert dm.train_labels is not None
    expected = [math.floor(10 * 10 ** (-i / 99)) for i in range(100)]
    assert expected[0] == 10 and expected[-1] == 1
    assert torch.bincount(dm.train_labels, minlength=100).tolist() == expected


def test_lt_rejects_an_empty_tail_class(cifar10: tuple[Path, CIFARArrays]) -> None:
    root, _ = cifar10  # 10 images per class: 10 * 100 ** (-1) < 1
    with pytest.raises(ValueError, match="empty"):
        CIFAR10LTDataModule(data_dir=root).setup("fit")


def test_samples_per_class_subset_is_exact_and_seeded(cifar10: tuple[Path, CIFARArrays]) -> None:
    root, written = cifar10

    def subset(seed: int) -> tuple[list[bytes], torch.Tensor]:
        dm = CIFAR10DataModule(data_dir=root, samples_per_class=3, seed=seed)
        dm.setup("fit")
        assert dm.train_images is not None and dm.train_labels is not None
        return image_keys(dm.train_images), dm.train_labels

    keys, labels = subset(0)
    assert torch.bincount(labels, minlength=10).tolist() == [3] * 10
    # Every kept image is a written training image with its own label.
    label_of = dict(zip(image_keys(torch.from_numpy(written.train_images)), written.train_labels.tolist()))
    assert [label_of[k] for k in keys] == labels.tolist()
    assert subset(0)[0] == keys
    assert subset(1)[0] != keys


# -- validation split and loaders --------------------------------------------------------------------------------
@pytest.mark.parametrize(("val_split", "val_size"), [(17, 17), (0.2, 20)])
def test_val_split_sizes_disjoint_and_seeded(
    cifar10: tuple[Path, CIFARArrays], val_split: int | float, val_size: int
) -> None:
    root, written = cifar10

    def split(seed: int) -> tuple[list[bytes], list[bytes]]:
        dm = CIFAR10DataModule(data_dir=root, val_split=val_split, seed=seed)
        dm.setup("fit")
        assert dm.train_images is not None and dm.val_images is not None
        return image_keys(dm.train_images), image_keys(dm.val_images)

    train, val = split(0)
    assert (len(train), len(val)) == (5 * N_PER_BATCH - val_size, val_size)
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(image_keys(torch.from_numpy(written.train_images)))
    assert split(0) == (train, val)
    assert split(1)[1] != val


def test_fast_loaders_yield_uint8_and_val_is_normalized_only(cifar10: tuple[Path, CIFARArrays]) -> None:
    root, _ = cifar10
    dm = CIFAR10DataModule(data_dir=root, val_split=10, batch_size=8, eval_batch_size=4)
    dm.setup("fit")
    assert dm.val_images is not None
    train_loader = dm.train_dataloader()
    assert len(train_loader) == math.ceil(90 / 8)
    batch = next(iter(train_loader))
    images, labels = batch["inputs"], batch["targets"]
    assert set(batch) == {"inputs", "targets"}
    assert images.dtype == torch.uint8 and images.shape == (8, 3, 32, 32) and labels.dtype == torch.int64

    val_batches = list(dm.val_dataloader())
    assert [len(b["inputs"]) for b in val_batches] == [4, 4, 2]
    images, labels = val_batches[0]["inputs"], val_batches[0]["targets"]
    assert images.dtype == torch.uint8
    torch.testing.assert_close(images, dm.val_images[:4])  # evaluation is not shuffled
    out = dm.on_after_batch_transfer(val_batches[0], 0)  # no trainer: normalize only
    assert out["inputs"].dtype == torch.float32 and out["inputs"].shape == (4, 3, 32, 32)
    assert out["targets"] is labels
    out = out["inputs"]
    np.testing.assert_allclose(out.numpy(), normalized(images, dm.mean, dm.std), rtol=0, atol=1e-5)


def test_fast_path_training_batches_are_augmented(cifar10: tuple[Path, CIFARArrays]) -> None:
    """With a training trainer attached, batches are randomly cropped with zero padding and normalized."""
    root, _ = cifar10

    class FakeTrainer:
        training = True
        current_epoch = 0
        global_rank = 0
        world_size = 1

    dm = CIFAR10DataModule(data_dir=root, batch_size=32, crop_padding=4)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    images, labels = batch["inputs"], batch["targets"]
    dm.trainer = FakeTrainer()  # type: ignore[assignment]
    out = dm.on_after_batch_transfer(batch, 0)["inputs"]
    assert out.dtype == torch.float32 and out.shape == images.shape
    assert not torch.allclose(out, torch.from_numpy(normalized(images, dm.mean, dm.std)).float())
    # On all-white images, the crop's zero padding is the only source of black, with CIFAR-10's statistics.
    white = torch.full((32, 3, 32, 32), 255, dtype=torch.uint8)
    out = dm.on_after_batch_transfer({"inputs": white, "targets": labels}, 0)["inputs"]
    levels = sorted((value - m) / s for m, s in zip(dm.mean, dm.std) for value in (0.0, 1.0))
    torch.testing.assert_close(out.unique(), torch.tensor(levels), rtol=0, atol=1e-5)


def test_torchvision_path_val_is_deterministic_and_normalized(cifar10: tuple[Path, CIFARArrays]) -> None:
    root, _ = cifar10
    dm = CIFAR10DataModule(data_dir=root, val_split=6, batch_size=5, fast_loader=False, num_workers=0)
    dm.setup("fit")
    assert dm.val_images is not None
    first = torch.cat([batch["inputs"] for batch in dm.val_dataloader()])
    second = torch.cat([batch["inputs"] for batch in dm.val_dataloader()])
    assert first.dtype == torch.float32 and first.shape == (6, 3, 32, 32)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    np.testing.assert_allclose(first.numpy(), normalized(dm.val_images, dm.mean, dm.std), rtol=0, atol=1e-5)
    batch = next(iter(dm.train_dataloader()))
    images, labels = batch["inputs"], batch["targets"]
    assert images.dtype == torch.float32 and images.shape == (5, 3, 32, 32) and labels.dtype == torch.int64


@pytest.mark.parametrize("fast_loader", [True, False])
def test_normalize_false_yields_pixels_in_the_unit_range(cifar10: tuple[Path, CIFARArrays], fast_loader: bool) -> None:
    """normalize=False: the same batches as the default, before the normalization step ([0, 1] float32 pixels);
    Cutout fills with the mean pixel in both spaces (0 once normalized)."""
    root, _ = cifar10

    class FakeTrainer:
        training = True
        current_epoch = 0
        global_rank = 0
        world_size = 1

    kwargs = dict(data_dir=root, val_split=6, batch_size=6, fast_loader=fast_loader, num_workers=0)
    pixels_dm = CIFAR10DataModule(normalize=False, **kwargs)
    normalized_dm = CIFAR10DataModule(**kwargs)
    assert (pixels_dm.inputs_normalized, normalized_dm.inputs_normalized) == (False, True)
    for dm in (pixels_dm, normalized_dm):
        dm.setup("fit")
    pixels = pixels_dm.on_after_batch_transfer(next(iter(pixels_dm.val_dataloader())), 0)["inputs"]
    assert pixels.dtype == torch.float32
    torch.testing.assert_close(pixels, pixels_dm.val_images.float() / 255, rtol=0, atol=1e-6)
    expected = normalized_dm.on_after_batch_transfer(next(iter(normalized_dm.val_dataloader())), 0)["inputs"]
    torch.testing.assert_close(Normalize(pixels_dm.mean, pixels_dm.std)(pixels), expected, rtol=0, atol=1e-5)

    cutout_kwargs = kwargs | dict(crop_padding=0, horizontal_flip=False, cutout_size=8, seed=3)
    mean = torch.tensor(pixels_dm.mean).view(1, 3, 1, 1)
    for normalize in (False, True):
        dm = CIFAR10DataModule(normalize=normalize, **cutout_kwargs)
        dm.setup("fit")
        dm.trainer = FakeTrainer()  # type: ignore[assignment]
        torch.manual_seed(0)  # the torchvision path's Cutout draws from the global generator
        batch = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
        fill = torch.zeros(1, 3, 1, 1) if normalize else mean
        assert (batch["inputs"] == fill).all(dim=1).sum() >= 6 * 16  # every image has a square of at least 4 x 4


# -- bad input ----------------------------------------------------------------------------------------------------
def test_missing_cifar10_names_the_path_and_how_to_get_it(tmp_path: Path) -> None:
    expected = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    with pytest.raises(FileNotFoundError, match=re.escape(str(expected))) as info:
        CIFAR10DataModule(data_dir=tmp_path).setup("fit")
    assert "download=True" in str(info.value) and "cifar-10-batches-py/" in str(info.value)


def test_missing_cifar100_test_split_names_the_path(tmp_path: Path) -> None:
    write_cifar100(tmp_path, n_train=10, n_test=10)
    (tmp_path / "cifar-100-python" / "test").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "cifar-100-python" / "test"))) as info:
        CIFAR100DataModule(data_dir=tmp_path).setup("test")
    assert "download=True" in str(info.value)


def test_truncated_batch_is_reported_by_name(cifar10: tuple[Path, CIFARArrays]) -> None:
    root, _ = cifar10
    path = root / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(RuntimeError, match="data_batch_3"):
        CIFAR10DataModule(data_dir=root).setup("fit")


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not a pickle at all",
        pickle.dumps({b"labels": [1, 2]}, protocol=2),  # no data
        pickle.dumps({b"data": np.zeros((3, 3072), np.uint8), b"labels": [1, 2]}, protocol=2),  # 3 rows, 2 labels
        pickle.dumps({b"data": np.zeros((2, 1000), np.uint8), b"labels": [1, 2]}, protocol=2),  # wrong row size
        pickle.dumps({b"data": np.zeros((2, 3072), np.int64), b"labels": [1, 2]}, protocol=2),  # wrong dtype
        pickle.dumps([1, 2, 3], protocol=2),
    ],
)
def test_corrupted_batches_raise_runtime_error_with_the_file_name(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "test_batch"
    path.write_bytes(content)
    with pytest.raises(RuntimeError, match=re.escape(str(path))):
        read_cifar_batch(path, b"labels")


def test_labels_out_of_range_are_reported(tmp_path: Path) -> None:
    write_cifar10(tmp_path, n_train_per_batch=2, n_test=2)
    write_cifar_pickle(
        tmp_path / "cifar-10-batches-py" / "test_batch",
        {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]},
    )
    with pytest.raises(RuntimeError, match=r"test_batch.*\[0, 10\)"):
        CIFAR10DataModule(data_dir=tmp_path).setup("test")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"val_split": -1}, "-1"),
        ({"val_split": 1.5}, "1.5"),
        ({"imbalance_factor": 0.5}, "0.5"),
        ({"imbalance_factor": float("nan")}, "nan"),
        ({"samples_per_class": 0}, "samples_per_class.*0"),
        ({"batch_size": 0}, "batch_size.*0"),
    ],
)
@pytest.mark.parametrize("cls", [CIFAR10DataModule, CIFAR100DataModule])
def test_invalid_arguments_are_rejected_at_construction(
    cls: type[InMemoryVisionDataModule], kwargs: dict, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)


def test_invalid_label_type_is_rejected() -> None:
    with pytest.raises(ValueError, match="'medium'"):
        CIFAR100DataModule(label_type="medium")  # type: ignore[arg-type]


# -- download (mocked: no network) ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("cls", "source"), [(CIFAR10DataModule, CIFAR10), (CIFAR100DataModule, CIFAR100)])
def test_download_uses_torchvision_archive_and_is_idempotent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cls: type[InMemoryVisionDataModule], source: type[CIFAR10]
) -> None:
    checked: list[tuple[str, str]] = []
    downloads: list[tuple[tuple, dict]] = []
    intact = False

    def check_integrity(path: str, md5: str) -> bool:
        checked.append((Path(path).name, md5))
        return intact

    monkeypatch.setattr(cifar_module, "check_integrity", check_integrity)
    monkeypatch.setattr(cifar_module, "download_and_extract_archive", lambda *a, **k: downloads.append((a, k)))

    cls(data_dir=tmp_path).prepare_data()  # download=False: nothing at all
    assert not checked and not downloads

    dm = cls(data_dir=tmp_path, download=True)
    dm.prepare_data()
    assert len(downloads) == 2  # one per split whose files failed the check
    args, kwargs = downloads[0]
    assert args == (source.url, str(tmp_path))
    assert kwargs == {"filename": source.filename, "md5": source.tgz_md5}

    intact, checked[:], downloads[:] = True, [], []
    dm.prepare_data()
    assert downloads == []
    # Every file of both splits was checked against torchvision's per-file MD5.
    assert checked == [(name, md5) for name, md5 in source.train_list + source.test_list]


# -- CLI signatures -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cls", "changed_defaults"),
    [
        (CIFAR10DataModule, {}),
        (CIFAR100DataModule, {}),
        (CIFAR10LTDataModule, {"imbalance_factor": 100.0}),
        (CIFAR100LTDataModule, {"imbalance_factor": 100.0}),
    ],
)
def test_the_cli_sees_every_base_argument_with_its_default(cls: type, changed_defaults: dict) -> None:
    """Subclasses forward **kwargs; jsonargparse must still resolve the base's typed parameters."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(cls, "data")
    defaults = parser.get_defaults().data
    for name, base in inspect.signature(InMemoryVisionDataModule.__init__).parameters.items():
        if name == "self":
            continue
        assert name in defaults, name
        assert defaults[name] == changed_defaults.get(name, base.default), name
    assert cls().imbalance_factor == changed_defaults.get("imbalance_factor", 1.0)


def test_jsonargparse_sees_label_type_and_base_arguments(tmp_path: Path) -> None:
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser()
    parser.add_class_arguments(CIFAR100DataModule, "data")
    cfg = parser.parse_args(["--data.label_type=coarse", "--data.val_split=0.1", f"--data.data_dir={tmp_path}"])
    assert cfg.data.label_type == "coarse" and cfg.data.val_split == 0.1 and cfg.data.crop_padding == 4
    with pytest.raises(SystemExit):
        parser.parse_args(["--data.label_type=medium"])
    dm = CIFAR100DataModule(**cfg.data.as_dict())
    assert dm.num_classes == 20 and dm.data_dir == tmp_path
