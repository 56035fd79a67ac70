"""ImageNet (ILSVRC-2012) and its smaller relatives: class subsets (ImageNet-100), Tiny-ImageNet-200, Imagenet32x32.

* :class:`ImageNetDataModule` reads the usual class-folder layout with :class:`torchvision.datasets.ImageFolder`
  (Russakovsky et al., "ImageNet Large Scale Visual Recognition Challenge", IJCV 2015, arXiv:1409.0575).
* :class:`ImageNet100DataModule` is the 100-class subset of Tian et al. (CMC, arXiv:1906.05849) and solo-learn.
* :class:`TinyImageNetDataModule` holds Tiny-ImageNet-200 (Le & Yang, "Tiny ImageNet Visual Recognition Challenge",
  CS231N 2015) in memory.
* :class:`DownsampledImageNetDataModule` holds Imagenet16/32/64x64 (Chrabaszcz, Loshchilov & Hutter, "A Downsampled
  Variant of ImageNet as an Alternative to the CIFAR datasets", arXiv:1707.08819) in memory.
"""

from __future__ import annotations

import copy
import os
import zipfile
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, Subset
from torchvision.datasets import ImageFolder
from torchvision.datasets.utils import download_and_extract_archive
from torchvision.datasets.vision import StandardTransform
from torchvision.transforms import v2

from lit_methods.datamodules.base import InMemoryVisionDataModule, VisionDataModule, split_indices
from lit_methods.datamodules.batch import INPUTS, TARGETS
from lit_methods.datamodules.transforms import tensor_ops

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DownsampledImageNetDataModule",
    "ImageNet100DataModule",
    "ImageNetDataModule",
    "TinyImageNetDataModule",
    "read_class_list",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_IMAGENET_LAYOUT = (
    "ImageNet cannot be downloaded automatically (its licence requires an account at https://image-net.org); "
    "download ILSVRC2012 there and lay it out as <data_dir>/train/<wnid>/*.JPEG and <data_dir>/val/<wnid>/*.JPEG "
    "(validation images sorted into class folders, e.g. with the common valprep.sh script)"
)
_PIL_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def read_class_list(path: str | Path) -> list[str]:
    """The wnids of a class-list file, in file order.

    One wnid per line; blank lines and everything after a ``#`` are ignored, and only the first whitespace-separated
    token of a line counts (so ``LOC_synset_mapping.txt``-style "wnid name" lines work). Duplicates are a
    ``ValueError`` naming them.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"class_list file {path} does not exist")
    wnids = []
    for line in path.read_text().splitlines():
        tokens = line.split("#", 1)[0].split()
        if tokens:
            wnids.append(tokens[0])
    if not wnids:
        raise ValueError(f"class_list file {path} lists no classes")
    duplicates = sorted({w for w in wnids if wnids.count(w) > 1})
    if duplicates:
        raise ValueError(f"class_list file {path} lists these wnids more than once: {', '.join(duplicates)}")
    return wnids


def load_rgb_image(path: str) -> Image.Image:
    """Decode an image file as RGB; a broken or unreadable file is a ``RuntimeError`` naming it."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except _PIL_ERRORS as err:
        raise RuntimeError(f"cannot read image {path}: {err}") from err


class _WnidImageFolder(ImageFolder):
    """:class:`ImageFolder` over exactly the given class folders, labelled by their position in ``wnids``."""

    def __init__(self, root: Path, wnids: list[str], transform: Callable | None) -> None:
        self.wnids = list(wnids)
        super().__init__(str(root), transform=transform, loader=load_rgb_image)

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        return self.wnids, {wnid: index for index, wnid in enumerate(self.wnids)}

    def __getitem__(self, index: int) -> dict[str, Any]:
        """``{"inputs": image, "targets": label}``: the named fields of :mod:`lit_methods.datamodules.batch`."""
        image, label = super().__getitem__(index)
        return {INPUTS: image, TARGETS: label}


