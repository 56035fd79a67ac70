"""Fast in-memory data path: uint8 tensors gathered by index, augmented as a batch on the batch's device.

The split lives in one ``uint8`` tensor of shape ``(N, C, H, W)``. :class:`InMemoryBatchLoader` yields
``{"inputs": images_uint8, "targets": labels, **extras}`` batches (:mod:`lit_methods.datamodules.batch`) by indexing
that tensor with a whole batch of indices at once (no per-sample Python), and :class:`BatchAugment` applies random
crop with zero padding, horizontal flip and cutout to the batch after it reached its device (the datamodule calls it
from ``on_after_batch_transfer`` and normalizes its output as a separate step,
:class:`~lit_methods.datamodules.normalization.Normalize`, unless the model owns normalization).

The random parameters are drawn on the CPU from a seeded :class:`torch.Generator` and then applied on the batch's
device, so the same seed gives the same augmented batches on CPU and GPU. The distribution matches the torchvision path built by
:func:`lit_methods.datamodules.transforms.build_train_transforms` (``RandomCrop(padding=p)`` with zero fill, ``RandomHorizontalFlip``,
then :class:`lit_methods.datamodules.transforms.Cutout` filled with the mean pixel).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor

from lit_methods.datamodules.batch import EXTRA_FIELDS, INPUTS, TARGETS

__all__ = ["BatchAugment", "InMemoryBatchLoader", "ShardedEpochSampler"]


class ShardedEpochSampler:
    """Per-epoch index batches for one rank: a seeded permutation, split across ranks without repeats.

    Lightning calls :meth:`set_epoch` before every epoch (it looks for ``loader.sampler.set_epoch``), so the
    permutation depends only on ``(seed, epoch)`` and a resumed run sees the same order as an uninterrupted one.

    Training (``shuffle=True``): the permutation is cut to a multiple of ``world_size`` so every rank gets the same
    number of samples (DDP needs equal step counts); the at most ``world_size - 1`` samples left out change every
    epoch. With ``drop_last=True`` the last incomplete batch of each rank is dropped too. Evaluation
    (``shuffle=False``): rank ``r`` takes indices ``r, r + world_size, ...``; every sample is seen exactly once and the
    last batches may differ in size between ranks.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"invalid rank {rank} for world_size {world_size}")
        if shuffle and num_samples < world_size:
            raise ValueError(f"{num_samples} samples cannot be shared by {world_size} ranks")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _shard_size(self) -> int:
        if self.shuffle:
            return self.num_samples // self.world_size
        return len(range(self.rank, self.num_samples, self.world_size))

    def __len__(self) -> int:
        size = self._shard_size()
        return size // self.batch_size if self.drop_last else math.ceil(size / self.batch_size)

    def rank_indices(self) -> Tensor:
        """The indices this rank visits in the current epoch, in order."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_samples, generator=generator)
            usable = (self.num_samples // self.world_size) * self.world_size
            return order[:usable][self.rank :: self.world_size]
        return torch.arange(self.rank, self.num_samples, self.world_size)

    def __iter__(self) -> Iterator[Tensor]:
        indices = self.rank_indices()
        stop = len(self) * self.batch_size
        yield from indices[:stop].split(self.batch_size)


class InMemoryBatchLoader:
    """Iterable of ``{"inputs": images, "targets": labels, **extras}`` batches gathered from in-memory tensors by a
    :class:`ShardedEpochSampler`.

    ``images`` is typically ``uint8`` ``(N, C, H, W)``; batch fields are plain tensor slices (pinned when
    ``pin_memory``), so the per-batch cost is one index gather per field. ``extras`` are further per-sample tensors
    by field name (for instance ``{"subgroup": ids}``, see :data:`~lit_methods.datamodules.batch.EXTRA_FIELDS`)
    gathered with the same indices. Like a ``DataLoader`` it exposes ``sampler`` (whose ``set_epoch`` Lightning
    calls) and ``batch_sampler`` (None: the sampler already yields whole batches).
    """

    batch_sampler = None

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        sampler: ShardedEpochSampler,
        pin_memory: bool = False,
        extras: Mapping[str, Tensor] | None = None,
    ) -> None:
        if len(labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels
        self.extras = check_extras(extras or {}, len(images))
        if sampler.num_samples != len(images):
            raise ValueError(f"sampler covers {sampler.num_samples} samples but {len(images)} were given")
        self.sampler = sampler
        self.pin_memory = pin_memory

    @property
    def batch_size(self) -> int:
        return self.sampler.batch_size

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        for index in self.sampler:
            batch = {INPUTS: self.images[index], TARGETS: self.labels[index]}
            batch |= {name: t[index] for name, t in self.extras.items()}
            yield {name: t.pin_memory() for name, t in batch.items()} if self.pin_memory else batch


def check_extras(extras: Mapping[str, Tensor], num_samples: int) -> dict[str, Tensor]:
    """``extras`` as a dict after checking that every name is a known extra field
    (:data:`~lit_methods.datamodules.batch.EXTRA_FIELDS`) and every tensor has ``num_samples`` rows."""
    unknown = sorted(set(extras) - set(EXTRA_FIELDS))
    if unknown:
        raise ValueError(f"unknown extra batch fields {unknown}: the extras are {', '.join(EXTRA_FIELDS)}")
    lengths = {name: len(t) for name, t in extras.items() if len(t) != num_samples}
    if lengths:
        raise ValueError(f"{num_samples} images but the extras have {lengths} rows")
    return dict(extras)


class BatchAugment:
    """Batched CIFAR-style augmentation of ``uint8`` images on their own device: random crop with zero padding,
    horizontal flip, Cutout. It returns pixels, not normalized images: ``uint8`` without Cutout, ``float32`` in
    [0, 1] with it; normalization is the datamodule's separate step.

    The default augment of :class:`~lit_methods.datamodules.base.InMemoryVisionDataModule`; every random parameter is
    drawn from :attr:`generator`, a CPU ``torch.Generator`` (the datamodule re-seeds it every epoch).

    Args:
        crop_padding: zero padding of the random crop (0 disables the crop).
        horizontal_flip: flip each image with probability 0.5.
        cutout_size: side of the Cutout square (DeVries & Taylor 2017, arXiv:1708.04552); its centre is uniform over
            the image and the square is clipped at the border. 0 disables it.
        cutout_fill: per-channel value of the Cutout square in [0, 1] pixel units, required with ``cutout_size``. The
            paper zeroes the normalized image, i.e. fills with the dataset's mean pixel: pass the data's ``mean``
            (the datamodule does) to get exactly 0 after normalization.
        seed: seed of the CPU generator that draws all random parameters.
    """

    def __init__(
        self,
        crop_padding: int = 4,
        horizontal_flip: bool = True,
        cutout_size: int = 0,
        cutout_fill: Sequence[float] | None = None,
        seed: int = 0,
    ) -> None:
        if crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0, got {crop_padding}")
        if cutout_size < 0:
            raise ValueError(f"cutout_size must be >= 0, got {cutout_size}")
        if cutout_size and cutout_fill is None:
            raise ValueError(
                f"cutout_size={cutout_size} needs cutout_fill, the per-channel fill in [0, 1] pixels (the paper's "
                "Cutout fills with the dataset mean: pass the data's mean)"
            )
        if cutout_fill is not None and not all(0.0 <= value <= 1.0 for value in cutout_fill):
            raise ValueError(f"cutout_fill must lie in [0, 1] pixel units, got {tuple(cutout_fill)}")
        self.crop_padding = crop_padding
        self.horizontal_flip = horizontal_flip
        self.cutout_size = cutout_size
        self.cutout_fill = None if cutout_fill is None else tuple(float(value) for value in cutout_fill)
        self.generator = torch.Generator().manual_seed(seed)

    def draw(self, batch_size: int, height: int, width: int) -> dict[str, Tensor]:
        """Random parameters for one batch, drawn on the CPU generator (same order on every device)."""
        g = self.generator
        p = self.crop_padding
        params = {
            "dy": torch.randint(0, 2 * p + 1, (batch_size,), generator=g),
            "dx": torch.randint(0, 2 * p + 1, (batch_size,), generator=g),
            "flip": torch.rand(batch_size, generator=g) < 0.5,
            "cy": torch.randint(0, height, (batch_size,), generator=g),
            "cx": torch.randint(0, width, (batch_size,), generator=g),
        }
        return params

    def __call__(self, images: Tensor) -> Tensor:
        """Augment a ``uint8`` ``(N, C, H, W)`` batch; returns a new tensor on the same device (``uint8``, or
        ``float32`` in [0, 1] with Cutout)."""
        if images.dtype != torch.uint8:
            raise ValueError(f"BatchAugment takes uint8 images, got {images.dtype}")
        n, channels, h, w = images.shape
        if self.cutout_fill is not None and len(self.cutout_fill) not in (1, channels):
            raise ValueError(f"images have {channels} channels but cutout_fill has {len(self.cutout_fill)} values")
        params = self.draw(n, h, w)
        device = images.device
        if self.crop_padding:
            dy, dx = params["dy"].to(device, non_blocking=True), params["dx"].to(device, non_blocking=True)
            images = random_crop(images, dy, dx, self.crop_padding)
        if self.horizontal_flip:
            if not self.crop_padding:
                images = images.clone()  # the flip below writes in place, never into the caller's batch
            # the mask is indexed on the CPU, so a GPU batch needs no device-to-host sync
            flipped = params["flip"].nonzero().squeeze(1).to(device, non_blocking=True)
            images[flipped] = images[flipped].flip(3)
        if not self.cutout_size:
            return images if self.crop_padding or self.horizontal_flip else images.clone()
        cy, cx = params["cy"].to(device, non_blocking=True), params["cx"].to(device, non_blocking=True)
        return cutout(images.to(torch.float32).div_(255.0), cy, cx, self.cutout_size, self.cutout_fill)


def random_crop(images: Tensor, dy: Tensor, dx: Tensor, padding: int) -> Tensor:
    """Crop each image of the zero-padded batch at its own offset ``(dy[i], dx[i])`` in ``[0, 2 * padding]``.

    One gather from a strided view holding every crop (no index tensor of the output's size; several times faster
    than indexing batch, channel, row and column per element, with bit-identical values); keeps the memory format.
    """
    n, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
    windows = padded.unfold(2, h, 1).unfold(3, w, 1)  # (n, c, 2p + 1, 2p + 1, h, w), a view
    return windows[torch.arange(n, device=images.device), :, dy, dx]


def cutout(images: Tensor, cy: Tensor, cx: Tensor, size: int, fill: Sequence[float] = (0.0,)) -> Tensor:
    """Fill the square ``[cy - size // 2, cy + size - size // 2)`` x (same in x), clipped to the image, with the
    per-channel values ``fill`` (one value: every channel)."""
    n, _, h, w = images.shape
    half = size // 2
    ys = torch.arange(h, device=images.device).view(1, h)
    xs = torch.arange(w, device=images.device).view(1, w)
    in_rows = (ys >= (cy.view(n, 1) - half)) & (ys < (cy.view(n, 1) - half + size))
    in_cols = (xs >= (cx.view(n, 1) - half)) & (xs < (cx.view(n, 1) - half + size))
    mask = in_rows.view(n, 1, h, 1) & in_cols.view(n, 1, 1, w)
    values = torch.tensor(fill, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return torch.where(mask, values, images)
