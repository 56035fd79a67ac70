"""Fashion-MNIST (Xiao, Rasul & Vollgraf, "Fashion-MNIST: a Novel Image Dataset for Benchmarking Machine Learning
Algorithms", arXiv:1708.07747): 60,000 training and 10,000 test 28x28 grayscale images of 10 clothing classes.

The splits are read from the original IDX files (gzipped or not) with :func:`read_idx`.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torchvision.datasets import FashionMNIST

from lit_methods.datamodules.base import InMemoryVisionDataModule

__all__ = ["FashionMNISTDataModule", "IDX_IMAGES_MAGIC", "IDX_LABELS_MAGIC", "read_idx"]

IDX_IMAGES_MAGIC = 2051
"""Magic number of an IDX file of unsigned bytes with 3 dimensions (images, rows, columns)."""
IDX_LABELS_MAGIC = 2049
"""Magic number of an IDX file of unsigned bytes with 1 dimension (labels)."""

_UBYTE = 0x08


def read_idx(path: str | Path, expected_magic: int | None = None) -> np.ndarray:
    """Read an IDX file of unsigned bytes (gzip-compressed or plain) into a ``uint8`` array.

    The format (LeCun et al., MNIST): a big-endian ``int32`` magic number ``0x0000 08 <ndim>``, ``ndim`` big-endian
    ``int32`` dimensions, then the data in C order.

    Args:
        path: the file; gzip compression is recognised by its first two bytes, not by the name.
        expected_magic: reject any other magic number (e.g. :data:`IDX_IMAGES_MAGIC`).

    Raises:
        RuntimeError: naming ``path`` when the file is not valid gzip, has a wrong magic number, or is truncated.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as error:
            raise RuntimeError(f"{path} is not a valid gzip file ({error})") from error
    if len(raw) < 4:
        raise RuntimeError(f"{path} is truncated: {len(raw)} bytes, no IDX header")
    magic = int.from_bytes(raw[:4], "big")
    ndim = raw[3]
    if raw[:3] != bytes((0, 0, _UBYTE)) or ndim < 1:
        raise RuntimeError(f"{path}: magic number {magic} is not that of an IDX file of unsigned bytes")
    if expected_magic is not None and magic != expected_magic:
        raise RuntimeError(f"{path}: magic number {magic}, expected {expected_magic}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise RuntimeError(f"{path} is truncated: its header needs {header} bytes, found {len(raw)}")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    size = int(np.prod(shape))
    if len(raw) - header != size:
        raise RuntimeError(f"{path}: shape {shape} needs {size} data bytes, found {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()


_SPLIT_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class FashionMNISTDataModule(InMemoryVisionDataModule):
    """Fashion-MNIST (Xiao et al. 2017, arXiv:1708.07747).

    Each split is looked up, in this order, in torchvision's layout ``<data_dir>/FashionMNIST/raw/``, directly in
    ``<data_dir>/``, and in :attr:`system_dir` (where the Debian package ``dataset-fashion-mnist`` installs the
    files); the first folder holding both the images and the labels file of the split (``<name>`` or
    ``<name>.gz``) wins. ``download=True`` runs torchvision's downloader into ``<data_dir>/FashionMNIST/raw/`` only
    when the split is found nowhere.

    The augmentation defaults differ from CIFAR's: ``crop_padding=2`` (the 4 pixels of CIFAR are a large shift of a
    28x28 object that fills its frame) and ``horizontal_flip=True`` (garments are left-right symmetric), the usual
    Fashion-MNIST recipe. ``mean``/``std`` are those of the 60,000 training images in [0, 1].

    Arguments: see :class:`~lit_methods.datamodules.base.InMemoryVisionDataModule`.
    """

    name: ClassVar[str] = "fashion_mnist"
    num_classes = 10
    in_channels = 1
    image_size = (28, 28)
    mean = (0.2860,)
    std = (0.3530,)
    system_dir: ClassVar[Path | None] = Path("/usr/share/datasets/fashion-mnist")
    """Last folder searched for the files (``None``: none)."""

    def __init__(self, crop_padding: int = 2, **kwargs: Any) -> None:
        super().__init__(crop_padding=crop_padding, **kwargs)

    def search_dirs(self) -> list[Path]:
        """The folders searched for the IDX files, in order."""
        dirs = [self.data_dir / "FashionMNIST" / "raw", self.data_dir]
        if self.system_dir is not None:
            dirs.append(Path(self.system_dir))
        return dirs

    def find_split(self, train: bool) -> tuple[Path, Path] | None:
        """(images file, labels file) of the split from the first folder that holds both, or ``None``."""
        for folder in self.search_dirs():
            found = [_existing(folder, stem) for stem in _SPLIT_FILES[train]]
            if found[0] is not None and found[1] is not None:
                return found[0], found[1]
        return None

    def load_split(self, train: bool) -> tuple[Tensor, Tensor]:
        files = self.find_split(train)
        if files is None:
            images_name, labels_name = _SPLIT_FILES[train]
            places = ", ".join(str(d) for d in self.search_dirs())
            raise FileNotFoundError(
                f"{type(self).__name__}: {images_name}[.gz] and {labels_name}[.gz] not found in any of: {places}. "
                f"Pass download=True (--data.download=true) or point data_dir at a folder containing them"
            )
        images_path, labels_path = files
        in_data_dir = images_path.parent in self.search_dirs()[:2]
        fallback = "" if in_data_dir else f" (none under data_dir={str(self.data_dir)!r})"
        split = "training" if train else "test"
        rank_zero_info(f"{type(self).__name__}: the {split} split is read from {images_path}, {labels_path}{fallback}")
        images = read_idx(images_path, IDX_IMAGES_MAGIC)
        labels = read_idx(labels_path, IDX_LABELS_MAGIC).astype(np.int64)
        if images.shape[1:] != self.image_size:
            raise RuntimeError(f"{images_path}: images are {images.shape[1:]}, expected {self.image_size}")
        if len(images) != len(labels):
            raise RuntimeError(f"{images_path} holds {len(images)} images but {labels_path} {len(labels)} labels")
        if labels.size and labels.max() >= self.num_classes:
            raise RuntimeError(f"{labels_path}: labels must lie in [0, {self.num_classes}), found {labels.max()}")
        return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels)

    def download_split(self, train: bool) -> None:
        """Download with torchvision into ``<data_dir>/FashionMNIST/raw/`` unless the split is found somewhere."""
        if self.find_split(train) is not None:
            return
        FashionMNIST(root=str(self.data_dir), train=train, download=True)


def _existing(folder: Path, stem: str) -> Path | None:
    for name in (stem, f"{stem}.gz"):
        if (folder / name).is_file():
            return folder / name
    return None