class ImageNetDataModule(VisionDataModule):
    """ILSVRC-2012 from ``<data_dir>/train/<wnid>/*.JPEG`` and ``<data_dir>/val/<wnid>/*.JPEG``.

    Russakovsky et al., "ImageNet Large Scale Visual Recognition Challenge", IJCV 2015 (arXiv:1409.0575). Without
    ``class_list`` both folders must hold the 1000 class folders and the label of a class is the position of its wnid
    in sorted order (torchvision's and the pretrained models' convention). With ``class_list`` only the listed classes
    are read and the label is the position in the list.

    ImageNet has no labelled public test split: with ``val_split=0`` validation runs on ``val/``, and the test (and
    predict) dataloaders always use ``val/``. With ``val_split > 0`` a seeded part of ``train/`` is held out for
    validation, read with the evaluation transforms.

    Default transforms (torchvision v2): training ``RandomResizedCrop(image_size)`` + horizontal flip, evaluation
    ``Resize(round(image_size / 0.875))`` + ``CenterCrop(image_size)`` (256/224), both followed by normalization
    (unless ``normalize=False``). Batches are ``{"inputs": images, "targets": labels}``.

    Args:
        image_size: side of the (square) training crop and evaluation centre crop.
        class_list: text file of wnids, one per line (see :func:`read_class_list`), to train on a class subset.
        **others: see :class:`~lit_methods.datamodules.base.VisionDataModule`. ``download=True`` is rejected: see above.
    """

    name: ClassVar[str] = "imagenet"
    num_classes: int = 1000
    in_channels: int = 3
    image_size: tuple[int, int] = (224, 224)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __init__(self, image_size: int = 224, class_list: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if self.download:
            raise ValueError(f"download=True is not supported: {_IMAGENET_LAYOUT}")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        self.image_size = (image_size, image_size)
        self.class_list = class_list
        self.wnids = read_class_list(class_list) if class_list is not None else None
        if self.wnids is not None:
            self.num_classes = len(self.wnids)
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.test_dataset: Dataset | None = None

    # -- transforms ---------------------------------------------------------------------------------------------
    def default_train_transforms(self) -> Callable:
        random_ops = [v2.RandomResizedCrop(self.image_size, antialias=True), v2.RandomHorizontalFlip()]
        return v2.Compose([*random_ops, *tensor_ops(self.mean, self.std, self.inputs_normalized)])

    def default_val_transforms(self) -> Callable:
        resize = round(self.image_size[0] / 0.875)
        resize_ops = [v2.Resize(resize, antialias=True), v2.CenterCrop(self.image_size)]
        return v2.Compose([*resize_ops, *tensor_ops(self.mean, self.std, self.inputs_normalized)])

    # -- reading ------------------------------------------------------------------------------------------------
    def _split_dir(self, split: str) -> Path:
        path = self.data_dir / split
        if not path.is_dir():
            raise FileNotFoundError(f"{path} does not exist. {_IMAGENET_LAYOUT}")
        return path

    def _classes(self, root: Path) -> list[str]:
        present = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
        if self.wnids is None:
            if len(present) != self.num_classes:
                raise ValueError(
                    f"{root} holds {len(present)} class folders but ImageNet has {self.num_classes}; "
                    "pass class_list=<file of wnids> to train on a class subset"
                )
            return present
        available = set(present)
        unknown = [wnid for wnid in self.wnids if wnid not in available]
        if unknown:
            raise ValueError(f"class_list {self.class_list} names wnids with no folder in {root}: {', '.join(unknown)}")
        return self.wnids

    def _image_folder(self, split: str, transform: Callable) -> _WnidImageFolder:
        root = self._split_dir(split)
        return _WnidImageFolder(root, self._classes(root), transform)

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") or (stage == "validate" and self.val_split):
            if self.train_dataset is None:
                train = self._image_folder("train", self.resolved_train_transforms())
                if self.val_split:
                    train_idx, val_idx = split_indices(len(train), self.val_split, self.seed)
                    held_out = copy.copy(train)
                    held_out.transform = self.resolved_val_transforms()
                    held_out.transforms = StandardTransform(held_out.transform)
                    self.train_dataset = Subset(train, train_idx.tolist())
                    self.val_dataset = Subset(held_out, val_idx.tolist())
                else:
                    self.train_dataset = train
        needs_val_folder = stage in (None, "test", "predict") or not self.val_split
        if needs_val_folder and self.test_dataset is None:
            self.test_dataset = self._image_folder("val", self.resolved_val_transforms())

    # -- dataloaders --------------------------------------------------------------------------------------------
    def _loader(self, dataset: Dataset | None, train: bool) -> Any:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() has not loaded this split yet")
        return self.make_dataloader(dataset, train)

    def train_dataloader(self) -> Any:
        return self._loader(self.train_dataset, train=True)

    def val_dataloader(self) -> Any:
        return self._loader(self.val_dataset if self.val_split else self.test_dataset, train=False)

    def test_dataloader(self) -> Any:
        """The labelled ``val/`` folder: ImageNet's test labels are not public."""
        return self._loader(self.test_dataset, train=False)

    def predict_dataloader(self) -> Any:
        return self.test_dataloader()


class ImageNet100DataModule(ImageNetDataModule):
    """ImageNet-100: the 100-class subset used by CMC (Tian et al., arXiv:1906.05849) and solo-learn.

    The same reader as :class:`ImageNetDataModule` with a required ``class_list`` of exactly 100 wnids (for
    instance CMC's ``imagenet100.txt``); labels are the positions in that list.
    """

    name: ClassVar[str] = "imagenet100"
    num_classes: int = 100

    def __init__(self, class_list: str | None = None, **kwargs: Any) -> None:
        if class_list is None:
            raise ValueError("ImageNet100DataModule needs class_list: a file with the 100 wnids of the subset")
        super().__init__(class_list=class_list, **kwargs)
        if self.num_classes != 100:
            raise ValueError(f"ImageNet-100 needs 100 classes but class_list {class_list} lists {self.num_classes}")


def _decode_images(paths: list[Path], size: int) -> Tensor:
    """Decode RGB ``size`` x ``size`` images into a ``uint8`` ``(N, 3, size, size)`` tensor with a few threads."""
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)

    def decode(index: int) -> None:
        image = load_rgb_image(str(paths[index]))
        if image.size != (size, size):
            raise RuntimeError(f"image {paths[index]} is {image.size[0]}x{image.size[1]}, expected {size}x{size}")
        out[index] = np.asarray(image)

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for _ in pool.map(decode, range(len(paths))):
            pass
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


