"""Writers of tiny datasets in the real on-disk layouts of ImageNet, Tiny-ImageNet-200 and Imagenet{16,32,64}x{..}.

Every image gets its own constant colour (:func:`code_colour`), so that a test can tell which written image (and so
which class) came back, even after JPEG compression, resizing or cropping: :func:`colour_code` inverts it. The
Tiny-ImageNet writer also returns the pixels as PIL decodes the written files, for exact comparisons.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

# tench, goldfish, great white shark, tiger shark, hammerhead: the first five ILSVRC-2012 classes.
REAL_WNIDS = ("n01440764", "n01443537", "n01484850", "n01491361", "n01494475")


def synthetic_wnids(count: int, seed: int = 0) -> list[str]:
    """``count`` distinct wnid-shaped names (``n`` + 8 digits) in a shuffled, unsorted order."""
    numbers = random.Random(seed).sample(range(1_000_000, 16_000_000), count)
    return [f"n{number:08d}" for number in numbers]


def code_colour(code: int) -> tuple[int, int, int]:
    """A colour per code in [0, 4096), 16 levels apart in every channel (robust to JPEG and resizing)."""
    return 16 * (code % 16) + 8, 16 * (code // 16 % 16) + 8, 16 * (code // 256 % 16) + 8


def colour_code(pixels: np.ndarray) -> int:
    """Inverse of :func:`code_colour` from an ``(H, W, 3)`` or ``(3, H, W)`` uint8 array of one colour."""
    rgb = pixels.reshape(-1, 3).mean(0) if pixels.shape[-1] == 3 else pixels.reshape(3, -1).mean(1)
    r, g, b = (int(round((float(c) - 8) / 16)) for c in rgb)
    return r + 16 * g + 256 * b


def write_jpeg(
    path: Path, colour: tuple[int, int, int], size: tuple[int, int], noise: bool = False, grayscale: bool = False
) -> None:
    """A ``size`` = (width, height) JPEG of one colour, with uniform noise on top when ``noise``."""
    width, height = size
    pixels = np.empty((height, width, 3), dtype=np.int16)
    pixels[:] = colour
    if noise:
        pixels += np.random.default_rng(zlib.crc32(path.name.encode())).integers(-20, 21, pixels.shape, dtype=np.int16)
    image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    path.parent.mkdir(parents=True, exist_ok=True)
    (image.convert("L") if grayscale else image).save(path, format="JPEG", quality=95)


@dataclass
class WrittenImageNet:
    """What :func:`write_imagenet` wrote: the wnid of each colour code, and the files of each split."""

    wnids: list[str]
    code_wnid: dict[int, str] = field(default_factory=dict)
    files: dict[str, list[Path]] = field(default_factory=dict)


def write_imagenet(
    root: Path,
    wnids: list[str],
    train_per_class: int,
    val_per_class: int,
    size: tuple[int, int] = (12, 10),
    noise: bool = False,
) -> WrittenImageNet:
    """ILSVRC-2012 after the usual preparation: ``train/<wnid>/<wnid>_<k>.JPEG`` and ``val/<wnid>/ILSVRC2012_val_*``.

    Image ``i`` (counted over both splits) has colour ``code_colour(i)``.
    """
    written = WrittenImageNet(list(wnids), files={"train": [], "val": []})
    code = 0
    val_number = 1
    for wnid in wnids:
        for k in range(train_per_class):
            path = root / "train" / wnid / f"{wnid}_{1000 + k}.JPEG"
            write_jpeg(path, code_colour(code), size, noise)
            written.code_wnid[code] = wnid
            written.files["train"].append(path)
            code += 1
        for _ in range(val_per_class):
            path = root / "val" / wnid / f"ILSVRC2012_val_{val_number:08d}.JPEG"
            write_jpeg(path, code_colour(code), size, noise)
            written.code_wnid[code] = wnid
            written.files["val"].append(path)
            code += 1
            val_number += 1
    return written


def write_class_list(path: Path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@dataclass
class WrittenTinyImageNet:
    """What :func:`write_tiny_imagenet` wrote; images are ``uint8`` ``(N, 3, 64, 64)`` as PIL decodes the files."""

    root: Path
    wnids: list[str]
    train_images: np.ndarray
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray
    train_files: list[Path]
    val_files: list[Path]


def _decoded(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).transpose(2, 0, 1)


def write_tiny_imagenet(
    data_dir: Path, train_per_class: int = 2, val_images: int = 20, grayscale_train_index: int = 3
) -> WrittenTinyImageNet:
    """Tiny-ImageNet-200 as ``tiny-imagenet-200.zip`` extracts, with fewer images per class.

    ``wnids.txt`` in a shuffled (unsorted) order, ``train/<wnid>/images/<wnid>_<k>.JPEG`` next to the
    ``train/<wnid>/<wnid>_boxes.txt`` files, ``val/images/val_<k>.JPEG`` with ``val/val_annotations.txt`` written in a
    shuffled order, ``test/images`` (unlabelled) and ``words.txt``. Expected arrays follow the wnids.txt class order
    (file-name order inside a class) for train and the annotation-file order for val. One training image is saved as
    grayscale, as a few real ones are.
    """
    root = data_dir / "tiny-imagenet-200"
    wnids = synthetic_wnids(200, seed=1)
    root.mkdir(parents=True, exist_ok=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (root / "words.txt").write_text("".join(f"{w}\tthing {i}\n" for i, w in enumerate(sorted(wnids))))
    code = 0
    train_files, train_labels = [], []
    for label, wnid in enumerate(wnids):
        boxes = []
        for k in range(train_per_class):
            path = root / "train" / wnid / "images" / f"{wnid}_{k}.JPEG"
            write_jpeg(path, code_colour(code), (64, 64), grayscale=code == grayscale_train_index)
            train_files.append(path)
            train_labels.append(label)
            boxes.append(f"{path.name}\t1\t2\t60\t61\n")
            code += 1
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("".join(boxes))
    rng = random.Random(2)
    val_wnid = [rng.choice(wnids) for _ in range(val_images)]
    for k in range(val_images):
        write_jpeg(root / "val" / "images" / f"val_{k}.JPEG", code_colour(code), (64, 64))
        code += 1
    order = list(range(val_images))
    rng.shuffle(order)
    (root / "val" / "val_annotations.txt").write_text(
        "".join(f"val_{k}.JPEG\t{val_wnid[k]}\t0\t4\t50\t63\n" for k in order)
    )
    for k in range(3):
        write_jpeg(root / "test" / "images" / f"test_{k}.JPEG", code_colour(4000 + k), (64, 64))
    val_files = [root / "val" / "images" / f"val_{k}.JPEG" for k in order]
    return WrittenTinyImageNet(
        root=root,
        wnids=wnids,
        train_images=np.stack([_decoded(p) for p in train_files]),
        train_labels=np.array(train_labels),
        val_images=np.stack([_decoded(p) for p in val_files]),
        val_labels=np.array([wnids.index(val_wnid[k]) for k in order]),
        train_files=train_files,
        val_files=val_files,
    )


@dataclass
class WrittenDownsampled:
    """What :func:`write_downsampled_imagenet` wrote: ``uint8`` ``(N, 3, r, r)`` images and 0-based labels."""

    train_images: np.ndarray
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray
    train_files: list[Path]
    val_file: Path


def write_downsampled_imagenet(
    data_dir: Path,
    resolution: int = 32,
    rows_per_batch: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10),
    val_rows: int = 7,
    seed: int = 0,
) -> WrittenDownsampled:
    """``Imagenet{r}_train_npz/train_data_batch_{1..10}.npz`` and ``Imagenet{r}_val_npz/val_data.npz``.

    Each npz holds ``data`` (``uint8`` ``(N, 3 r^2)``: the R, G and B planes, row-major), 1-based ``labels`` and,
    in the training batches, the per-pixel ``mean`` of the training set, as the published files do. Batch ``b`` has
    ``rows_per_batch[b - 1]`` rows, so a wrong batch order shows in the concatenation.
    """
    rng = np.random.default_rng(seed)
    r = resolution
    batches = [rng.integers(0, 256, (n, 3, r, r), dtype=np.uint8) for n in rows_per_batch]
    labels = [rng.integers(0, 1000, n) for n in rows_per_batch]
    train_images = np.concatenate(batches)
    mean = train_images.reshape(len(train_images), -1).mean(0)
    folder = data_dir / f"Imagenet{r}_train_npz"
    folder.mkdir(parents=True, exist_ok=True)
    train_files = []
    for b, (images, batch_labels) in enumerate(zip(batches, labels), start=1):
        path = folder / f"train_data_batch_{b}.npz"
        np.savez(path, data=images.reshape(len(images), -1), labels=(batch_labels + 1).tolist(), mean=mean)
        train_files.append(path)
    val_images = rng.integers(0, 256, (val_rows, 3, r, r), dtype=np.uint8)
    val_labels = rng.integers(0, 1000, val_rows)
    val_file = data_dir / f"Imagenet{r}_val_npz" / "val_data.npz"
    val_file.parent.mkdir(parents=True, exist_ok=True)
    np.savez(val_file, data=val_images.reshape(val_rows, -1), labels=(val_labels + 1).tolist())
    return WrittenDownsampled(
        train_images=train_images,
        train_labels=np.concatenate(labels),
        val_images=val_images,
        val_labels=val_labels,
        train_files=train_files,
        val_file=val_file,
    )
