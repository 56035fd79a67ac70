"""Writers of small datasets in the exact on-disk formats of the real ones, for tests that must not download.

* CIFAR-10 (``cifar-10-batches-py/``) and CIFAR-100 (``cifar-100-python/``): the pickled dicts of the official
  "python version" archives (protocol 2, bytes keys; ``b"data"`` is a ``uint8`` ``(N, 3072)`` array whose rows hold
  the R, G and B 32x32 planes one after the other, each row-major; labels are lists of ints).
* Fashion-MNIST: IDX files (big-endian ``int32`` magic ``0x0000 08 <ndim>``, the dimensions, then the bytes),
  gzipped like the published ``*.gz`` files or plain like torchvision's extracted copies.

Every writer draws random images and class-balanced labels (``np.arange(n) % num_classes``, shuffled) from ``seed``
and returns the arrays it wrote, as NamedTuples, so tests can compare what a datamodule reads with what was written.
"""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np

__all__ = [
    "CIFAR100_BASE_FOLDER",
    "CIFAR100Arrays",
    "CIFAR10_BASE_FOLDER",
    "CIFARArrays",
    "FASHION_MNIST_FILES",
    "FashionMNISTArrays",
    "balanced_labels",
    "write_cifar10",
    "write_cifar100",
    "write_cifar_pickle",
    "write_fashion_mnist",
    "write_idx",
]

CIFAR10_BASE_FOLDER = "cifar-10-batches-py"
CIFAR100_BASE_FOLDER = "cifar-100-python"
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


class CIFARArrays(NamedTuple):
    """What :func:`write_cifar10` wrote: ``uint8`` ``(N, 3, 32, 32)`` images and ``int64`` labels."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


class CIFAR100Arrays(NamedTuple):
    """What :func:`write_cifar100` wrote; ``coarse_of_fine[f]`` is the superclass of fine class ``f``."""

    train_images: np.ndarray
    train_fine: np.ndarray
    train_coarse: np.ndarray
    test_images: np.ndarray
    test_fine: np.ndarray
    test_coarse: np.ndarray
    coarse_of_fine: np.ndarray


class FashionMNISTArrays(NamedTuple):
    """What :func:`write_fashion_mnist` wrote: ``uint8`` ``(N, 28, 28)`` images and ``int64`` labels."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def balanced_labels(n: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` labels with every class ``n // num_classes`` or one more times, in random order."""
    return rng.permutation(np.arange(n) % num_classes).astype(np.int64)


def _random_images(rng: np.random.Generator, n: int, *shape: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)