class TinyImageNetDataModule(InMemoryVisionDataModule):
    """Tiny-ImageNet-200: 200 classes of 64x64 RGB images, 500 training and 50 validation images per class.

    Le & Yang, "Tiny ImageNet Visual Recognition Challenge", CS231N 2015. Reads the archive's layout under
    ``<data_dir>/tiny-imagenet-200``: ``wnids.txt``, ``train/<wnid>/images/*.JPEG`` (the ``*_boxes.txt`` files are
    ignored) and ``val/images/*.JPEG`` labelled by ``val/val_annotations.txt``. The label of a class is the line of
    its wnid in ``wnids.txt`` (file order, not sorted). The official test images have no labels, so the "test" split
    here is the labelled validation set (in annotation-file order). All images are decoded into memory at setup
    (about 1.4 GB, some seconds with a small thread pool); grayscale images are converted to RGB.

    The random crop pads by 8 pixels by default (CIFAR's 4 scaled to 64x64 images). ``download=True`` fetches and
    extracts the archive from the CS231N site.
    """

    name: ClassVar[str] = "tiny_imagenet"
    num_classes: int = 200
    in_channels: int = 3
    image_size: tuple[int, int] = (64, 64)
    mean: tuple[float, ...] = (0.4802, 0.4481, 0.3975)
    std: tuple[float, ...] = (0.2770, 0.2691, 0.2821)
    url: ClassVar[str] = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
    md5: ClassVar[str] = "90528d7ca1a48142e341f4ef8d21d0de"

    def __init__(self, crop_padding: int = 8, **kwargs: Any) -> None:
        super().__init__(crop_padding=crop_padding, **kwargs)

    @property
    def root(self) -> Path:
        return self.data_dir / "tiny-imagenet-200"

    def download_split(self, train: bool) -> None:
        if (self.root / "wnids.txt").is_file() and (self.root / ("train" if train else "val")).is_dir():
            return
        download_and_extract_archive(self.url, self.data_dir, filename="tiny-imagenet-200.zip", md5=self.md5)

    def _wnids(self) -> list[str]:
        path = self.root / "wnids.txt"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} does not exist: pass download=True, or extract {self.url} into {self.data_dir}"
            )
        wnids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if len(wnids) != self.num_classes or len(set(wnids)) != len(wnids):
            raise RuntimeError(f"{path} should list {self.num_classes} distinct wnids, found {len(wnids)} lines")
        return wnids

    def load_split(self, train: bool) -> tuple[Tensor, Tensor]:
        wnids = self._wnids()
        paths: list[Path] = []
        labels: list[int] = []
        if train:
            for label, wnid in enumerate(wnids):
                folder = self.root / "train" / wnid / "images"
                if not folder.is_dir():
                    raise FileNotFoundError(f"{folder} does not exist: the Tiny-ImageNet training split is incomplete")
                files = sorted(folder.glob("*.JPEG"))
                if not files:
                    raise RuntimeError(f"{folder} holds no .JPEG images")
                paths += files
                labels += [label] * len(files)
        else:
            annotations = self.root / "val" / "val_annotations.txt"
            if not annotations.is_file():
                raise FileNotFoundError(f"{annotations} does not exist: the Tiny-ImageNet validation split is missing")
            index = {wnid: label for label, wnid in enumerate(wnids)}
            for number, line in enumerate(annotations.read_text().splitlines(), start=1):
                if not line.strip():
                    continue
                fields = line.split("\t")
                if len(fields) < 2 or fields[1] not in index:
                    raise RuntimeError(f"{annotations}, line {number}: expected 'file<TAB>wnid<TAB>box', got {line!r}")
                path = self.root / "val" / "images" / fields[0]
                if not path.is_file():
                    raise FileNotFoundError(f"{path}, listed in {annotations}, does not exist")
                paths.append(path)
                labels.append(index[fields[1]])
        return _decode_images(paths, self.image_size[0]), torch.tensor(labels, dtype=torch.int64)


