"""Fast in-memory data path: uint8 tensors gathered by index, augmented as a batch on the batch's device.

The split lives in one ``uint8`` tensor of shape ``(N, C, H, W)``. :class:`InMemoryBatchLoader` yields
``(images_uint8, labels)`` batches by indexing that tensor with a whole batch of indices at once (no per-sample
Python), and :class:`BatchAugment` applies random crop with zero padding, horizontal flip, cutout and normalization
to the batch after it reached its device (the datamodule calls it from ``on_after_batch_transfer``).

The random parameters are drawn on the CPU from a seeded :class:`torch.Generator` and then applied on the batch's
device, so the same seed gives the same augmented batches on CPU and GPU. The distribution matches the torchvision path built by
:func:`lit_methods.datamodules.transforms.build_train_transforms` (``RandomCrop(padding=p)`` with zero fill, ``RandomHorizontalFlip``,
``Normalize``, then :class:`lit_methods.datamodules.transforms.Cutout`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
import torch
from torch import Tensor

from lit_methods.datamodules.normalization import checked_normalization

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
    """Iterable of ``(images, labels, *extras)`` batches gathered from in-memory tensors by a
    :class:`ShardedEpochSampler`.

    ``images`` is typically ``uint8`` ``(N, C, H, W)``; batches are plain tensor slices (pinned when
    ``pin_memory``), so the per-batch cost is one index gather. ``extras`` are further per-sample tensors (for
    instance subgroup ids) gathered with the same indices. Like a ``DataLoader`` it exposes ``sampler`` (whose
    ``set_epoch`` Lightning calls) and ``batch_sampler`` (None: the sampler already yields whole batches).
    """

    batch_sampler = None

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        sampler: ShardedEpochSampler,
        pin_memory: bool = False,
        extras: tuple[Tensor, ...] = (),
    ) -> None:
        if any(len(t) != len(images) for t in (labels, *extras)):
            raise ValueError(f"{len(images)} images but {[len(t) for t in (labels, *extras)]} labels/extras")
        if sampler.num_samples != len(images):
            raise ValueError(f"sampler covers {sampler.num_samples} samples but {len(images)} were given")
        self.images = images
        self.labels = labels
        self.extras = extras
        self.sampler = sampler
        self.pin_memory = pin_memory

    @property
    def batch_size(self) -> int:
        return self.sampler.batch_size

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        for index in self.sampler:
            batch = tuple(t[index] for t in (self.images, self.labels, *self.extras))
            yield tuple(t.pin_memory() for t in batch) if self.pin_memory else batch


class BatchAugment:
    """Batched CIFAR-style augmentation of ``uint8`` images on their own device.

    Args:
        mean: per-channel mean in [0, 1] units (normalization output is ``(x / 255 - mean) / std``).
        std: per-channel standard deviation in [0, 1] units.
        crop_padding: zero padding of the random crop (0 disables the crop).
        horizontal_flip: flip each image with probability 0.5.
        cutout_size: side of the square zeroed after normalization (DeVries & Taylor 2017,
            arXiv:1708.04552); its centre is uniform over the image and the square is clipped at the border.
        seed: seed of the CPU generator that draws all random parameters.
    """

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        crop_padding: int = 4,
        horizontal_flip: bool = True,
        cutout_size: int = 0,
        seed: int = 0,
    ) -> None:
        self.mean, self.std = checked_normalization(mean, std)
        if crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0, got {crop_padding}")
        if cutout_size < 0:
            raise ValueError(f"cutout_size must be >= 0, got {cutout_size}")
        self.crop_padding = crop_padding
        self.horizontal_flip = horizontal_flip
        self.cutout_size = cutout_size
        self.generator = torch.Generator().manual_seed(seed)
        self._affine_cache: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def normalize(self, images: Tensor) -> Tensor:
        """``uint8`` (or [0, 255] float) images to normalized ``float32``, in a new tensor."""
        if images.shape[1] != len(self.mean):
            raise ValueError(f"images have {images.shape[1]} channels but mean/std have {len(self.mean)}")
        shift, scale = self._affine(images.device)
        return images.to(torch.float32, copy=True).sub_(shift).div_(scale)

    def _affine(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """``255 * mean`` and ``255 * std`` as ``(1, C, 1, 1)`` tensors on ``device``, built once per device."""
        if device not in self._affine_cache:
            shape = (1, -1, 1, 1)
            shift = torch.tensor(self.mean, device=device).mul_(255.0).view(shape)
            scale = torch.tensor(self.std, device=device).mul_(255.0).view(shape)
            self._affine_cache[device] = (shift, scale)
        return self._affine_cache[device]

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
        """Augment and normalize a ``(N, C, H, W)`` batch; returns a new ``float32`` tensor on the same device."""
        n, _, h, w = images.shape
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
        out = self.normalize(images)
        if self.cutout_size:
            cy, cx = params["cy"].to(device, non_blocking=True), params["cx"].to(device, non_blocking=True)
            out = cutout(out, cy, cx, self.cutout_size)
        return out


def random_crop(images: Tensor, dy: Tensor, dx: Tensor, padding: int) -> Tensor:
    """Crop each image of the zero-padded batch at its own offset ``(dy[i], dx[i])`` in ``[0, 2 * padding]``.

    One gather from a strided view holding every crop (no index tensor of the output's size; several times faster
    than indexing batch, channel, row and column per element, with bit-identical values); keeps the memory format.
    """
    n, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
    windows = padded.unfold(2, h, 1).unfold(3, w, 1)  # (n, c, 2p + 1, 2p + 1, h, w), a view
    return windows[torch.arange(n, device=images.device), :, dy, dx]


def cutout(images: Tensor, cy: Tensor, cx: Tensor, size: int) -> Tensor:
    """Zero the square ``[cy - size // 2, cy + size - size // 2)`` x (same in x), clipped to the image."""
    n, _, h, w = images.shape
    half = size // 2
    ys = torch.arange(h, device=images.device).view(1, h)
    xs = torch.arange(w, device=images.device).view(1, w)
    in_rows = (ys >= (cy.view(n, 1) - half)) & (ys < (cy.view(n, 1) - half + size))
    in_cols = (xs >= (cx.view(n, 1) - half)) & (xs < (cx.view(n, 1) - half + size))
    mask = in_rows.view(n, 1, h, 1) & in_cols.view(n, 1, 1, w)
    return images.masked_fill(mask, 0.0)
