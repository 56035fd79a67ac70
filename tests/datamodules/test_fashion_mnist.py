"""Fashion-MNIST datamodule and IDX reader on small files written in the real format (plus the real files if the
Debian package ``dataset-fashion-mnist`` is installed)."""

from __future__ import annotations

import gzip
import re
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
import torch

import lit_methods.datamodules.fashion_mnist as fmnist_module
from lit_methods.datamodules.fashion_mnist import IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, FashionMNISTDataModule, read_idx
from tests.datamodules.real_formats import FashionMNISTArrays, write_fashion_mnist, write_idx

REAL_DIR = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def no_system_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the system fallback at an empty folder, so only the files a test writes are found."""
    empty = tmp_path / "system"
    empty.mkdir()
    monkeypatch.setattr(FashionMNISTDataModule, "system_dir", empty)
    return empty


def assert_reads(dm: FashionMNISTDataModule, written: FashionMNISTArrays) -> None:
    dm.setup()
    assert dm.train_images is not None and dm.train_labels is not None
    assert dm.test_images is not None and dm.test_labels is not None
    assert dm.train_images.dtype == torch.uint8 and dm.train_images.shape == (len(written.train_labels), 1, 28, 28)
    assert dm.train_labels.dtype == torch.int64
    np.testing.assert_array_equal(dm.train_images[:, 0].numpy(), written.train_images)
    np.testing.assert_array_equal(dm.train_labels.numpy(), written.train_labels)
    np.testing.assert_array_equal(dm.test_images[:, 0].numpy(), written.test_images)
    np.testing.assert_array_equal(dm.test_labels.numpy(), written.test_labels)


# -- read_idx -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["array.idx", "array.idx.gz"])
def test_read_idx_roundtrip(tmp_path: Path, name: str) -> None:
    array = np.random.default_rng(0).integers(0, 256, size=(3, 4, 5), dtype=np.uint8)
    path = write_idx(tmp_path / name, array)
    out = read_idx(path, IDX_IMAGES_MAGIC)
    assert out.dtype == np.uint8 and out.flags.writeable
    np.testing.assert_array_equal(out, array)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "labels", array[0, 0]), IDX_LABELS_MAGIC), array[0, 0])


def test_read_idx_parses_the_header_by_hand(tmp_path: Path) -> None:
    """Big-endian magic 0x00000803, dims 2, 1, 3 (big-endian int32), then the bytes in C order."""
    raw = bytes.fromhex("00000803" "00000002" "00000001" "00000003") + bytes(range(1, 7))
    (tmp_path / "images").write_bytes(raw)
    assert read_idx(tmp_path / "images").tolist() == [[[1, 2, 3]], [[4, 5, 6]]]
    (tmp_path / "compressed").write_bytes(gzip.compress(raw))  # recognised by content, not by name
    assert read_idx(tmp_path / "compressed").tolist() == [[[1, 2, 3]], [[4, 5, 6]]]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"\x00\x00", "truncated"),
        (bytes.fromhex("00000801"), "magic number 2049, expected 2051"),
        (bytes.fromhex("00000903") + bytes(12), "not that of an IDX file of unsigned bytes"),
        (bytes.fromhex("12345678"), "not that of an IDX file"),
        (bytes.fromhex("00000803") + bytes(8), "header needs 16 bytes"),
        (bytes.fromhex("00000803" "00000002" "00000002" "00000002") + bytes(7), "needs 8 data bytes, found 7"),
        (bytes.fromhex("00000803" "00000001" "00000001" "00000002") + bytes(3), "needs 2 data bytes, found 3"),
    ],
    ids=["short-magic", "labels-magic", "not-ubyte", "garbage", "short-header", "short-data", "long-data"],
)
def test_read_idx_rejects_bad_files_by_name(tmp_path: Path, raw: bytes, message: str) -> None:
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(raw)
    with pytest.raises(RuntimeError, match=re.escape(str(path)) + ".*" + message):
        read_idx(path, IDX_IMAGES_MAGIC)


def test_read_idx_rejects_a_broken_gzip_by_name(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((2, 28, 28), np.uint8))
    path.write_bytes(path.read_bytes()[:30])
    with pytest.raises(RuntimeError, match=re.escape(str(path))):
        read_idx(path)


# -- locating and reading the splits -----------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["flat", "torchvision"])
@pytest.mark.parametrize("gzipped", [True, False])
def test_reads_both_layouts_gzipped_or_plain(
    tmp_path: Path, layout: Literal["flat", "torchvision"], gzipped: bool
) -> None:
    written = write_fashion_mnist(tmp_path / "data", n_train=50, n_test=20, seed=1, layout=layout, gzipped=gzipped)
    assert_reads(FashionMNISTDataModule(data_dir=tmp_path / "data"), written)


def test_torchvision_layout_takes_precedence_over_flat(tmp_path: Path) -> None:
    write_fashion_mnist(tmp_path, n_train=10, n_test=10, seed=1, layout="flat")
    written = write_fashion_mnist(tmp_path, n_train=20, n_test=10, seed=2, layout="torchvision", gzipped=False)
    assert_reads(FashionMNISTDataModule(data_dir=tmp_path), written)


@pytest.mark.parametrize("data_dir", ["empty", "missing", "a_file"])
def test_falls_back_to_system_dir_and_says_so(tmp_path: Path, no_system_dir: Path, data_dir: str, caplog) -> None:
    written = write_fashion_mnist(no_system_dir, n_train=30, n_test=10, seed=3)
    (tmp_path / "empty").mkdir()
    (tmp_path / "a_file").write_text("not a folder")
    with caplog.at_level("INFO"):
        assert_reads(FashionMNISTDataModule(data_dir=tmp_path / data_dir), written)
    said = caplog.text
    assert f"training split is read from {no_system_dir / 'train-images-idx3-ubyte.gz'}," in said
    assert f"(none under data_dir={str(tmp_path / data_dir)!r})" in said and "test split is read from" in said


def test_images_and_labels_come_from_the_same_folder(tmp_path: Path, no_system_dir: Path) -> None:
    """A folder with only the training images does not shadow a complete one further down."""
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((5, 28, 28), np.uint8))
    written = write_fashion_mnist(no_system_dir, n_train=30, n_test=10, seed=4)
    assert_reads(FashionMNISTDataModule(data_dir=tmp_path), written)


def test_missing_files_list_every_place_searched(tmp_path: Path, no_system_dir: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        FashionMNISTDataModule(data_dir=tmp_path / "data").setup("fit")
    message = str(info.value)
    for place in (tmp_path / "data" / "FashionMNIST" / "raw", tmp_path / "data", no_system_dir):
        assert str(place) in message
    assert "train-images-idx3-ubyte" in message and "download=True" in message


def test_corrupted_magic_is_reported_by_file_name(tmp_path: Path) -> None:
    write_fashion_mnist(tmp_path, n_train=10, n_test=10)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[3] = 0x01  # 2049: a labels file where the images belong
    path.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(RuntimeError, match=re.escape(str(path)) + ".*2049.*2051"):
        FashionMNISTDataModule(data_dir=tmp_path).setup("fit")


def test_inconsistent_files_are_rejected(tmp_path: Path) -> None:
    write_fashion_mnist(tmp_path, n_train=10, n_test=10, gzipped=False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(9, np.uint8))
    with pytest.raises(RuntimeError, match="10 images.*9 labels"):
        FashionMNISTDataModule(data_dir=tmp_path).setup("fit")
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.full(10, 10, np.uint8))
    with pytest.raises(RuntimeError, match=r"t10k-labels-idx1-ubyte.*\[0, 10\)"):
        FashionMNISTDataModule(data_dir=tmp_path).setup("test")
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((10, 32, 32), np.uint8))
    with pytest.raises(RuntimeError, match=r"t10k-images-idx3-ubyte.*\(32, 32\)"):
        FashionMNISTDataModule(data_dir=tmp_path).setup("test")


def test_download_only_when_the_split_is_found_nowhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict] = []
    monkeypatch.setattr(fmnist_module, "FashionMNIST", lambda **kwargs: calls.append(kwargs))
    FashionMNISTDataModule(data_dir=tmp_path, download=True).prepare_data()
    assert calls == [
        {"root": str(tmp_path), "train": True, "download": True},
        {"root": str(tmp_path), "train": False, "download": True},
    ]
    calls.clear()
    write_fashion_mnist(tmp_path, n_train=10, n_test=10)
    FashionMNISTDataModule(data_dir=tmp_path, download=True).prepare_data()
    assert calls == []


# -- defaults and the fast path ----------------------------------------------------------------------------------
def test_attributes_and_augmentation_defaults() -> None:
    dm = FashionMNISTDataModule()
    assert (dm.num_classes, dm.in_channels, dm.image_size) == (10, 1, (28, 28))
    assert (dm.mean, dm.std) == ((0.2860,), (0.3530,))
    assert (dm.crop_padding, dm.horizontal_flip) == (2, True)
    assert (dm.augment.crop_padding, dm.augment.horizontal_flip) == (2, True)
    assert FashionMNISTDataModule.system_dir is not None


def test_fast_path_normalizes_one_channel(tmp_path: Path) -> None:
    write_fashion_mnist(tmp_path, n_train=40, n_test=12)
    dm = FashionMNISTDataModule(data_dir=tmp_path, val_split=0.25, batch_size=16)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    images = batch["inputs"]
    assert images.dtype == torch.uint8 and images.shape == (10, 1, 28, 28)
    out = dm.on_after_batch_transfer(batch, 0)["inputs"]
    expected = (images.numpy().astype(np.float64) / 255.0 - 0.2860) / 0.3530
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("kwargs", "message"), [({"val_split": -1}, "-1"), ({"samples_per_class": 0}, "0")])
def test_invalid_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FashionMNISTDataModule(**kwargs)


# -- the real dataset ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(not REAL_DIR.is_dir(), reason=f"{REAL_DIR} not installed (Debian package dataset-fashion-mnist)")
def test_real_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(FashionMNISTDataModule, "system_dir", REAL_DIR)
    dm = FashionMNISTDataModule(data_dir=tmp_path)
    dm.setup()
    assert dm.train_images is not None and dm.train_labels is not None
    assert dm.test_images is not None and dm.test_labels is not None
    assert dm.train_images.shape == (60000, 1, 28, 28) and dm.test_images.shape == (10000, 1, 28, 28)
    assert torch.bincount(dm.train_labels).tolist() == [6000] * 10
    assert torch.bincount(dm.test_labels).tolist() == [1000] * 10
    pixels = dm.train_images.double().div_(255.0)
    assert pixels.mean().item() == pytest.approx(dm.mean[0], abs=1e-3)
    assert pixels.std(unbiased=False).item() == pytest.approx(dm.std[0], abs=1e-3)
