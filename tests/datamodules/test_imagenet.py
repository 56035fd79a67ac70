"""Tests of :mod:`lit_methods.datamodules.imagenet` on tiny datasets written in the real on-disk layouts (no downloads)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Subset
from torchvision.transforms import v2

import lit_methods.datamodules.imagenet as imagenet_module
from lit_methods.datamodules.base import split_indices
from lit_methods.datamodules.imagenet import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DownsampledImageNetDataModule,
    ImageNet100DataModule,
    ImageNetDataModule,
    TinyImageNetDataModule,
    read_class_list,
)
from lit_methods.datamodules.normalization import Normalize
from tests.datamodules.imagenet_formats import (
    REAL_WNIDS,
    WrittenImageNet,
    colour_code,
    synthetic_wnids,
    write_class_list,
    write_downsampled_imagenet,
    write_imagenet,
    write_jpeg,
    write_tiny_imagenet,
)

RAW = v2.PILToTensor()  # uint8 CHW, no augmentation: lets a test read the colour (so the class) of each image


def _wnids_of_items(dataset, written: WrittenImageNet) -> list[tuple[str, int]]:
    """(wnid the image was written for, label it came back with) for every item of a dataset."""
    pairs = []
    for i in range(len(dataset)):
        item = dataset[i]
        image, label = item["inputs"], item["targets"]
        pairs.append((written.code_wnid[colour_code(image.numpy())], label))
    return pairs


@pytest.fixture(scope="module")
def full_imagenet(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, WrittenImageNet]:
    """All 1000 class folders (one small image per class and split), wnids written in unsorted order."""
    root = tmp_path_factory.mktemp("imagenet1k")
    return root, write_imagenet(root, synthetic_wnids(1000), train_per_class=1, val_per_class=1, size=(8, 8))


@pytest.fixture()
def small_imagenet(tmp_path: Path) -> tuple[Path, WrittenImageNet]:
    """Five real wnids, three training and two validation images per class, noisy 48x40 images."""
    root = tmp_path / "imagenet"
    return root, write_imagenet(root, list(REAL_WNIDS), train_per_class=3, val_per_class=2, size=(48, 40), noise=True)


# -- attributes and arguments ----------------------------------------------------------------------------------------
def test_attributes_are_set_right_after_construction(tmp_path: Path) -> None:
    dm = ImageNetDataModule(data_dir=tmp_path)
    assert (dm.num_classes, dm.in_channels, dm.image_size) == (1000, 3, (224, 224))
    assert (dm.mean, dm.std) == (IMAGENET_MEAN, IMAGENET_STD)
    assert ImageNetDataModule(data_dir=tmp_path, image_size=32).image_size == (32, 32)
    class_list = write_class_list(tmp_path / "classes.txt", list(REAL_WNIDS[:3]))
    assert ImageNetDataModule(data_dir=tmp_path, class_list=class_list).num_classes == 3
    assert ImageNetDataModule.num_classes == 1000  # the instance attribute did not leak into the class
    tiny = TinyImageNetDataModule(data_dir=tmp_path)
    assert (tiny.num_classes, tiny.in_channels, tiny.image_size) == (200, 3, (64, 64))
    assert (tiny.mean, tiny.std) == ((0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821))
    assert tiny.crop_padding == 8
    for resolution in (16, 32, 64):
        down = DownsampledImageNetDataModule(data_dir=tmp_path, resolution=resolution)
        assert (down.num_classes, down.in_channels, down.image_size) == (1000, 3, (resolution, resolution))
        assert (down.mean, down.std) == (IMAGENET_MEAN, IMAGENET_STD)


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (ImageNetDataModule, {"download": True}, "download=True.*image-net.org"),
        (ImageNetDataModule, {"image_size": 0}, "image_size.*0"),
        (ImageNetDataModule, {"image_size": -224}, "image_size.*-224"),
        (ImageNet100DataModule, {}, "class_list"),
        (DownsampledImageNetDataModule, {"resolution": 48}, "resolution.*48"),
        (DownsampledImageNetDataModule, {"download": True}, "download=True.*image-net.org"),
        (TinyImageNetDataModule, {"crop_padding": -1}, "crop_padding.*-1"),
    ],
)
def test_bad_arguments_are_rejected(tmp_path: Path, cls: type, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cls(data_dir=tmp_path, **kwargs)


def test_signatures_parse_as_the_cli_reads_them(tmp_path: Path) -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(L.LightningDataModule, "data")
    class_list = write_class_list(tmp_path / "imagenet100.txt", synthetic_wnids(100))
    cases = [
        (ImageNet100DataModule, {"class_list": class_list, "image_size": 32, "val_split": 0.1}, (100, (32, 32))),
        (DownsampledImageNetDataModule, {"resolution": 64, "crop_padding": 8}, (1000, (64, 64))),
        (TinyImageNetDataModule, {"val_split": 1000}, (200, (64, 64))),
    ]
    for cls, init_args, facts in cases:
        path = f"{cls.__module__}.{cls.__name__}"
        data = {"class_path": path, "init_args": {"data_dir": str(tmp_path), **init_args}}
        config = parser.parse_object({"data": data})
        dm = cls(**vars(config.data.init_args))
        assert (dm.num_classes, dm.image_size) == facts
    bad = {"class_path": "lit_methods.datamodules.imagenet.DownsampledImageNetDataModule", "init_args": {"resolution": 48}}
    with pytest.raises(Exception, match="resolution"):
        parser.parse_object({"data": bad})


# -- ImageNet: labels and class lists ---------------------------------------------------------------------------------
def test_full_imagenet_labels_are_positions_in_sorted_wnids(full_imagenet: tuple[Path, WrittenImageNet]) -> None:
    root, written = full_imagenet
    dm = ImageNetDataModule(data_dir=root, train_transforms=RAW, val_transforms=RAW, num_workers=0)
    dm.setup("fit")
    assert dm.test_dataset is not None  # val_split=0: validation reads val/
    position = {wnid: i for i, wnid in enumerate(sorted(written.wnids))}
    for dataset in (dm.train_dataset, dm.test_dataset):
        pairs = _wnids_of_items(dataset, written)
        assert len(pairs) == 1000
        assert all(label == position[wnid] for wnid, label in pairs)


def test_imagenet_without_class_list_needs_all_1000_folders(small_imagenet: tuple[Path, WrittenImageNet]) -> None:
    root, _ = small_imagenet
    with pytest.raises(ValueError, match="5 class folders.*class_list"):
        ImageNetDataModule(data_dir=root).setup("fit")


def test_class_list_keeps_listed_classes_in_list_order(
    small_imagenet: tuple[Path, WrittenImageNet], tmp_path: Path
) -> None:
    root, written = small_imagenet
    chosen = ["n01494475", "n01440764", "n01484850"]  # deliberately not sorted
    lines = ["# ImageNet-style subset", "", f"{chosen[0]}  # hammerhead", chosen[1], "   ", f"{chosen[2]} great white"]
    class_list = write_class_list(tmp_path / "subset.txt", lines)
    assert read_class_list(class_list) == chosen
    dm = ImageNetDataModule(data_dir=root, class_list=class_list, train_transforms=RAW, val_transforms=RAW)
    assert dm.num_classes == 3
    dm.setup()
    assert dm.train_dataset.classes == chosen
    for dataset, per_class in ((dm.train_dataset, 3), (dm.test_dataset, 2)):
        pairs = _wnids_of_items(dataset, written)
        assert len(pairs) == 3 * per_class
        assert sorted(pairs) == sorted((wnid, chosen.index(wnid)) for wnid in chosen for _ in range(per_class))


def test_class_list_duplicates_are_named(tmp_path: Path) -> None:
    class_list = write_class_list(tmp_path / "dup.txt", ["n01440764", "n01443537", "n01440764 # again"])
    with pytest.raises(ValueError, match="more than once: n01440764$"):
        ImageNetDataModule(data_dir=tmp_path, class_list=class_list)


def test_class_list_unknown_wnids_are_named(small_imagenet: tuple[Path, WrittenImageNet], tmp_path: Path) -> None:
    root, _ = small_imagenet
    class_list = write_class_list(tmp_path / "unknown.txt", ["n01440764", "n09999999", "n01443537", "tench"])
    dm = ImageNetDataModule(data_dir=root, class_list=class_list)
    with pytest.raises(ValueError, match="n09999999, tench"):
        dm.setup("fit")


def test_class_list_file_problems(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere.txt"):
        ImageNetDataModule(data_dir=tmp_path, class_list=str(tmp_path / "nowhere.txt"))
    empty = write_class_list(tmp_path / "empty.txt", ["# nothing", ""])
    with pytest.raises(ValueError, match="no classes"):
        ImageNetDataModule(data_dir=tmp_path, class_list=empty)


def test_imagenet100(full_imagenet: tuple[Path, WrittenImageNet], tmp_path: Path) -> None:
    root, written = full_imagenet
    three = write_class_list(tmp_path / "three.txt", written.wnids[:3])
    with pytest.raises(ValueError, match="100 classes.*lists 3"):
        ImageNet100DataModule(data_dir=root, class_list=three)
    chosen = written.wnids[500:600]
    class_list = write_class_list(tmp_path / "imagenet100.txt", chosen)
    dm = ImageNet100DataModule(data_dir=root, class_list=class_list, val_transforms=RAW, num_workers=0)
    assert dm.num_classes == 100 and dm.image_size == (224, 224)
    dm.setup("test")
    assert dm.train_dataset is None  # testing reads only val/
    assert _wnids_of_items(dm.test_dataset, written) == [(wnid, chosen.index(wnid)) for wnid in sorted(chosen)]
    assert "CMC" in (ImageNet100DataModule.__doc__ or "") and "solo-learn" in (ImageNet100DataModule.__doc__ or "")


# -- ImageNet: transforms and the validation split --------------------------------------------------------------------
def test_default_transforms_honour_image_size(tmp_path: Path) -> None:
    dm = ImageNetDataModule(data_dir=tmp_path, image_size=32)
    train, val = dm.default_train_transforms(), dm.default_val_transforms()
    crop = next(t for t in train.transforms if isinstance(t, v2.RandomResizedCrop))
    assert list(crop.size) == [32, 32] and crop.antialias
    assert any(isinstance(t, v2.RandomHorizontalFlip) for t in train.transforms)
    assert next(t for t in val.transforms if isinstance(t, v2.Resize)).size == [37]  # round(32 / 0.875)
    assert list(next(t for t in val.transforms if isinstance(t, v2.CenterCrop)).size) == [32, 32]
    default_val = ImageNetDataModule().default_val_transforms()
    assert next(t for t in default_val.transforms if isinstance(t, v2.Resize)).size == [256]
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 70, 3), dtype=np.uint8))
    for transform in (train, val):
        out = transform(image)
        assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    expected = v2.functional.center_crop(v2.functional.resize(v2.functional.pil_to_tensor(image), [37]), [32, 32])
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    expected = (expected.float() / 255 - mean) / std
    torch.testing.assert_close(val(image), expected, atol=0.05, rtol=0)


def test_val_split_is_disjoint_seeded_and_uses_eval_transforms(
    small_imagenet: tuple[Path, WrittenImageNet], tmp_path: Path
) -> None:
    root, written = small_imagenet
    class_list = write_class_list(tmp_path / "all.txt", list(REAL_WNIDS))
    dm = ImageNetDataModule(data_dir=root, class_list=class_list, image_size=32, val_split=0.2, seed=3, num_workers=0)
    dm.setup("fit")
    train, val = dm.train_dataset, dm.val_dataset
    assert isinstance(train, Subset) and isinstance(val, Subset)
    assert dm.test_dataset is None  # the val/ folder is not needed to fit with a held-out split
    assert len(val) == 3 and len(train) == 12
    assert set(train.indices).isdisjoint(val.indices) and set(train.indices) | set(val.indices) == set(range(15))
    train_paths = {train.dataset.samples[i][0] for i in train.indices}
    val_paths = {val.dataset.samples[i][0] for i in val.indices}
    assert train_paths.isdisjoint(val_paths) and train_paths | val_paths == {str(p) for p in written.files["train"]}
    again = ImageNetDataModule(data_dir=root, class_list=class_list, image_size=32, val_split=0.2, seed=3)
    again.setup("fit")
    assert again.val_dataset.indices == val.indices
    # validation: deterministic evaluation transform of the file; training: random augmentation
    eval_transform = dm.default_val_transforms()
    for i in range(len(val)):
        path, label = val.dataset.samples[val.indices[i]]
        with Image.open(path) as image:
            expected = eval_transform(image.convert("RGB"))
        image, got_label = val[i]["inputs"], val[i]["targets"]
        assert got_label == label and image.shape == (3, 32, 32)
        torch.testing.assert_close(image, expected, atol=0, rtol=0)
        torch.testing.assert_close(val[i]["inputs"], image, atol=0, rtol=0)
    torch.manual_seed(0)
    first, second = train[0]["inputs"], train[0]["inputs"]
    assert first.shape == (3, 32, 32) and not torch.equal(first, second)
    assert len(dm.val_dataloader().dataset) == 3
    dm.setup("test")
    assert len(dm.test_dataloader().dataset) == 10  # test reads val/


def test_val_split_zero_validates_on_val_folder_and_batches(small_imagenet: tuple[Path, WrittenImageNet]) -> None:
    root, written = small_imagenet
    class_list = write_class_list(root / "classes.txt", list(REAL_WNIDS))
    dm = ImageNetDataModule(data_dir=root, class_list=class_list, image_size=32, batch_size=4, num_workers=0)
    dm.setup("validate")
    assert dm.train_dataset is None
    loader = dm.val_dataloader()
    assert loader.dataset is dm.test_dataset and len(loader.dataset) == len(written.files["val"])
    batch = next(iter(loader))
    images, labels = batch["inputs"], batch["targets"]
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32 and labels.dtype == torch.int64
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    images, labels = batch["inputs"], batch["targets"]
    assert images.shape == (4, 3, 32, 32) and set(labels.tolist()) <= set(range(5))


def test_normalize_false_yields_the_same_images_as_pixels(small_imagenet: tuple[Path, WrittenImageNet]) -> None:
    root, _ = small_imagenet
    class_list = write_class_list(root / "classes.txt", list(REAL_WNIDS))
    kwargs = dict(data_dir=root, class_list=class_list, image_size=32, batch_size=4, num_workers=0)
    normalized, pixels = ImageNetDataModule(**kwargs), ImageNetDataModule(normalize=False, **kwargs)
    assert (normalized.inputs_normalized, pixels.inputs_normalized) == (True, False)
    for dm in (normalized, pixels):
        dm.setup("validate")
    expected = next(iter(normalized.val_dataloader()))["inputs"]
    got = next(iter(pixels.val_dataloader()))["inputs"]
    assert 0 <= got.min() and got.max() <= 1
    torch.testing.assert_close(Normalize(normalized.mean, normalized.std)(got), expected, rtol=0, atol=1e-5)


def test_missing_imagenet_folders_are_explained(tmp_path: Path) -> None:
    dm = ImageNetDataModule(data_dir=tmp_path / "ilsvrc")
    with pytest.raises(FileNotFoundError, match=r"ilsvrc/train does not exist.*cannot be downloaded.*licence"):
        dm.setup("fit")
    with pytest.raises(FileNotFoundError, match=r"ilsvrc/val does not exist.*<data_dir>/val/<wnid>"):
        dm.setup("test")
    with pytest.raises(RuntimeError, match="setup"):
        dm.train_dataloader()


def test_corrupted_images_are_named_when_loaded(small_imagenet: tuple[Path, WrittenImageNet], tmp_path: Path) -> None:
    root, written = small_imagenet
    garbage, truncated = written.files["train"][1], written.files["train"][4]
    garbage.write_bytes(b"this is not a JPEG")
    truncated.write_bytes(truncated.read_bytes()[:200])
    class_list = write_class_list(tmp_path / "all.txt", list(REAL_WNIDS))
    dm = ImageNetDataModule(data_dir=root, class_list=class_list, train_transforms=RAW)
    dm.setup("fit")
    paths = [path for path, _ in dm.train_dataset.samples]
    for broken in (garbage, truncated):
        with pytest.raises(RuntimeError, match=broken.name):
            dm.train_dataset[paths.index(str(broken))]
    assert dm.train_dataset[0]["inputs"].shape == (3, 40, 48)


# -- Tiny-ImageNet ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    return write_tiny_imagenet(tmp_path_factory.mktemp("tiny"))


def test_tiny_imagenet_reads_the_real_layout(tiny) -> None:
    assert tiny.wnids != sorted(tiny.wnids)  # labels must follow wnids.txt, not sorted order
    dm = TinyImageNetDataModule(data_dir=tiny.root.parent)
    dm.setup()
    assert dm.train_images.dtype == torch.uint8 and dm.train_images.shape == (400, 3, 64, 64)
    torch.testing.assert_close(dm.train_labels, torch.from_numpy(tiny.train_labels).long(), atol=0, rtol=0)
    torch.testing.assert_close(dm.train_images, torch.from_numpy(tiny.train_images), atol=2, rtol=0)
    gray = dm.train_images[3]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])  # grayscale file came back as RGB
    # the "test" split is the labelled val set, labelled through val_annotations.txt
    torch.testing.assert_close(dm.test_labels, torch.from_numpy(tiny.val_labels).long(), atol=0, rtol=0)
    torch.testing.assert_close(dm.test_images, torch.from_numpy(tiny.val_images), atol=2, rtol=0)
    assert dm.val_dataloader().images is dm.test_images


def test_tiny_imagenet_loaders_and_training(tiny) -> None:
    dm = TinyImageNetDataModule(data_dir=tiny.root.parent, val_split=40, batch_size=16)
    dm.setup("fit")
    assert len(dm.train_labels) == 360 and len(dm.val_labels) == 40 and dm.test_images is None
    torchvision_path = TinyImageNetDataModule(data_dir=tiny.root.parent, fast_loader=False, batch_size=8, num_workers=0)
    torchvision_path.setup("fit")
    images = next(iter(torchvision_path.train_dataloader()))["inputs"]
    assert images.shape == (8, 3, 64, 64) and images.dtype == torch.float32

    class Probe(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3 * 64 * 64, 200)
            self.seen: list[tuple[tuple[int, ...], torch.dtype]] = []

        def training_step(self, batch, batch_idx):
            x, y = batch["inputs"], batch["targets"]
            self.seen.append((tuple(x.shape), x.dtype))
            return F.cross_entropy(self.fc(x.flatten(1)), y)

        def validation_step(self, batch, batch_idx):
            x = batch["inputs"]
            self.seen.append((tuple(x.shape), x.dtype))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    model = Probe()
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, dm)
    assert model.seen == [((16, 3, 64, 64), torch.float32)] * 3


def test_tiny_imagenet_download_uses_the_official_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_download(url, download_root, extract_root=None, filename=None, md5=None, remove_finished=False):
        calls.append((url, Path(download_root), filename, md5))
        write_tiny_imagenet(Path(download_root), train_per_class=1, val_images=2)

    monkeypatch.setattr(imagenet_module, "download_and_extract_archive", fake_download)
    dm = TinyImageNetDataModule(data_dir=tmp_path, download=True)
    dm.prepare_data()
    dm.prepare_data()  # already there: no second download
    url, md5 = "http://cs231n.stanford.edu/tiny-imagenet-200.zip", "90528d7ca1a48142e341f4ef8d21d0de"
    assert calls == [(url, tmp_path, "tiny-imagenet-200.zip", md5)]


def test_tiny_imagenet_problems_are_named(tmp_path: Path) -> None:
    dm = TinyImageNetDataModule(data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="tiny-imagenet-200/wnids.txt.*download=True"):
        dm.setup("fit")
    written = write_tiny_imagenet(tmp_path, train_per_class=1, val_images=4)
    annotations = written.root / "val" / "val_annotations.txt"
    good = annotations.read_text()

    annotations.write_text(good + "val_0.JPEG\tn99999999\t0\t0\t1\t1\n")
    with pytest.raises(RuntimeError, match="val_annotations.txt, line 5"):
        dm.load_split(train=False)
    annotations.write_text(good + "val_77.JPEG\t" + written.wnids[0] + "\t0\t0\t1\t1\n")
    with pytest.raises(FileNotFoundError, match="val_77.JPEG"):
        dm.load_split(train=False)
    annotations.write_text(good)

    write_jpeg(written.val_files[1], (1, 2, 3), (32, 32))
    with pytest.raises(RuntimeError, match=f"{written.val_files[1].name} is 32x32, expected 64x64"):
        dm.load_split(train=False)
    written.train_files[7].write_bytes(b"\xff\xd8 broken")
    with pytest.raises(RuntimeError, match=written.train_files[7].name):
        dm.load_split(train=True)
    (written.root / "wnids.txt").write_text("\n".join(written.wnids[:150]))
    with pytest.raises(RuntimeError, match="wnids.txt should list 200"):
        dm.load_split(train=True)


# -- Imagenet32 and friends -------------------------------------------------------------------------------------------
def test_downsampled_channel_planes_and_zero_based_labels(tmp_path: Path) -> None:
    folder = tmp_path / "Imagenet32_train_npz"
    folder.mkdir()
    for b in range(1, 11):
        data = np.zeros((1, 3072), dtype=np.uint8)
        data[0, 0], data[0, 1024], data[0, 2048] = 200, 100, 50  # pixel (0, 0): R, G, B planes
        data[0, 1] = 7  # R of pixel (row 0, col 1)
        data[0, 32] = 9  # R of pixel (row 1, col 0)
        data[0, 2048 + 1023] = b  # B of the last pixel
        np.savez(folder / f"train_data_batch_{b}.npz", data=data, labels=[b if b < 10 else 1000], mean=data[0] * 0.5)
    dm = DownsampledImageNetDataModule(data_dir=tmp_path)
    images, labels = dm.load_split(train=True)
    assert images.shape == (10, 3, 32, 32) and images.dtype == torch.uint8
    assert images[0, :, 0, 0].tolist() == [200, 100, 50]
    assert images[0, 0, 0, 1] == 7 and images[0, 0, 1, 0] == 9 and images[0, 0, 1, 1] == 0
    assert images[:, 2, 31, 31].tolist() == list(range(1, 11))  # batch_10 comes after batch_9
    assert labels.dtype == torch.int64 and labels.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 999]


@pytest.mark.parametrize("resolution", [16, 32, 64])
def test_downsampled_batches_concatenate_in_numeric_order(tmp_path: Path, resolution: int) -> None:
    written = write_downsampled_imagenet(tmp_path, resolution=resolution)
    dm = DownsampledImageNetDataModule(data_dir=tmp_path, resolution=resolution, val_split=5)
    dm.setup()
    expected_images, expected_labels = torch.from_numpy(written.train_images), torch.from_numpy(written.train_labels)
    train_idx, val_idx = split_indices(55, 5, dm.seed)
    assert torch.equal(dm.train_images, expected_images[train_idx])
    assert torch.equal(dm.val_images, expected_images[val_idx])
    assert torch.equal(dm.train_labels, expected_labels[train_idx])
    assert torch.equal(dm.val_labels, expected_labels[val_idx])
    assert torch.equal(dm.test_images, torch.from_numpy(written.val_images))
    assert torch.equal(dm.test_labels, torch.from_numpy(written.val_labels))


def test_downsampled_missing_files_are_named(tmp_path: Path) -> None:
    dm = DownsampledImageNetDataModule(data_dir=tmp_path, resolution=16)
    with pytest.raises(FileNotFoundError, match=r"Imagenet16_train_npz/train_data_batch_1\.npz.*image-net.org"):
        dm.load_split(train=True)
    written = write_downsampled_imagenet(tmp_path, resolution=16)
    written.train_files[6].unlink()
    with pytest.raises(FileNotFoundError, match=r"train_data_batch_7\.npz"):
        dm.load_split(train=True)
    written.val_file.unlink()
    with pytest.raises(FileNotFoundError, match=r"Imagenet16_val_npz/val_data\.npz"):
        dm.load_split(train=False)


def test_downsampled_corrupted_files_are_named(tmp_path: Path) -> None:
    written = write_downsampled_imagenet(tmp_path, resolution=16)
    dm = DownsampledImageNetDataModule(data_dir=tmp_path, resolution=16)
    bad = written.train_files[2]
    good = bad.read_bytes()
    cases = [
        (b"not an npz file at all", r"train_data_batch_3\.npz"),
        (good[: len(good) // 2], r"train_data_batch_3\.npz"),
    ]
    for content, match in cases:
        bad.write_bytes(content)
        with pytest.raises(RuntimeError, match=match):
            dm.load_split(train=True)
    np.savez(bad, data=np.zeros((3, 768), dtype=np.uint8))
    with pytest.raises(RuntimeError, match=r"'labels'.*train_data_batch_3\.npz"):
        dm.load_split(train=True)
    np.savez(bad, data=np.zeros((3, 3072), dtype=np.uint8), labels=[1, 2, 3])
    with pytest.raises(RuntimeError, match=r"train_data_batch_3\.npz.*\(3, 768\).*\(3, 3072\)"):
        dm.load_split(train=True)
    np.savez(bad, data=np.zeros((3, 768), dtype=np.uint8), labels=[0, 2, 3])
    with pytest.raises(RuntimeError, match=r"train_data_batch_3\.npz.*\[1, 1000\]"):
        dm.load_split(train=True)
