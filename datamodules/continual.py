"""Class-incremental streams: a dataset's classes cut into tasks that are trained one after another.

:class:`ClassIncrementalDataModule` wraps any :class:`~lit_methods.datamodules.base.InMemoryVisionDataModule` (digits,
Fashion-MNIST, CIFAR-10/100, Tiny-ImageNet, ImageNet-32 ...) or a folder-read
:class:`~lit_methods.datamodules.imagenet.ImageNetDataModule` (ImageNet, ImageNet-100, any class-list subset), whose
tasks are class-subset views (:class:`ClassSubsetView`) over its ImageFolder datasets. The classes are put in an order (given, or a seeded
shuffle as in the PASS/NAPA-VQ code, seed 1993), relabelled by their position in that order (as continuum's
``ClassIncremental`` and Avalanche's ``class_ids_from_zero_in_first_exp`` do), and cut into a first task of
``first_task_classes`` classes (the "half the classes" base task of NECIL papers: 50 of CIFAR-100) followed by tasks
of ``classes_per_task`` classes. Task ``t`` then holds the labels ``[start_t, end_t)``.

One Lightning ``fit`` trains the whole stream: task ``t`` is trained during the epochs
``[t * epochs_per_task, (t + 1) * epochs_per_task)`` (:meth:`ClassIncrementalDataModule.task_of_epoch`), and the
training loader is rebuilt every epoch (``trainer.reload_dataloaders_every_n_epochs: 1``) on the current task's
samples. Validation and test batches cover every class with a ``task`` field, so a model can fill an accuracy
matrix. Because the task is a function of the epoch, a run resumed from any Lightning checkpoint continues on the
task it stopped in.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.datasets.vision import StandardTransform

from lit_methods.datamodules.base import InMemoryVisionDataModule
from lit_methods.datamodules.batch import INPUTS, TARGETS
from lit_methods.datamodules.fast import InMemoryBatchLoader
from lit_methods.datamodules.imagenet import ImageNetDataModule

__all__ = ["ClassIncrementalDataModule", "ClassSubsetView", "class_incremental_tasks", "dataset_targets",
           "seeded_class_order"]


def seeded_class_order(num_classes: int, seed: int) -> list[int]:
    """The classes ``0..num_classes-1`` shuffled with numpy's ``RandomState(seed)`` (the PASS/NAPA-VQ recipe:
    ``np.random.seed(1993); np.random.permutation(100)``)."""
    import numpy as np

    return np.random.RandomState(seed).permutation(num_classes).tolist()


def class_incremental_tasks(num_classes: int, first_task_classes: int, classes_per_task: int) -> list[range]:
    """The relabelled classes of each task: ``range(0, first_task_classes)``, then ranges of ``classes_per_task``.

    A split that does not cover the classes exactly (a remainder, more classes than there are) is a ``ValueError``
    naming the numbers.
    """
    if classes_per_task < 1:
        raise ValueError(f"classes_per_task must be >= 1, got {classes_per_task}")
    if not 1 <= first_task_classes <= num_classes:
        raise ValueError(f"first_task_classes must lie in [1, {num_classes}] (the data's classes), got {first_task_classes}")
    rest = num_classes - first_task_classes
    if rest % classes_per_task:
        raise ValueError(
            f"the tasks do not cover the {num_classes} classes: after a first task of {first_task_classes}, "
            f"{rest} classes are left, not a multiple of classes_per_task={classes_per_task}"
        )
    tasks = [range(0, first_task_classes)]
    tasks += [range(s, s + classes_per_task) for s in range(first_task_classes, num_classes, classes_per_task)]
    return tasks


def dataset_targets(dataset: Dataset) -> Tensor:
    """The labels of a folder dataset without reading an image: an ``ImageFolder``'s ``targets``, through any
    ``Subset`` around it."""
    if isinstance(dataset, Subset):
        return dataset_targets(dataset.dataset)[torch.as_tensor(list(dataset.indices), dtype=torch.long)]
    targets = getattr(dataset, "targets", None)
    if targets is None:
        raise ValueError(f"{type(dataset).__name__} has no `targets` (an ImageFolder or a Subset of one is needed)")
    return torch.as_tensor(targets, dtype=torch.long)


class ClassSubsetView(Dataset):
    """The samples of ``dataset`` at ``indices`` as ``{"inputs", "targets", "task"}`` with the given (relabelled)
    targets and tasks; images are read and transformed by ``dataset`` on access.

    Args:
        dataset: a dataset whose items are ``{"inputs", "targets"}`` dicts or ``(input, target)`` pairs.
        indices: the positions in ``dataset`` of the view's samples.
        targets: the target of each view sample.
        tasks: the task of each view sample.
    """

    def __init__(self, dataset: Dataset, indices: Sequence[int], targets: Tensor, tasks: Tensor) -> None:
        if not len(indices) == len(targets) == len(tasks):
            raise ValueError(f"indices, targets and tasks differ in length: {len(indices)}, {len(targets)}, {len(tasks)}")
        self.dataset = dataset
        self.indices = [int(i) for i in indices]
        self.targets = targets.long()
        self.tasks = tasks.long()

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.dataset[self.indices[index]]
        inputs = sample[INPUTS] if isinstance(sample, dict) else sample[0]
        return {INPUTS: inputs, TARGETS: int(self.targets[index]), "task": int(self.tasks[index])}


class ClassIncrementalDataModule(L.LightningDataModule):
    """The classes of ``datamodule`` as a class-incremental stream of tasks (see the module doc).

    Training batches are ``{"inputs", "targets", "task"}`` of the current task only; validation and test batches
    hold every class with its ``task``. Targets are the relabelled classes (positions in :attr:`class_order`);
    :attr:`class_order` maps them back. ``num_classes``, ``in_channels``, ``image_size``, ``mean``, ``std`` and
    ``inputs_normalized`` are those of ``datamodule`` (the CLI fills them into the model).

    Args:
        datamodule: the dataset, an :class:`~lit_methods.datamodules.base.InMemoryVisionDataModule` with
            ``fast_loader=True`` or an :class:`~lit_methods.datamodules.imagenet.ImageNetDataModule` (folders read
            on access: its batches arrive transformed by its own transforms, and the loaders are its
            ``make_dataloader``'s over class-subset views); its batch size, augmentation, seed and validation split
            are used as they are.
        classes_per_task: classes of every task after the first.
        first_task_classes: classes of the first task (``None``: ``classes_per_task``; NECIL papers use half the
            classes, e.g. 50 of CIFAR-100).
        epochs_per_task: training epochs of every task; set ``trainer.max_epochs`` to ``num_tasks * epochs_per_task``.
        class_order: the classes in the order they arrive (a permutation of ``0..num_classes-1``); ``None``: a
            shuffle seeded by ``class_order_seed``.
        class_order_seed: seed of that shuffle (PASS and NAPA-VQ: 1993).
    """

    def __init__(
        self,
        datamodule: InMemoryVisionDataModule,
        classes_per_task: int,
        first_task_classes: int | None = None,
        epochs_per_task: int = 1,
        class_order: list[int] | None = None,
        class_order_seed: int = 1993,
    ) -> None:
        super().__init__()
        in_memory = isinstance(datamodule, InMemoryVisionDataModule) and datamodule.fast_loader
        if not (in_memory or isinstance(datamodule, ImageNetDataModule)):
            raise ValueError(
                "ClassIncrementalDataModule needs an InMemoryVisionDataModule with fast_loader=True or an "
                f"ImageNetDataModule, got {datamodule!r}"
            )
        self.in_memory = in_memory
        if getattr(datamodule, "ssl_views", 0):
            raise ValueError(f"ssl_views={datamodule.ssl_views}: class-incremental batches are single-view")
        if epochs_per_task < 1:
            raise ValueError(f"epochs_per_task must be >= 1, got {epochs_per_task}")
        num_classes = datamodule.num_classes
        if class_order is None:
            class_order = seeded_class_order(num_classes, class_order_seed)
        elif sorted(class_order) != list(range(num_classes)):
            raise ValueError(
                f"class_order must be a permutation of the {num_classes} classes 0..{num_classes - 1}, got {class_order}"
            )
        self.datamodule = datamodule
        self.classes_per_task = classes_per_task
        self.first_task_classes = classes_per_task if first_task_classes is None else first_task_classes
        self.epochs_per_task = epochs_per_task
        self.class_order = [int(c) for c in class_order]
        self.class_order_seed = class_order_seed
        self.tasks = class_incremental_tasks(num_classes, self.first_task_classes, classes_per_task)
        position = torch.empty(num_classes, dtype=torch.long)
        position[torch.tensor(self.class_order)] = torch.arange(num_classes)
        self.relabel = position  # original class -> position in the order
        self.task_of_class = torch.cat([torch.full((len(r),), t, dtype=torch.long) for t, r in enumerate(self.tasks)])
        for name in ("num_classes", "in_channels", "image_size", "mean", "std", "inputs_normalized"):
            setattr(self, name, getattr(datamodule, name))

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def task_of_epoch(self, epoch: int) -> int:
        """The task trained in (0-based) ``epoch``; a ``ValueError`` past the last task."""
        task = epoch // self.epochs_per_task
        if task >= self.num_tasks:
            raise ValueError(
                f"epoch {epoch} is past the stream: {self.num_tasks} tasks of {self.epochs_per_task} epochs end at "
                f"epoch {self.num_tasks * self.epochs_per_task - 1}; set trainer.max_epochs="
                f"{self.num_tasks * self.epochs_per_task}"
            )
        return task

    def is_last_epoch_of_task(self, epoch: int) -> bool:
        return (epoch + 1) % self.epochs_per_task == 0

    def current_task(self) -> int:
        """The task of the attached trainer's current epoch (0 without a trainer)."""
        return 0 if self.trainer is None else self.task_of_epoch(self.trainer.current_epoch)

    # -- Lightning hooks ----------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        self.datamodule.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        trainer = self.trainer
        if stage == "fit" and trainer is not None and trainer.reload_dataloaders_every_n_epochs != 1:
            raise ValueError(
                "a class-incremental stream trains a new task's samples every epochs_per_task epochs: set "
                f"trainer.reload_dataloaders_every_n_epochs=1 (got {trainer.reload_dataloaders_every_n_epochs})"
            )
        self.datamodule.trainer = trainer
        self.datamodule.setup(stage)

    def state_dict(self) -> dict[str, Any]:
        return {"class_order": list(self.class_order), "tasks": [(r.start, r.stop) for r in self.tasks]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = (list(state_dict["class_order"]), [tuple(r) for r in state_dict["tasks"]])
        if saved != (self.class_order, [(r.start, r.stop) for r in self.tasks]):
            raise ValueError(
                f"the checkpoint was trained on the class order {saved[0]} cut into tasks {saved[1]}; this stream "
                "differs: resume with the same class_order, first_task_classes and classes_per_task"
            )

    def relabelled(self, labels: Tensor) -> Tensor:
        return self.relabel[labels]

    def task_split(self, task: int, train: bool = True) -> tuple[Tensor, Tensor]:
        """The (images, relabelled targets) of ``task``'s classes in the training (or evaluation) split (in-memory
        datamodules; a folder datamodule's tasks are :meth:`task_view`)."""
        if not self.in_memory:
            raise ValueError("task_split holds images in memory: use task_view with a folder datamodule")
        images, labels = self._split(train)
        targets = self.relabelled(labels)
        keep = self.task_of_class[targets] == task
        return images[keep], targets[keep]

    def _split(self, train: bool) -> tuple[Tensor, Tensor]:
        dm = self.datamodule
        if train:
            images, labels = dm.train_images, dm.train_labels
        elif dm.val_split:
            images, labels = dm.val_images, dm.val_labels
        else:
            images, labels = dm.test_images, dm.test_labels
        if images is None or labels is None:
            raise RuntimeError(f"{type(dm).__name__}.setup() has not loaded this split yet")
        return images, labels

    # -- folder datamodules -----------------------------------------------------------------------------------------
    def _folder_dataset(self, split: str) -> Dataset:
        dm = self.datamodule
        dataset = {"train": dm.train_dataset, "val": dm.val_dataset if dm.val_split else dm.test_dataset,
                   "test": dm.test_dataset}[split]
        if dataset is None:
            raise RuntimeError(f"{type(dm).__name__}.setup() has not loaded this split yet")
        return dataset

    def _unaugmented_train_dataset(self) -> Dataset:
        """The training split read with the evaluation transforms (for a method's pass over a task's data)."""
        train = self._folder_dataset("train")
        base = train.dataset if isinstance(train, Subset) else train
        plain = copy.copy(base)
        plain.transform = self.datamodule.resolved_val_transforms()
        plain.transforms = StandardTransform(plain.transform)
        return Subset(plain, train.indices) if isinstance(train, Subset) else plain

    def task_view(self, task: int | None, split: str = "train", augmented: bool = True) -> ClassSubsetView:
        """The samples of ``task``'s classes (every class with ``task=None``) in ``split`` ("train", "val" or
        "test") of a folder datamodule, relabelled; the training split with its augmentation unless
        ``augmented=False``."""
        dataset = self._folder_dataset(split)
        if split == "train" and not augmented:
            dataset = self._unaugmented_train_dataset()
        targets = self.relabelled(dataset_targets(dataset))
        tasks = self.task_of_class[targets]
        keep = torch.ones_like(targets, dtype=torch.bool) if task is None else tasks == task
        indices = torch.nonzero(keep).flatten()
        return ClassSubsetView(dataset, indices.tolist(), targets[keep], tasks[keep])

    def task_loader(self, task: int, train: bool = True, shuffle: bool = False) -> InMemoryBatchLoader | DataLoader:
        """A loader of ``task``'s samples with ``{"inputs", "targets", "task"}`` batches (unaugmented unless it is
        the trainer's training loader: augmentation runs in :meth:`on_after_batch_transfer` while training; a folder
        datamodule's training split is read with its evaluation transforms here)."""
        if not self.in_memory:
            view = self.task_view(task, "train" if train else "val", augmented=False)
            if len(view) == 0:
                raise ValueError(f"task {task} has no samples in the {'training' if train else 'evaluation'} split")
            return self.datamodule.make_dataloader(view, train=shuffle)
        images, targets = self.task_split(task, train)
        if len(targets) == 0:
            raise ValueError(f"task {task} has no samples in the {'training' if train else 'evaluation'} split")
        return self._make_loader(images, targets, train=shuffle)

    def _make_loader(self, images: Tensor, targets: Tensor, train: bool) -> InMemoryBatchLoader:
        return self.datamodule.loader_of(images, targets, train, extras={"task": self.task_of_class[targets]})

    def train_dataloader(self) -> InMemoryBatchLoader | DataLoader:
        if not self.in_memory:
            return self.datamodule.make_dataloader(self.task_view(self.current_task(), "train"), train=True)
        images, targets = self.task_split(self.current_task(), train=True)
        return self._make_loader(images, targets, train=True)

    def _eval_loader(self, train: bool = False) -> InMemoryBatchLoader:
        images, labels = self._split(train)
        return self._make_loader(images, self.relabelled(labels), train=False)

    def val_dataloader(self) -> InMemoryBatchLoader | DataLoader:
        if not self.in_memory:
            return self.datamodule.make_dataloader(self.task_view(None, "val"), train=False)
        return self._eval_loader()

    def test_dataloader(self) -> InMemoryBatchLoader | DataLoader:
        if not self.in_memory:
            return self.datamodule.make_dataloader(self.task_view(None, "test"), train=False)
        dm = self.datamodule
        if dm.test_images is None or dm.test_labels is None:
            raise RuntimeError(f"{type(dm).__name__}.setup() has not loaded the test split yet")
        return self._make_loader(dm.test_images, self.relabelled(dm.test_labels), train=False)

    def predict_dataloader(self) -> InMemoryBatchLoader | DataLoader:
        return self.test_dataloader()

    def to_inputs(self, pixels: Tensor) -> Tensor:
        """Model inputs of a loader's ``inputs`` (a folder datamodule's arrive transformed: unchanged)."""
        return self.datamodule.to_inputs(pixels) if self.in_memory else pixels

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return self.datamodule.on_after_batch_transfer(batch, dataloader_idx)
