"""CIFAR-10 and CIFAR-100 (Krizhevsky, "Learning Multiple Layers of Features from Tiny Images", 2009), balanced and
long-tailed (CIFAR-10/100-LT of Cao et al., LDAM, arXiv:1906.07413).

The splits are read straight from the pickles of the official "python version" archives (the layout torchvision
extracts, ``<data_dir>/cifar-10-batches-py/data_batch_1..5, test_batch`` and ``<data_dir>/cifar-100-python/train,
test``) into one ``uint8`` tensor per split, which is much faster than going through torchvision's per-sample dataset
classes. Downloading reuses torchvision's URL and checksums.

The files are Python pickles: only point ``data_dir`` at files you trust.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import Tensor
from torchvision.datasets import CIFAR10, CIFAR100
from torchvision.datasets.utils import check_integrity, download_and_extract_archive

from lit_methods.datamodules.base import InMemoryVisionDataModule

__all__ = [
    "CIFAR100DataModule",
    "CIFAR100LTDataModule",
    "CIFAR10DataModule",
    "CIFAR10LTDataModule",
    "read_cifar_batch",
]

_PIXELS = 3 * 32 * 32


def read_cifar_batch(path: str | Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR pickle as (``uint8`` ``(N, 3, 32, 32)`` images, ``int64`` ``(N,)`` labels).

    ``b"data"`` holds one row of 3072 bytes per image: the red, green and blue 32x32 planes, each row-major.
    ``label_key`` is ``b"labels"`` (CIFAR-10), ``b"fine_labels"`` or ``b"coarse_labels"`` (CIFAR-100).

    Raises:
        RuntimeError: naming ``path`` when it is truncated or does not hold a CIFAR batch.
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            entry = pickle.load(f, encoding="bytes")
        data = entry[b"data"]
        labels = np.asarray(entry[label_key], dtype=np.int64)
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _PIXELS:
            raise ValueError(f"b'data' must be a uint8 array of shape (N, {_PIXELS})")
        images = data.reshape(len(labels), 3, 32, 32)
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, IndexError) as error:
        raise RuntimeError(
            f"{path} is truncated or corrupted ({type(error).__name__}: {error}); delete it and download it again"
        ) from error
    return images, labels


class _CIFARDataModule(InMemoryVisionDataModule):
    """Shared reading and downloading of the CIFAR "python version" archives described by ``torchvision_dataset``."""

    in_channels = 3
    image_size = (32, 32)
    torchvision_dataset: ClassVar[type[CIFAR10]]

    def label_key(self) -> bytes:
        """Key of the labels in the pickles."""
        raise NotImplementedError

    def split_files(self, train: bool) -> list[tuple[Path, str]]:
        """``(path, md5)`` of every file of the split, in the order their images are concatenated."""
        source = self.torchvision_dataset
        folder = self.data_dir / source.base_folder
        return [(folder / name, md5) for name, md5 in (source.train_list if train else source.test_list)]

    def load_split(self, train: bool) -> tuple[Tensor, Tensor]:
        files = [path for path, _ in self.split_files(train)]
        for path in files:
            if not path.is_file():
                raise FileNotFoundError(
                    f"{type(self).__name__}: {path} not found. Pass download=True (--data.download=true) or point "
                    f"data_dir at a folder containing {self.torchvision_dataset.base_folder}/"
                )
        images, labels = [], []
        for path in files:
            batch_images, batch_labels = read_cifar_batch(path, self.label_key())
            if batch_labels.size and (batch_labels.min() < 0 or batch_labels.max() >= self.num_classes):
                raise RuntimeError(
                    f"{path}: labels must lie in [0, {self.num_classes}), "
                    f"found [{batch_labels.min()}, {batch_labels.max()}]"
                )
            images.append(batch_images)
            labels.append(batch_labels)
        return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))

    def download_split(self, train: bool) -> None:
        """Download and extract the archive unless every file of the split is present with its MD5."""
        if all(check_integrity(str(path), md5) for path, md5 in self.split_files(train)):
            return
        source = self.torchvision_dataset
        download_and_extract_archive(source.url, str(self.data_dir), filename=source.filename, md5=source.tgz_md5)


class CIFAR10DataModule(_CIFARDataModule):
    """CIFAR-10: 50,000 training and 10,000 test 32x32 RGB images of 10 classes (Krizhevsky, 2009).

    Reads ``<data_dir>/cifar-10-batches-py/data_batch_1..5`` (the training split, concatenated in that order) and
    ``test_batch``; ``batches.meta`` is not needed. Arguments: see :class:`~lit_methods.datamodules.base.InMemoryVisionDataModule`.
    """

    name: ClassVar[str] = "cifar10"
    num_classes = 10
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)
    torchvision_dataset: ClassVar[type[CIFAR10]] = CIFAR10

    def label_key(self) -> bytes:
        return b"labels"


class CIFAR10LTDataModule(CIFAR10DataModule):
    """CIFAR-10-LT: CIFAR-10 with an exponentially long-tailed training split (Cao et al., LDAM, arXiv:1906.07413).

    Identical to :class:`CIFAR10DataModule` except that ``imbalance_factor`` defaults to 100 (class ``i`` keeps
    ``floor(5000 * 100 ** (-i / 9))`` images, 5000 down to 50); the test split stays balanced. A ``val_split`` is
    carved from the long-tailed training split.
    """

    name: ClassVar[str] = "cifar10_lt"

    def __init__(self, imbalance_factor: float = 100.0, **kwargs: Any) -> None:
        super().__init__(imbalance_factor=imbalance_factor, **kwargs)


class CIFAR100DataModule(_CIFARDataModule):
    """CIFAR-100: 50,000 training and 10,000 test 32x32 RGB images of 100 classes in 20 superclasses (Krizhevsky, 2009).

    Reads ``<data_dir>/cifar-100-python/train`` and ``test``; ``meta`` is not needed.

    Args:
        label_type: ``"fine"`` for the 100 classes, ``"coarse"`` for the 20 superclasses (``num_classes`` follows).
        **others: see :class:`~lit_methods.datamodules.base.InMemoryVisionDataModule`.
    """

    name: ClassVar[str] = "cifar100"
    num_classes = 100
    mean = (0.5071, 0.4865, 0.4409)
    std = (0.2673, 0.2564, 0.2762)
    torchvision_dataset: ClassVar[type[CIFAR10]] = CIFAR100

    def __init__(self, label_type: Literal["fine", "coarse"] = "fine", **kwargs: Any) -> None:
        if label_type not in ("fine", "coarse"):
            raise ValueError(f"label_type must be 'fine' or 'coarse', got {label_type!r}")
        self.label_type = label_type
        self.num_classes = 100 if label_type == "fine" else 20
        super().__init__(**kwargs)

    def label_key(self) -> bytes:
        return b"fine_labels" if self.label_type == "fine" else b"coarse_labels"


class CIFAR100LTDataModule(CIFAR100DataModule):
    """CIFAR-100-LT: CIFAR-100 with an exponentially long-tailed training split (Cao et al., LDAM, arXiv:1906.07413).

    Identical to :class:`CIFAR100DataModule` except that ``imbalance_factor`` defaults to 100 (class ``i`` keeps
    ``floor(500 * 100 ** (-i / 99))`` images, 500 down to 5); the test split stays balanced. A ``val_split`` is
    carved from the long-tailed training split.
    """

    name: ClassVar[str] = "cifar100_lt"

    def __init__(self, imbalance_factor: float = 100.0, **kwargs: Any) -> None:
        super().__init__(imbalance_factor=imbalance_factor, **kwargs)
