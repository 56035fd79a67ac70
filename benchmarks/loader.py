"""Augmented images/s of the fast in-memory path vs the reference torchvision pipeline.

Data: ``--num-images`` (default 50,000) random CIFAR-shaped ``uint8`` images ``(N, 3, 32, 32)`` and labels, seeded.

* reference: a ``torch.utils.data.DataLoader`` (``shuffle=True``, ``--batch-size``, ``--num-workers``) over a Dataset
  that, like ``torchvision.datasets.CIFAR10``, turns each HWC ``uint8`` sample into a PIL image and applies
  torchvision transforms: ``--transforms v1`` (default) is ``transforms.RandomCrop(32, padding=4)``,
  ``RandomHorizontalFlip``, ``ToTensor``, ``Normalize``; ``v2`` is the project's own slow path,
  :func:`lit_methods.datamodules.transforms.build_train_transforms` (``transforms.v2``).
* fast: :class:`~lit_methods.datamodules.fast.InMemoryBatchLoader` over a :class:`~lit_methods.datamodules.fast.ShardedEpochSampler`, each
  batch moved to ``--device``, augmented there by :class:`~lit_methods.datamodules.fast.BatchAugment` (crop padding 4,
  horizontal flip; ``uint8`` pixels out) and normalized by
  :class:`~lit_methods.datamodules.normalization.Normalize` (the datamodule's two steps), with
  ``torch.cuda.synchronize()`` after every batch on CUDA.

Both paths first run ``--warmup`` untimed batches from a throw-away iterator. Each timed epoch then starts from a new
iterator, so the reference's "epoch" figures count its worker startup (as users experience it); its "steady" figures
leave out the first ``--warmup`` batches of the epoch, and with them the worker startup (meaningful only when an epoch
has many more batches than the workers prefetch). The paths alternate epoch by epoch for ``--repeats`` rounds;
figures are medians. Goal: fast / reference >= 10x on whole epochs.

Run: ``python benchmarks/loader.py`` (``--num-images 5000 --repeats 1`` for a quick check).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from lit_methods.datamodules.batch import as_batch
from lit_methods.datamodules.cifar import CIFAR10DataModule
from lit_methods.datamodules.fast import BatchAugment, InMemoryBatchLoader, ShardedEpochSampler
from lit_methods.datamodules.normalization import Normalize
from lit_methods.datamodules.transforms import build_train_transforms

MEAN, STD = CIFAR10DataModule.mean, CIFAR10DataModule.std
GOAL = 10.0


class PILDataset(Dataset):
    """Per-sample path of ``torchvision.datasets.CIFAR10``: HWC ``uint8`` array -> PIL image -> transform."""

    def __init__(self, data: np.ndarray, targets: list[int], transform: Callable) -> None:
        self.data = data
        self.targets = targets
        self.transform = transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.transform(Image.fromarray(self.data[index])), self.targets[index]


@dataclass
class Epoch:
    images: int
    seconds: float  # whole epoch, from creating the iterator to the last batch
    first_batch: float  # from creating the iterator to the first batch (worker startup for the reference)
    steady_seconds: float  # after the first `skip` batches
    steady_images: int


def time_epoch(batches: Iterable[Any], consume: Callable[[Tensor], object], skip: int) -> Epoch:
    start = time.perf_counter()
    stamps, sizes = [], []
    for batch in batches:
        images = as_batch(batch)["inputs"]
        consume(images)
        stamps.append(time.perf_counter())
        sizes.append(len(images))
    skip = min(skip, len(stamps) - 1)
    steady_from = stamps[skip - 1] if skip else start
    return Epoch(sum(sizes), stamps[-1] - start, stamps[0] - start, stamps[-1] - steady_from, sum(sizes[skip:]))


def report(name: str, epochs: list[Epoch]) -> tuple[float, float]:
    """Print one row of medians; returns (epoch img/s, steady img/s)."""
    rates = [e.images / e.seconds for e in epochs]
    steady = statistics.median(e.steady_images / e.steady_seconds for e in epochs)
    rate, first = statistics.median(rates), statistics.median(e.first_batch for e in epochs)
    spread = f"{min(rates):,.0f}-{max(rates):,.0f}"
    seconds = statistics.median(e.seconds for e in epochs)
    print(f"{name:<34} {seconds:>8.3f} {rate:>10,.0f} {spread:>18} {first:>12.3f} {steady:>13,.0f}")
    return rate, steady


def warm_up(batches: Iterable[Any], consume: Callable[[Tensor], object], count: int) -> None:
    iterator = iter(batches)
    for _ in range(count):
        consume(as_batch(next(iterator))["inputs"])
    del iterator  # shuts the reference's workers down, so the timed epoch starts them afresh


def reference_transform(version: str) -> Callable:
    if version == "v1":
        return T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])
    return build_train_transforms(MEAN, STD, (32, 32))


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-images", type=int, default=50_000)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--num-workers", type=int, default=2, help="workers of the reference DataLoader")
    parser.add_argument("--transforms", choices=("v1", "v2"), default="v1", help="torchvision API of the reference")
    parser.add_argument("--device", default="cpu", help="device of the fast path's augmentation (cpu, cuda)")
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs per path (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches before timing; also the steady skip")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    device = torch.device(args.device)

    generator = torch.Generator().manual_seed(args.seed)
    images = torch.randint(0, 256, (args.num_images, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (args.num_images,), generator=generator)

    hwc = images.permute(0, 2, 3, 1).contiguous().numpy()
    dataset = PILDataset(hwc, labels.tolist(), reference_transform(args.transforms))
    reference = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.num_workers)

    sampler = ShardedEpochSampler(args.num_images, args.batch_size, shuffle=True, seed=args.seed)
    fast = InMemoryBatchLoader(images, labels, sampler)
    augment = BatchAugment(crop_padding=4, horizontal_flip=True, seed=args.seed)
    normalize = Normalize(MEAN, STD).to(device)

    def fast_step(batch: Tensor) -> Tensor:
        out = normalize(augment(batch.to(device, non_blocking=True)))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(f"platform.processor(): {platform.processor() or '-'} | CPU: {cpu_name()}")
    print(
        f"os.cpu_count(): {os.cpu_count()} | torch.get_num_threads(): {torch.get_num_threads()} | "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    print(f"fast-path device: {device} ({device_name}) | torch {torch.__version__}")
    print(
        f"{args.num_images} images, batch {args.batch_size}, reference: torchvision transforms {args.transforms}, "
        f"num_workers={args.num_workers}; warmup {args.warmup} batches; median of {args.repeats} epochs\n"
    )

    warm_up(reference, lambda batch: batch, args.warmup)
    warm_up(fast, fast_step, args.warmup)
    ref_epochs, fast_epochs = [], []
    for epoch in range(args.repeats):  # interleaved, so both paths see the same background load
        ref_epochs.append(time_epoch(reference, lambda batch: batch, args.warmup))
        sampler.set_epoch(epoch)
        fast_epochs.append(time_epoch(fast, fast_step, args.warmup))

    header = f"{'path':<34} {'epoch s':>8} {'img/s':>10} {'img/s min-max':>18} {'1st batch s':>12} {'steady img/s':>13}"
    print(header)
    print("-" * len(header))
    ref_rate, ref_steady = report(f"reference (torchvision {args.transforms}, PIL)", ref_epochs)
    fast_rate, fast_steady = report(f"fast ({device})", fast_epochs)
    speedup = fast_rate / ref_rate
    print(
        f"\nspeedup = fast / reference: {speedup:.1f}x per epoch (steady state {fast_steady / ref_steady:.1f}x); "
        f"goal >= {GOAL:.0f}x: {'met' if speedup >= GOAL else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