_NPZ_ERRORS = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error)


class DownsampledImageNetDataModule(InMemoryVisionDataModule):
    """Imagenet16x16 / 32x32 / 64x64 in the authors' npz batches, held in memory.

    Chrabaszcz, Loshchilov & Hutter, "A Downsampled Variant of ImageNet as an Alternative to the CIFAR datasets",
    arXiv:1707.08819. Reads ``<data_dir>/Imagenet{r}_train_npz/train_data_batch_{1..10}.npz`` (concatenated in
    numeric order) and ``<data_dir>/Imagenet{r}_val_npz/val_data.npz``. Each file holds ``data`` (``uint8``,
    ``N x 3r^2``: the R, G and B planes, each row-major) and 1-based ``labels``; labels are returned 0-based. The
    "test" split is the official validation set. The files need an image-net.org login, so there is no download.

    Normalization uses the ImageNet per-channel statistics: the authors' scripts subtract the per-pixel mean image
    stored in the batches instead, and publish no per-channel figures for the downsampled images.

    Args:
        resolution: image side, 16, 32 or 64.
        **others: see :class:`~lit_methods.datamodules.base.InMemoryVisionDataModule`.
    """

    name: ClassVar[str] = "downsampled_imagenet"
    num_classes: int = 1000
    in_channels: int = 3
    image_size: tuple[int, int] = (32, 32)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    num_train_batches: ClassVar[int] = 10

    def __init__(self, resolution: Literal[16, 32, 64] = 32, **kwargs: Any) -> None:
        if resolution not in (16, 32, 64):
            raise ValueError(f"resolution must be 16, 32 or 64, got {resolution!r}")
        if kwargs.get("download"):
            raise ValueError(
                "download=True is not supported: the downsampled ImageNet files need a login at https://image-net.org "
                f"(Downloads > Download downsampled images); unzip Imagenet{resolution}_train_npz.zip and "
                f"Imagenet{resolution}_val_npz.zip into {kwargs.get('data_dir', 'data')}"
            )
        super().__init__(**kwargs)
        self.resolution = resolution
        self.image_size = (resolution, resolution)

    def split_files(self, train: bool) -> list[Path]:
        """The npz files of a split, in the order they are concatenated."""
        r = self.resolution
        if train:
            folder = self.data_dir / f"Imagenet{r}_train_npz"
            return [folder / f"train_data_batch_{b}.npz" for b in range(1, self.num_train_batches + 1)]
        return [self.data_dir / f"Imagenet{r}_val_npz" / "val_data.npz"]

    def load_split(self, train: bool) -> tuple[Tensor, Tensor]:
        files = self.split_files(train)
        for path in files:
            if not path.is_file():
                raise FileNotFoundError(
                    f"{path} does not exist: download Imagenet{self.resolution}_{'train' if train else 'val'}_npz.zip "
                    f"from https://image-net.org (login needed) and unzip it into {self.data_dir}"
                )
        # Labels first (small), so that the images are copied straight into one preallocated tensor.
        labels = [self._read(path, "labels") for path in files]
        for path, batch_labels in zip(files, labels):
            if batch_labels.ndim != 1 or not np.issubdtype(batch_labels.dtype, np.integer):
                raise RuntimeError(
                    f"{path}: 'labels' should be a 1-D integer array, got {batch_labels.dtype} {batch_labels.shape}"
                )
            if batch_labels.size and (batch_labels.min() < 1 or batch_labels.max() > self.num_classes):
                raise RuntimeError(
                    f"{path}: labels should lie in [1, {self.num_classes}], "
                    f"got [{batch_labels.min()}, {batch_labels.max()}]"
                )
        r = self.resolution
        images = torch.empty((sum(len(b) for b in labels), 3, r, r), dtype=torch.uint8)
        start = 0
        for path, batch_labels in zip(files, labels):
            data = self._read(path, "data")
            if data.dtype != np.uint8 or data.shape != (len(batch_labels), 3 * r * r):
                raise RuntimeError(
                    f"{path}: 'data' should be uint8 of shape ({len(batch_labels)}, {3 * r * r}) for {r}x{r} images, "
                    f"got {data.dtype} {data.shape}"
                )
            images[start : start + len(data)] = torch.from_numpy(data).view(-1, 3, r, r)
            start += len(data)
        return images, torch.from_numpy(np.concatenate(labels).astype(np.int64) - 1)

    @staticmethod
    def _read(path: Path, key: str) -> np.ndarray:
        try:
            with np.load(path) as archive:
                return archive[key]
        except _NPZ_ERRORS as err:
            raise RuntimeError(f"cannot read {key!r} from {path}: {type(err).__name__}: {err}") from err