def write_cifar_pickle(path: str | Path, entry: dict[bytes, Any]) -> Path:
    """Pickle one CIFAR dict as the archives do (protocol 2); creates the parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        pickle.dump(entry, f, protocol=2)
    return path


def _cifar_rows(images: np.ndarray) -> np.ndarray:
    """``(N, 3, 32, 32)`` -> the ``(N, 3072)`` rows of the archives: R plane, G plane, B plane, each row-major."""
    return np.ascontiguousarray(images).reshape(len(images), 3 * 32 * 32)


def write_cifar10(
    root: str | Path, n_train_per_batch: int = 20, n_test: int = 20, seed: int = 0, write_meta: bool = True
) -> CIFARArrays:
    """Write ``<root>/cifar-10-batches-py/`` with ``data_batch_1..5`` of ``n_train_per_batch`` images each,
    ``test_batch`` of ``n_test`` and (if ``write_meta``) ``batches.meta``.

    The training labels are balanced over all five batches together (the real split has 5,000 per class); the
    returned training arrays are the five batches concatenated in order.
    """
    rng = np.random.default_rng(seed)
    folder = Path(root) / CIFAR10_BASE_FOLDER
    n_train = 5 * n_train_per_batch
    train_images, train_labels = _random_images(rng, n_train, 3, 32, 32), balanced_labels(n_train, 10, rng)
    test_images, test_labels = _random_images(rng, n_test, 3, 32, 32), balanced_labels(n_test, 10, rng)
    for b in range(5):
        part = slice(b * n_train_per_batch, (b + 1) * n_train_per_batch)
        write_cifar_pickle(
            folder / f"data_batch_{b + 1}",
            {
                b"batch_label": f"training batch {b + 1} of 5".encode(),
                b"labels": train_labels[part].tolist(),
                b"data": _cifar_rows(train_images[part]),
                b"filenames": [f"train_{i}.png".encode() for i in range(part.start, part.stop)],
            },
        )
    write_cifar_pickle(
        folder / "test_batch",
        {
            b"batch_label": b"testing batch 1 of 1",
            b"labels": test_labels.tolist(),
            b"data": _cifar_rows(test_images),
            b"filenames": [f"test_{i}.png".encode() for i in range(n_test)],
        },
    )
    if write_meta:
        write_cifar_pickle(
            folder / "batches.meta",
            {
                b"num_cases_per_batch": n_train_per_batch,
                b"label_names": [f"class_{c}".encode() for c in range(10)],
                b"num_vis": 3072,
            },
        )
    return CIFARArrays(train_images, train_labels, test_images, test_labels)


def write_cifar100(
    root: str | Path, n_train: int = 200, n_test: int = 100, seed: int = 0, write_meta: bool = True
) -> CIFAR100Arrays:
    """Write ``<root>/cifar-100-python/train`` and ``test`` (with fine and coarse labels) and, if ``write_meta``,
    ``meta``. Every superclass groups 5 fine classes, as in the real dataset (the grouping itself is random)."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / CIFAR100_BASE_FOLDER
    coarse_of_fine = rng.permutation(np.arange(100) % 20).astype(np.int64)
    arrays: list[np.ndarray] = []
    for split, n in (("train", n_train), ("test", n_test)):
        images, fine = _random_images(rng, n, 3, 32, 32), balanced_labels(n, 100, rng)
        coarse = coarse_of_fine[fine]
        write_cifar_pickle(
            folder / split,
            {
                b"filenames": [f"{split}_{i}.png".encode() for i in range(n)],
                b"batch_label": f"{split}ing batch 1 of 1".encode(),
                b"fine_labels": fine.tolist(),
                b"coarse_labels": coarse.tolist(),
                b"data": _cifar_rows(images),
            },
        )
        arrays += [images, fine, coarse]
    if write_meta:
        write_cifar_pickle(
            folder / "meta",
            {
                b"fine_label_names": [f"fine_{c}".encode() for c in range(100)],
                b"coarse_label_names": [f"coarse_{c}".encode() for c in range(20)],
            },
        )
    return CIFAR100Arrays(*arrays, coarse_of_fine)


def write_idx(path: str | Path, array: np.ndarray) -> Path:
    """Write a ``uint8`` array as an IDX file, gzip-compressed when ``path`` ends in ``.gz``; creates the folders."""
    path = Path(path)
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes((0, 0, 0x08, array.ndim)) + np.asarray(array.shape, dtype=">i4").tobytes()
    payload = header + array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)
    return path


def write_fashion_mnist(
    root: str | Path,
    n_train: int = 60,
    n_test: int = 20,
    seed: int = 0,
    layout: Literal["flat", "torchvision"] = "flat",
    gzipped: bool = True,
) -> FashionMNISTArrays:
    """Write the four Fashion-MNIST IDX files (28x28 images, labels 0..9).

    ``layout="flat"`` puts them in ``<root>/`` (as the published files and the Debian package),
    ``"torchvision"`` in ``<root>/FashionMNIST/raw/``; ``gzipped`` adds ``.gz`` and compresses.
    """
    rng = np.random.default_rng(seed)
    folder = Path(root) if layout == "flat" else Path(root) / "FashionMNIST" / "raw"
    arrays = FashionMNISTArrays(
        _random_images(rng, n_train, 28, 28),
        balanced_labels(n_train, 10, rng),
        _random_images(rng, n_test, 28, 28),
        balanced_labels(n_test, 10, rng),
    )
    suffix = ".gz" if gzipped else ""
    for key, name in FASHION_MNIST_FILES.items():
        write_idx(folder / f"{name}{suffix}", getattr(arrays, key))
    return arrays
