"""Shared datamodule bases, in the spirit of lightning-bolts' ``VisionDataModule``.

:class:`VisionDataModule` owns what every image dataset needs (data_dir, batch sizes, workers, a seeded validation
split carved from the training split, separate validation transforms, the attributes that the CLI links into models).
:class:`InMemoryVisionDataModule` adds the fast path for datasets that fit in memory: the split is one ``uint8``
tensor and batches are augmented on their device in :meth:`~InMemoryVisionDataModule.on_after_batch_transfer`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler

from lit_methods.datamodules.batch import INPUTS, TARGETS, VIEWS
from lit_methods.datamodules.fast import BatchAugment, InMemoryBatchLoader, ShardedEpochSampler, check_extras
from lit_methods.datamodules.normalization import Normalize, unit_pixels
from lit_methods.datamodules.ssl_views import (
    SSLViewAugment,
    validate_color_jitter,
    validate_scale,
    validate_view_counts,
)
from lit_methods.datamodules.subsets import long_tailed_indices, per_class_subset_indices
from lit_methods.datamodules.transforms import (
    MultiView,
    build_eval_transforms,
    build_ssl_view_transforms,
    build_train_transforms,
    randaugment,
)

__all__ = ["ArrayImageDataset", "InMemoryVisionDataModule", "VisionDataModule", "WrappingDataModule", "split_indices"]


def split_indices(num_samples: int, val_split: int | float, seed: int) -> tuple[Tensor, Tensor]:
    """Seeded split of ``range(num_samples)`` into (train, val); ``val_split`` is a count or a fraction."""
    val_size = val_split if isinstance(val_split, int) else round(num_samples * val_split)
    if val_split and val_size == 0:
        raise ValueError(f"val_split={val_split!r} gives an empty validation split of {num_samples} samples")
    if val_size >= num_samples:
        raise ValueError(f"val_split={val_split!r} leaves no training samples out of {num_samples}")
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))
    return order[val_size:].sort().values, order[:val_size].sort().values


class VisionDataModule(L.LightningDataModule):
    """Base for image classification datamodules.

    Subclasses set the class attributes (or instance attributes where they depend on arguments) that the CLI links
    into models: ``num_classes``, ``in_channels``, ``image_size`` (H, W), the normalization ``mean``/``std``, and
    ``inputs_normalized`` (whether batches arrive normalized, or as [0, 1] pixels for a model that normalizes them
    itself).

    Args:
        data_dir: where the dataset lives (or is downloaded to).
        val_split: size of the validation split carved from the training split with ``seed``: an int count or a
            fraction in [0, 1). With 0, validation runs on the test split, as the CIFAR papers report it.
        batch_size: training batch size per process.
        eval_batch_size: validation/test batch size per process (defaults to ``batch_size``).
        num_workers: DataLoader workers of the torchvision path.
        seed: seed of the validation split, of the shuffling and of the augmentation.
        download: download the dataset in ``prepare_data`` if it is missing.
        pin_memory: pin batches for faster host-to-GPU copies.
        drop_last: drop the last incomplete training batch.
        train_transforms: per-sample transform of training images (torchvision path); defaults per dataset.
        val_transforms: per-sample transform of validation/test images; defaults per dataset.
        normalize: normalize the images with ``mean``/``std`` (the default transforms' last step); ``False`` yields
            ``float32`` pixels in [0, 1] for models that own their normalization (pixel-space methods such as
            attacks). Exposed as ``inputs_normalized``.
    """

    name: ClassVar[str] = ""
    num_classes: int
    in_channels: int
    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __init__(
        self,
        data_dir: str | Path = "data",
        val_split: int | float = 0,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        seed: int = 42,
        download: bool = False,
        pin_memory: bool = False,
        drop_last: bool = False,
        train_transforms: Callable | None = None,
        val_transforms: Callable | None = None,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(val_split, bool) or not isinstance(val_split, (int, float)):
            raise TypeError(f"val_split must be an int count or a float fraction, got {val_split!r}")
        if isinstance(val_split, int) and val_split < 0:
            raise ValueError(f"val_split must be >= 0, got {val_split}")
        if isinstance(val_split, float) and not 0.0 <= val_split < 1.0:
            raise ValueError(f"val_split as a fraction must lie in [0, 1), got {val_split}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if eval_batch_size is not None and eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be >= 1, got {eval_batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.data_dir = Path(data_dir).expanduser()
        self.val_split = val_split
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.download = download
        self.pin_memory = pin_memory
        self.drop_last = drop_last
        self.train_transforms = train_transforms
        self.val_transforms = val_transforms
        self.inputs_normalized = normalize

    # -- helpers for subclasses -------------------------------------------------------------------------------
    def rank_and_world_size(self) -> tuple[int, int]:
        """This process' rank and the world size, from the trainer when attached, else torch.distributed."""
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def default_train_transforms(self) -> Callable:
        return build_eval_transforms(self.mean, self.std, self.inputs_normalized)

    def default_val_transforms(self) -> Callable:
        return build_eval_transforms(self.mean, self.std, self.inputs_normalized)

    def resolved_train_transforms(self) -> Callable:
        return self.train_transforms if self.train_transforms is not None else self.default_train_transforms()

    def resolved_val_transforms(self) -> Callable:
        return self.val_transforms if self.val_transforms is not None else self.default_val_transforms()

    def make_dataloader(self, dataset: Dataset, train: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            drop_last=self.drop_last if train else False,
            persistent_workers=self.num_workers > 0,
            sampler=EpochSeededRandomSampler(dataset, seed=self.seed) if train else None,
            # the loader draws its workers' base seed from this generator, not from the global RNG
            generator=torch.Generator().manual_seed(self.seed) if train else None,
        )


class EpochSeededRandomSampler(RandomSampler):
    """A random order that depends only on ``(seed, epoch)``: Lightning calls :meth:`set_epoch` before every epoch,
    so a run resumed at an epoch boundary draws the same order as an uninterrupted one. (Under DDP Lightning replaces
    it, like any ``RandomSampler``, by a ``DistributedSampler``, which is seeded by the epoch too.) The per-image
    transforms still draw from the global RNG (``num_workers=0``) or from worker seeds, which a checkpoint does not
    hold: seed the global RNG per epoch for a resumed run to draw the same transforms."""

    def __init__(self, data_source: Dataset, seed: int) -> None:
        super().__init__(data_source, generator=torch.Generator())
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(self.seed + epoch)


class ArrayImageDataset(Dataset):
    """Per-sample view of a ``uint8`` ``(N, C, H, W)`` tensor as PIL images, for the torchvision path.

    Items are dicts ``{"inputs": image, "targets": label, **extras}`` (``default_collate`` turns them into dict
    batches); a transform returning a list of views (:class:`~lit_methods.datamodules.transforms.MultiView`) gives
    ``{"views": [...], "targets": label, ...}``. ``extras`` are further per-sample tensors by field name, such as
    ``{"subgroup": ids}``.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        transform: Callable | None = None,
        extras: Mapping[str, Tensor] | None = None,
    ) -> None:
        if len(labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels
        self.transform = transform
        self.extras = check_extras(extras or {}, len(images))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        array = self.images[index].permute(1, 2, 0).numpy()
        image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
        image = self.transform(image) if self.transform else image
        item = {VIEWS if isinstance(image, list) else INPUTS: image, TARGETS: int(self.labels[index])}
        return item | {name: int(t[index]) for name, t in self.extras.items()}


class InMemoryVisionDataModule(VisionDataModule):
    """A dataset held as ``uint8`` tensors, with the fast on-device augmentation path (default) or torchvision.

    Subclasses implement :meth:`load_split` (and :meth:`download_split` when the dataset can be downloaded).

    On the fast path every batch is ``{"inputs": uint8 images, "targets": labels, **extras}`` until
    :meth:`on_after_batch_transfer` runs on its device: training images go through the augment (:attr:`augment`),
    then every batch through :meth:`to_inputs` (normalization, or [0, 1] pixels with ``normalize=False``).

    The augment protocol: any callable that takes the ``uint8`` ``(N, C, H, W)`` training images on their device and
    returns pixels (``uint8`` in [0, 255] or floating point in [0, 1], ``(N, C, H', W')``), or a list of such views
    (the batch then holds ``views`` instead of ``inputs``). If it has a ``generator`` attribute holding a
    ``torch.Generator`` and draws all its randomness from it, the datamodule re-seeds that generator from
    ``(seed, rank, epoch)`` at the first training batch of every epoch: runs are reproducible, each rank draws its
    own parameters and a run resumed at an epoch boundary continues exactly. An augment without one draws from
    whatever it uses and is not re-seeded. Built-in: :class:`~lit_methods.datamodules.fast.BatchAugment` and
    :class:`~lit_methods.datamodules.ssl_views.SSLViewAugment`.

    Args:
        fast_loader: gather batches from the in-memory tensor and augment them on their device
            (:mod:`lit_methods.datamodules.fast`); ``False`` uses a torchvision ``DataLoader`` with per-sample PIL transforms.
        augment: the fast path's training augment (see the protocol above), e.g. given by ``class_path`` in a config;
            ``None`` builds the default one from the flags below (``BatchAugment``, or ``SSLViewAugment`` with
            ``ssl_views``), which must then keep their defaults. Needs ``fast_loader=True``.
        crop_padding: zero padding of the random crop (0: no crop).
        horizontal_flip: random horizontal flips.
        cutout_size: side of the Cutout square (0: no cutout); it is filled with the mean pixel (0 after
            normalization, as the paper's Cutout of the normalized image).
        imbalance_factor: long-tailed training split (Cao et al., LDAM, arXiv:1906.07413): class ``i`` keeps
            ``n_max * imbalance_factor ** (-i / (C - 1))`` images; 1 keeps the split balanced.
        samples_per_class: keep this many training images per class, drawn with ``seed``.
        randaugment_num_ops: RandAugment's N (0: off), applied after crop and flip, before normalization and
            Cutout (Cubuk et al. 2020, arXiv:1909.13719). It transforms each image on its own, so it needs
            ``fast_loader=False`` (the fast path augments whole batches and rejects it).
        randaugment_magnitude: RandAugment's M on the paper's scale, M / 10 of each op's maximum (CIFAR-10: 5,
            CIFAR-100: 14; see :class:`~lit_methods.datamodules.transforms.PaperScaleRandAugment`).
        ssl_views: training batches become ``{"views": [view_1, ..., view_n, local_1, ..., local_m], "targets":
            labels}`` with SimCLR's CIFAR augmentation for self-supervised methods; 0 is off, else the number of
            full-size (global) views, >= 2. Per image in the torchvision path
            (:func:`~lit_methods.datamodules.transforms.build_ssl_view_transforms`), batched on the device in the fast path
            (:class:`~lit_methods.datamodules.ssl_views.SSLViewAugment`, same distribution); validation and test batches stay
            single-view. ``crop_padding``, ``horizontal_flip`` and ``cutout_size`` do not apply to the views.
        ssl_local_views: number of small multi-crop views after the global ones (Caron et al., SwAV,
            arXiv:2006.09882); needs ``ssl_views`` and ``ssl_local_size``.
        ssl_local_size: side of the local views (e.g. 16 for 32 x 32 images: SwAV's 96 / 224 of the side is 14).
        ssl_global_scale: area fraction range of the global views' random resized crop: SimCLR's (0.08, 1) by
            default, SwAV's multi-crop uses (0.14, 1).
        ssl_local_scale: area fraction range of the local views (SwAV: (0.05, 0.14)).
        ssl_color_jitter: colour-jitter strengths ``(brightness, contrast, saturation, hue)`` of every view, on both
            paths (SimCLR's (0.4, 0.4, 0.4, 0.1) by default; solo-learn's CIFAR recipes use saturation 0.2).
        The other arguments are those of :class:`VisionDataModule`.
    """

    def __init__(
        self,
        data_dir: str | Path = "data",
        val_split: int | float = 0,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        seed: int = 42,
        download: bool = False,
        pin_memory: bool = False,
        drop_last: bool = False,
        train_transforms: Callable | None = None,
        val_transforms: Callable | None = None,
        normalize: bool = True,
        fast_loader: bool = True,
        augment: Callable[[Tensor], Any] | None = None,
        crop_padding: int = 4,
        horizontal_flip: bool = True,
        cutout_size: int = 0,
        imbalance_factor: float = 1.0,
        samples_per_class: int | None = None,
        randaugment_num_ops: int = 0,
        randaugment_magnitude: int = 9,
        ssl_views: int = 0,
        ssl_local_views: int = 0,
        ssl_local_size: int | None = None,
        ssl_global_scale: tuple[float, float] = (0.08, 1.0),
        ssl_local_scale: tuple[float, float] = (0.05, 0.14),
        ssl_color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1),
    ) -> None:
        super().__init__(
            data_dir=data_dir,
            val_split=val_split,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            seed=seed,
            download=download,
            pin_memory=pin_memory,
            drop_last=drop_last,
            train_transforms=train_transforms,
            val_transforms=val_transforms,
            normalize=normalize,
        )
        if fast_loader and (train_transforms is not None or val_transforms is not None):
            raise ValueError("custom train_transforms/val_transforms need fast_loader=False (torchvision path)")
        if fast_loader and randaugment_num_ops:
            raise ValueError(
                f"randaugment_num_ops={randaugment_num_ops}: RandAugment runs per image in the torchvision path, "
                "set fast_loader=False"
            )
        randaugment(randaugment_num_ops, randaugment_magnitude)  # validates both values
        if ssl_views == 1 or ssl_views < 0:
            raise ValueError(f"ssl_views must be 0 (off) or >= 2, got {ssl_views}")
        if not ssl_views and (ssl_local_views or ssl_local_size is not None):
            raise ValueError(
                f"ssl_local_views={ssl_local_views}, ssl_local_size={ssl_local_size} need ssl_views >= 2 (got 0)"
            )
        if ssl_views:
            try:
                validate_view_counts(ssl_views, ssl_local_views, ssl_local_size)
                validate_scale("ssl_global_scale", ssl_global_scale)
                validate_scale("ssl_local_scale", ssl_local_scale)
                validate_color_jitter("ssl_color_jitter", ssl_color_jitter)
            except ValueError as error:
                raise ValueError(
                    f"ssl_views={ssl_views}, ssl_local_views={ssl_local_views}, ssl_local_size={ssl_local_size}: "
                    f"{error}"
                ) from None
        if crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0, got {crop_padding}")
        if cutout_size < 0:
            raise ValueError(f"cutout_size must be >= 0, got {cutout_size}")
        if not (math.isfinite(imbalance_factor) and imbalance_factor >= 1.0):
            raise ValueError(f"imbalance_factor must be a finite number >= 1, got {imbalance_factor}")
        if samples_per_class is not None and samples_per_class < 1:
            raise ValueError(f"samples_per_class must be >= 1, got {samples_per_class}")
        if samples_per_class is not None and imbalance_factor != 1.0:
            raise ValueError(
                f"choose either samples_per_class={samples_per_class} or imbalance_factor={imbalance_factor}"
            )
        self.fast_loader = fast_loader
        self.crop_padding = crop_padding
        self.horizontal_flip = horizontal_flip
        self.cutout_size = cutout_size
        self.imbalance_factor = imbalance_factor
        self.samples_per_class = samples_per_class
        self.randaugment_num_ops = randaugment_num_ops
        self.randaugment_magnitude = randaugment_magnitude
        self.ssl_views = ssl_views
        self.ssl_local_views = ssl_local_views
        self.ssl_local_size = ssl_local_size
        self.ssl_global_scale = tuple(ssl_global_scale)
        self.ssl_local_scale = tuple(ssl_local_scale)
        self.ssl_color_jitter = tuple(ssl_color_jitter)
        self.augment: Callable[[Tensor], Tensor | list[Tensor]]
        if augment is not None:
            if not callable(augment):
                raise TypeError(f"augment must be callable on a uint8 image batch, got {augment!r}")
            if not fast_loader:
                raise ValueError(f"augment={augment!r} runs on the fast path: set fast_loader=True")
            changed = {
                name: getattr(self, name)
                for name in DEFAULT_AUGMENT_FLAGS
                if _as_plain(getattr(self, name)) != _as_plain(constructor_default(type(self), name))
            }
            if changed:
                raise ValueError(
                    f"give either augment={augment!r} or the flags of the default augment, not both: got {changed}"
                )
            self.augment = augment
        elif ssl_views:
            self.augment = SSLViewAugment(
                global_views=ssl_views,
                local_views=ssl_local_views,
                local_size=ssl_local_size,
                global_scale=self.ssl_global_scale,
                local_scale=self.ssl_local_scale,
                color_jitter=self.ssl_color_jitter,
                seed=seed,
            )
        else:
            self.augment = BatchAugment(
                crop_padding=crop_padding,
                horizontal_flip=horizontal_flip,
                cutout_size=cutout_size,
                cutout_fill=self.mean if cutout_size else None,
                seed=seed,
            )
        self.normalization = Normalize(self.mean, self.std)
        self._augment_epoch: int | None = None
        self.train_images: Tensor | None = None
        self.train_labels: Tensor | None = None
        self.val_images: Tensor | None = None
        self.val_labels: Tensor | None = None
        self.test_images: Tensor | None = None
        self.test_labels: Tensor | None = None

    # -- what a dataset subclass provides ---------------------------------------------------------------------
    def load_split(self, train: bool) -> tuple[Tensor, Tensor]:
        """Read one split from ``data_dir`` as (``uint8`` ``(N, C, H, W)`` images, ``int64`` labels).

        Raise ``FileNotFoundError`` naming where it looked and how to get the data when it is missing, and
        ``RuntimeError`` naming the file when a file is truncated or corrupted.
        """
        raise NotImplementedError

    def download_split(self, train: bool) -> None:
        """Fetch one split into ``data_dir``; only called from :meth:`prepare_data` with ``download=True``."""
        raise NotImplementedError(f"{type(self).__name__} cannot download; place the files in {self.data_dir}")

    # -- Lightning hooks ----------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        if self.download:
            for train in (True, False):
                self.download_split(train)

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit", "validate") and self.train_images is None:
            images, labels = self.load_split(train=True)
            keep = self.select_training_indices(labels)
            if keep is not None:
                images, labels = images[keep], labels[keep]
            if self.val_split:
                train_idx, val_idx = split_indices(len(labels), self.val_split, self.seed)
                self.val_images, self.val_labels = images[val_idx], labels[val_idx]
                images, labels = images[train_idx], labels[train_idx]
            self.train_images, self.train_labels = images, labels
        needs_test = stage in (None, "test", "predict") or not self.val_split
        if needs_test and self.test_images is None:
            self.test_images, self.test_labels = self.load_split(train=False)

    def select_training_indices(self, labels: Tensor) -> Tensor | None:
        """Indices of the training split kept by the long-tailed or per-class-subset options (None: all)."""
        if self.imbalance_factor != 1.0:
            return long_tailed_indices(labels, self.num_classes, self.imbalance_factor)
        if self.samples_per_class is not None:
            return per_class_subset_indices(labels, self.num_classes, self.samples_per_class, self.seed)
        return None

    def default_train_transforms(self) -> Callable:
        if self.ssl_views:
            normalize = self.inputs_normalized
            global_view = build_ssl_view_transforms(
                self.mean,
                self.std,
                self.image_size,
                *self.ssl_global_scale,
                normalize=normalize,
                color_jitter=self.ssl_color_jitter,
            )
            local_view = None
            if self.ssl_local_views:
                local_size = (self.ssl_local_size, self.ssl_local_size)
                local_view = build_ssl_view_transforms(
                    self.mean,
                    self.std,
                    local_size,
                    *self.ssl_local_scale,
                    normalize=normalize,
                    color_jitter=self.ssl_color_jitter,
                )
            return MultiView(global_view, self.ssl_views, local_view, self.ssl_local_views)
        return build_train_transforms(
            self.mean,
            self.std,
            self.image_size,
            self.crop_padding,
            self.horizontal_flip,
            self.cutout_size,
            self.randaugment_num_ops,
            self.randaugment_magnitude,
            normalize=self.inputs_normalized,
        )

    def loader_of(
        self, images: Tensor | None, labels: Tensor | None, train: bool, extras: Mapping[str, Tensor] | None = None
    ) -> Any:
        """A loader over ``images`` (uint8, as the splits) and ``labels`` with this datamodule's batch sizes,
        sharding, seed and transforms (``train`` selects shuffling, ``drop_last`` and the training transforms);
        ``extras`` are per-sample tensors carried as extra batch fields. Wrappers build their loaders with it."""
        if images is None or labels is None:
            raise RuntimeError(f"{type(self).__name__}.setup() has not loaded this split yet")
        if not self.fast_loader:
            transform = self.resolved_train_transforms() if train else self.resolved_val_transforms()
            return self.make_dataloader(ArrayImageDataset(images, labels, transform, extras), train)
        rank, world_size = self.rank_and_world_size()
        sampler = ShardedEpochSampler(
            len(labels),
            self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            seed=self.seed,
            drop_last=self.drop_last if train else False,
            rank=rank,
            world_size=world_size,
        )
        return InMemoryBatchLoader(images, labels, sampler, pin_memory=self.pin_memory, extras=extras)

    def train_dataloader(self) -> Any:
        return self.loader_of(self.train_images, self.train_labels, train=True)

    def val_dataloader(self) -> Any:
        if self.val_split:
            return self.loader_of(self.val_images, self.val_labels, train=False)
        return self.loader_of(self.test_images, self.test_labels, train=False)

    def test_dataloader(self) -> Any:
        return self.loader_of(self.test_images, self.test_labels, train=False)

    def predict_dataloader(self) -> Any:
        return self.test_dataloader()

    def to_inputs(self, pixels: Tensor) -> Tensor:
        """Pixels (``uint8`` in [0, 255] or floating point in [0, 1]) as the ``float32`` inputs this datamodule
        yields: normalized with ``mean``/``std``, or [0, 1] pixels when ``inputs_normalized`` is ``False``."""
        if not self.inputs_normalized:
            return unit_pixels(pixels)
        if self.normalization.mean.device != pixels.device:
            self.normalization.to(pixels.device)
        return self.normalization(pixels)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Fast path: augment (training) the ``uint8`` images on their device, then turn them into inputs
        (:meth:`to_inputs`); evaluation batches are only turned into inputs. An augment that returns a list of views
        (``ssl_views``) makes the training batch ``{"views": [...], "targets": ..., **extras}``. Batches of the
        torchvision path arrive transformed and pass through.

        An augment with a ``generator`` (see the class doc) is re-seeded from ``(seed, rank, epoch)`` at the first
        training batch of every epoch, so each rank draws its own parameters and a run resumed at an epoch boundary
        continues exactly.
        """
        if not isinstance(batch, Mapping):
            return batch
        images = batch.get(INPUTS)
        if not isinstance(images, Tensor) or images.dtype != torch.uint8:  # torchvision path: already transformed
            return batch
        rest = {name: value for name, value in batch.items() if name != INPUTS}
        if self.trainer is None or not self.trainer.training:
            return {INPUTS: self.to_inputs(images), **rest}
        self._seed_augment(self.trainer.current_epoch)
        augmented = self.augment(images)
        if isinstance(augmented, Tensor):
            return {INPUTS: self.to_inputs(augmented), **rest}
        if isinstance(augmented, (list, tuple)) and augmented and all(isinstance(v, Tensor) for v in augmented):
            return {VIEWS: [self.to_inputs(view) for view in augmented], **rest}
        raise TypeError(
            f"the augment {type(self.augment).__name__} returned {type(augmented).__name__}: an augment returns an "
            "image tensor or a non-empty list of view tensors"
        )

    def _seed_augment(self, epoch: int) -> None:
        generator = getattr(self.augment, "generator", None)
        if isinstance(generator, torch.Generator) and epoch != self._augment_epoch:
            rank, _ = self.rank_and_world_size()
            seed = np.random.SeedSequence([self.seed, rank, epoch]).generate_state(1)[0]
            generator.manual_seed(int(seed))
            self._augment_epoch = epoch


DEFAULT_AUGMENT_FLAGS = (
    "crop_padding",
    "horizontal_flip",
    "cutout_size",
    "ssl_views",
    "ssl_local_views",
    "ssl_local_size",
    "ssl_global_scale",
    "ssl_local_scale",
    "ssl_color_jitter",
)
"""The arguments of :class:`InMemoryVisionDataModule` that configure its default augment."""


def constructor_default(cls: type, name: str) -> Any:
    """The default of ``cls(...)``'s argument ``name``: from the first class of the MRO whose ``__init__`` names it
    (a subclass may change a default and pass the rest on as ``**kwargs``)."""
    for klass in cls.__mro__:
        init = vars(klass).get("__init__")
        if init is None:
            continue
        parameter = inspect.signature(init).parameters.get(name)
        if parameter is not None and parameter.default is not inspect.Parameter.empty:
            return parameter.default
    raise TypeError(f"{cls.__name__}() has no argument {name!r} with a default")


def _as_plain(value: Any) -> Any:
    return tuple(value) if isinstance(value, (list, tuple)) else value


class WrappingDataModule(L.LightningDataModule):
    """Base of the datamodules that wrap an :class:`InMemoryVisionDataModule` (``self.datamodule``) and change how it
    trains: the data facts the CLI links into the model (``num_classes``, ``in_channels``, ``image_size``, ``mean``,
    ``std``, ``inputs_normalized``), the evaluation loaders and the on-device augmentation/normalization are those of
    the wrapped datamodule. Subclasses override ``train_dataloader`` and extend ``setup``."""

    def __init__(self, datamodule: InMemoryVisionDataModule) -> None:
        super().__init__()
        if not isinstance(datamodule, InMemoryVisionDataModule):
            raise ValueError(f"{type(self).__name__} wraps an InMemoryVisionDataModule, got {datamodule!r}")
        self.datamodule = datamodule

    @property
    def num_classes(self) -> int:
        return self.datamodule.num_classes

    @property
    def in_channels(self) -> int:
        return self.datamodule.in_channels

    @property
    def image_size(self) -> tuple[int, int]:
        return self.datamodule.image_size

    @property
    def mean(self) -> tuple[float, ...]:
        return self.datamodule.mean

    @property
    def std(self) -> tuple[float, ...]:
        return self.datamodule.std

    @property
    def inputs_normalized(self) -> bool:
        return self.datamodule.inputs_normalized

    @property
    def train_images(self) -> Tensor | None:
        return self.datamodule.train_images

    @property
    def train_labels(self) -> Tensor | None:
        return self.datamodule.train_labels

    @property
    def test_images(self) -> Tensor | None:
        return self.datamodule.test_images

    @property
    def test_labels(self) -> Tensor | None:
        return self.datamodule.test_labels

    def to_inputs(self, pixels: Tensor) -> Tensor:
        return self.datamodule.to_inputs(pixels)

    def prepare_data(self) -> None:
        self.datamodule.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        self.datamodule.trainer = self.trainer
        self.datamodule.setup(stage)

    def train_dataloader(self) -> Any:
        return self.datamodule.train_dataloader()

    def val_dataloader(self) -> Any:
        return self.datamodule.val_dataloader()

    def test_dataloader(self) -> Any:
        return self.datamodule.test_dataloader()

    def predict_dataloader(self) -> Any:
        return self.datamodule.predict_dataloader()

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """The wrapped datamodule's on-device augmentation/normalization (extra batch fields pass through)."""
        return self.datamodule.on_after_batch_transfer(batch, dataloader_idx)
