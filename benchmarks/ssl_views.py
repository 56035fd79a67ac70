"""Images/s of the fast self-supervised view path vs the torchvision path, both building SimCLR views.

Data: ``--num-images`` (default 10,000) random CIFAR-shaped ``uint8`` images ``(N, 3, 32, 32)`` and labels, seeded.

* torchvision path (what ``InMemoryVisionDataModule(fast_loader=False, ssl_views=...)`` runs): a ``DataLoader``
  (``shuffle=True``, ``--batch-size``, ``--num-workers``) over :class:`~lit_methods.datamodules.base.ArrayImageDataset`, whose
  items are PIL images passed through :class:`~lit_methods.datamodules.transforms.MultiView` of
  :func:`~lit_methods.datamodules.transforms.build_ssl_view_transforms` (random resized crop, flip, colour jitter p = 0.8,
  grayscale p = 0.2, normalize), ``--views`` global views plus ``--local-views`` of ``--local-size``.
* fast path (``fast_loader=True``): :class:`~lit_methods.datamodules.fast.InMemoryBatchLoader` batches moved to ``--device`` and
  turned into the same views there by :class:`~lit_methods.datamodules.ssl_views.SSLViewAugment` ([0, 1] pixels), each
  view normalized by :class:`~lit_methods.datamodules.normalization.Normalize` (the datamodule's two steps), with
  ``torch.cuda.synchronize()`` after every batch on CUDA.

Each timed epoch starts from a new iterator (the torchvision figures include its worker startup, as users see it),
after ``--warmup`` untimed batches; the paths alternate epoch by epoch for ``--repeats`` rounds and the medians are
printed. "img/s" counts source images: each yields all its views. ``--threads`` sets the fast path's intra-op threads
(the DataLoader workers run one thread each): on a CPU shared with other busy processes, 2 spinning OpenMP threads can
be many times slower than 1, so compare both there.

Run: ``python benchmarks/ssl_views.py`` (multi-crop: ``--local-views 6 --local-size 16``).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from lit_methods.datamodules.base import ArrayImageDataset
from lit_methods.datamodules.cifar import CIFAR10DataModule
from lit_methods.datamodules.fast import InMemoryBatchLoader, ShardedEpochSampler
from lit_methods.datamodules.normalization import Normalize
from lit_methods.datamodules.ssl_views import SSLViewAugment
from lit_methods.datamodules.transforms import MultiView, build_ssl_view_transforms

MEAN, STD = CIFAR10DataModule.mean, CIFAR10DataModule.std


def source(batch: dict[str, Any]) -> Tensor | list[Tensor]:
    """What a path's step consumes: the torchvision path's views, the fast path's ``uint8`` images."""
    return batch["views"] if "views" in batch else batch["inputs"]


def time_epoch(batches: Iterable[dict[str, Any]], consume: Callable[[Any], list[Tensor]]) -> float:
    """Source images per second over one whole epoch of ``batches``."""
    start = time.perf_counter()
    count = 0
    for batch in batches:
        views = consume(source(batch))
        count += len(views[0])
    return count / (time.perf_counter() - start)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-images", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--num-workers", type=int, default=2, help="workers of the torchvision DataLoader")
    parser.add_argument("--views", type=int, default=2, help="global views per image")
    parser.add_argument("--local-views", type=int, default=0, help="multi-crop local views per image")
    parser.add_argument("--local-size", type=int, default=None, help="side of the local views")
    parser.add_argument("--device", default="cpu", help="device of the fast path (cpu, cuda)")
    parser.add_argument("--repeats", type=int, default=2, help="timed epochs per path (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches before timing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads of the fast path (default: torch's)"
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    generator = torch.Generator().manual_seed(args.seed)
    images = torch.randint(0, 256, (args.num_images, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (args.num_images,), generator=generator)

    local_view = None
    if args.local_views:
        local_view = build_ssl_view_transforms(MEAN, STD, (args.local_size, args.local_size), 0.05, 0.14)
    transform = MultiView(build_ssl_view_transforms(MEAN, STD, (32, 32)), args.views, local_view, args.local_views)
    dataset = ArrayImageDataset(images, labels, transform)
    reference = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.num_workers)

    sampler = ShardedEpochSampler(args.num_images, args.batch_size, shuffle=True, seed=args.seed)
    fast = InMemoryBatchLoader(images, labels, sampler)
    augment = SSLViewAugment(args.views, args.local_views, args.local_size, seed=args.seed)
    normalize = Normalize(MEAN, STD).to(device)

    def fast_step(batch: Tensor) -> list[Tensor]:
        views = [normalize(view) for view in augment(batch.to(device, non_blocking=True))]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return views

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(f"CPU: {cpu_name()} | os.cpu_count(): {os.cpu_count()} | torch threads: {torch.get_num_threads()}")
    print(f"load average at start: {os.getloadavg()} | fast-path device: {device} ({device_name})")
    print(
        f"{args.num_images} images, batch {args.batch_size}, {args.views} global views"
        f"{f' + {args.local_views} local {args.local_size}x{args.local_size}' if args.local_views else ''}, "
        f"torchvision num_workers={args.num_workers}; warmup {args.warmup} batches; median of {args.repeats} epochs\n"
    )
    for loader, step in ((reference, lambda batch: batch), (fast, fast_step)):
        iterator = iter(loader)
        for _ in range(args.warmup):
            step(source(next(iterator)))
        del iterator  # stops the reference's workers, so each timed epoch starts them afresh
    reference_rates, fast_rates = [], []
    for epoch in range(args.repeats):  # interleaved, so both paths see the same background load
        reference_rates.append(time_epoch(reference, lambda batch: batch))
        sampler.set_epoch(epoch)
        fast_rates.append(time_epoch(fast, fast_step))
    reference_rate, fast_rate = statistics.median(reference_rates), statistics.median(fast_rates)
    print(f"{'path':<44} {'img/s':>10} {'min-max':>20}")
    print(
        f"{'torchvision (MultiView over PIL, DataLoader)':<44} {reference_rate:>10,.0f} "
        f"{min(reference_rates):>9,.0f}-{max(reference_rates):<10,.0f}"
    )
    print(
        f"{f'fast (SSLViewAugment on {device})':<44} {fast_rate:>10,.0f} "
        f"{min(fast_rates):>9,.0f}-{max(fast_rates):<10,.0f}"
    )
    print(f"\nspeedup = fast / torchvision: {fast_rate / reference_rate:.1f}x")
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
