"""Fixed mini-batches re-trained by their loss, the data side of DyBAT (Sahayam, Zakkam, Jayaraman, "Can we learn
better with hard samples?", arXiv:2304.03486; official code ``imjohnzakkam/DyBAT``, ``run.py``).

The training split is cut once into ``b`` fixed mini-batches (:class:`FixedBatches`). The first pass trains on every
batch; every later pass trains only on the ``floor(delta * b)`` batches with the highest most recently recorded loss,
in dataset order (:class:`HardBatchSelector`). Only the batches just trained refresh their loss; the others keep
their stale loss and come back once the trained ones fall below them. The optimizer-step budget of ``epochs``
ordinary epochs is ``epochs * b``: set ``trainer.max_steps`` to :meth:`HardBatchDataModule.budget_steps` and
``max_epochs: -1``, so that Lightning "epochs" are passes of ``floor(delta * b)`` steps; validate every ``b`` steps
with ``val_check_interval: b`` and ``check_val_every_n_epoch: null`` (see :class:`HardBatchLoader`).

:class:`HardBatchDataModule` wraps any :class:`~lit_methods.datamodules.base.InMemoryVisionDataModule` (fast loader) and
yields ``{"inputs": images, "targets": labels, "batch_id": id}`` training batches; whoever computes the loss (the
model) reports it through the documented hook :meth:`HardBatchDataModule.record_batch_losses`. The selector's losses
and the loader's position (pass, its chosen batches, how many were trained) are saved with the datamodule in
checkpoints, so a run resumed from any checkpoint (end of a Lightning epoch, validation end, mid-pass) trains exactly
as an uninterrupted one (see :class:`HardBatchLoader` for how Lightning re-enters the saved epoch).

Deviations from the official code, each a generalization that keeps its behaviour on one process: the fixed batches
may be drawn from a seeded permutation (``shuffle=True``; the official loader uses dataset order, ``shuffle=False``),
batches never given a loss (only possible with ``limit_train_batches``) rank as the hardest, and under DDP each rank
owns a disjoint shard of the fixed batches and selects its top ``floor(delta * b_rank)`` among them, so every rank
runs the same number of steps per pass.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from lit_methods.datamodules.base import InMemoryVisionDataModule, WrappingDataModule
from lit_methods.datamodules.batch import INPUTS, TARGETS

__all__ = ["FixedBatches", "HardBatchDataModule", "HardBatchLoader", "HardBatchSelector"]


class FixedBatches:
    """``b`` fixed mini-batches of ``range(num_samples)`` built once, and this rank's disjoint shard of them.

    Args:
        num_samples: size of the training split.
        batch_size: samples per batch; the last incomplete batch is dropped (as the official ``drop_last=True``).
        shuffle: draw the batches from a permutation seeded by ``seed`` (once, never again); ``False`` keeps dataset
            order, as the official code does.
        seed: seed of that permutation.
        rank: this process' rank; it owns batch ids ``rank, rank + world_size, ...``.
        world_size: number of processes; the last ``b % world_size`` batches are left out so every rank owns
            ``b // world_size`` batches.
    """

    def __init__(
        self, num_samples: int, batch_size: int, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"invalid rank {rank} for world_size {world_size}")
        num_batches = num_samples // batch_size
        if num_batches < world_size:
            raise ValueError(
                f"{num_samples} samples in batches of {batch_size} give {num_batches} full batches, fewer than the "
                f"{world_size} ranks"
            )
        if shuffle:
            order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))
        else:
            order = torch.arange(num_samples)
        self.batches: list[Tensor] = list(order[: num_batches * batch_size].split(batch_size))
        self.rank_batch_ids: list[int] = list(range(rank, (num_batches // world_size) * world_size, world_size))

    def __len__(self) -> int:
        """``b``, the number of fixed batches over all ranks."""
        return len(self.batches)


class HardBatchSelector:
    """The recorded loss ``L[i]`` of every fixed batch and the choice of the batches of each pass.

    Args:
        num_batches: ``b``, the number of fixed batches (over all ranks).
        delta: fraction of batches re-trained in every pass after the first, in (0, 1]; ``floor(delta * b)`` of
            them (the official code truncates with ``int``); 1 is ordinary training on the fixed batches.
    """

    def __init__(self, num_batches: int, delta: float) -> None:
        if not 0.0 < delta <= 1.0:
            raise ValueError(f"delta must lie in (0, 1], got {delta}")
        if num_batches < 1:
            raise ValueError(f"num_batches must be >= 1, got {num_batches}")
        self.delta = delta
        self.losses = torch.full((num_batches,), math.inf, dtype=torch.float64)

    def num_selected(self, num_candidates: int) -> int:
        """How many of ``num_candidates`` batches a pass after the first trains: ``floor(delta * num_candidates)``."""
        count = math.floor(self.delta * num_candidates)
        if count < 1:
            raise ValueError(
                f"delta={self.delta} selects no batch out of {num_candidates}: raise delta or use smaller batches"
            )
        return count

    def select(self, candidate_ids: list[int]) -> list[int]:
        """The ``floor(delta * len(candidate_ids))`` candidates with the highest recorded loss, in increasing id
        order (ties keep the lower id)."""
        ids = torch.tensor(candidate_ids, dtype=torch.long)
        ranked = torch.argsort(self.losses[ids], descending=True, stable=True)
        return ids[ranked[: self.num_selected(len(candidate_ids))]].sort().values.tolist()

    def record(self, batch_ids: Tensor, losses: Tensor) -> None:
        """Store the loss of each batch in ``batch_ids`` (the loss computed before that step's update)."""
        batch_ids, losses = (batch_ids.reshape(-1).long().cpu(), losses.reshape(-1).detach().double().cpu())
        if len(batch_ids) != len(losses):
            raise ValueError(f"{len(batch_ids)} batch ids but {len(losses)} losses")
        if len(batch_ids) and not (0 <= int(batch_ids.min()) and int(batch_ids.max()) < len(self.losses)):
            raise ValueError(f"batch ids {batch_ids.tolist()} outside [0, {len(self.losses)})")
        self.losses[batch_ids] = losses

    def state_dict(self) -> dict[str, Any]:
        return {"losses": self.losses.clone(), "delta": self.delta}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["losses"].shape != self.losses.shape:
            raise ValueError(f"checkpoint holds {len(state['losses'])} batch losses, this data has {len(self.losses)}")
        if state["delta"] != self.delta:
            raise ValueError(f"checkpoint was trained with delta={state['delta']}, this run has delta={self.delta}")
        self.losses = state["losses"].clone()


class HardBatchLoader:
    """Iterable of ``{"inputs": images_uint8, "targets": labels, "batch_id": id}`` over the batches of the current
    pass on this rank.

    Pass ``p`` is set by Lightning through ``sampler.set_epoch(p)`` (the loader is its own sampler): pass 0 yields
    every batch of the rank's shard in id order; later passes yield the selector's choice among them, computed when
    the pass's first batch is drawn. ``batch_id`` is a one-element ``int64`` tensor.

    Its length is that of the current pass (right after a resume, plus the batches Lightning already counted in the
    epoch it re-enters, see below). Lightning reads a loader's length once (pass 0's ``b``), so with the default
    ``check_val_every_n_epoch=1`` it validates after pass 0 only: validate every ``n`` optimizer steps with
    ``Trainer(val_check_interval=n, check_val_every_n_epoch=None)`` (the configs use ``n = b``, one epoch's worth).

    Resuming. With ``max_steps`` set (required), Lightning 2.6.6 resumes every checkpoint *inside* the saved epoch
    (paths under ``lightning/pytorch/loops/``): ``fit_loop.py:139`` forces ``restarting`` for iteration-based
    training even when the epoch had finished; ``training_epoch_loop.py:213`` keeps the epoch's restored batch count
    and ``:249`` adds it to the data fetcher's count; the fetcher's length is the loader's length read once in
    ``_FitLoop.setup_data`` (``fit_loop.py:276``, ``fetchers.py:76``), and the re-entered epoch ends when the count
    reaches it (``fetchers.py:69``, ``training_epoch_loop.py:444``), or when the loader runs out; it always runs at
    least one iteration (``training_epoch_loop.py:127``), which trains a batch unless a validation check falls on
    the saved batch. Before the first reading, Lightning calls ``set_epoch`` with ``epoch_progress.processed``
    (``fit_loop.py:445``): the saved pass after a checkpoint written inside a Lightning epoch (on train batch end,
    on validation end), the *next* pass after one written on ``on_train_epoch_end``. So a fresh loader, which
    reports pass 0's ``b``, made a run resumed from an end-of-epoch checkpoint train ``b`` minus the saved pass's
    length batches of the next pass (at least one) in the re-entered epoch, then re-select: extra or missing
    batches. :class:`HardBatchDataModule` therefore saves :meth:`position` in its own checkpoint state (restored
    before the loader is built) and calls :meth:`resume_after` on the new loader: an unfinished pass continues at
    the saved batch of its saved selection, a finished one is followed, in the same re-entered epoch, by the next
    pass, with the length counting both. (Lightning's resumable-loader hook, a loader ``load_state_dict``, is called
    at ``fit_loop.py:272``, after the batch limit was fixed from the length at ``:270``: too late.) Not supported:
    resuming with ``limit_train_batches`` (refused), and under DDP a checkpoint written inside a pass (it holds
    rank 0's position; refused on the other ranks).

    Args:
        images: the training images (uint8), indexed by the fixed batches.
        labels: their labels.
        fixed: the fixed batches and this rank's shard.
        selector: the recorded losses that choose each later pass.
        pin_memory: pin every yielded tensor.
    """

    batch_sampler = None

    def __init__(
        self, images: Tensor, labels: Tensor, fixed: FixedBatches, selector: HardBatchSelector, pin_memory: bool
    ) -> None:
        self.images = images
        self.labels = labels
        self.fixed = fixed
        self.selector = selector
        self.pin_memory = pin_memory
        self.epoch = 0
        self.pass_ids: list[int] | None = None  # the current pass's batches, chosen when its first batch is drawn
        self.yielded = 0  # batches of the current pass yielded so far
        self.counted_before = 0  # batches Lightning counts in the current epoch before this pass (after a resume)
        self._saved_pass: dict[str, Any] | None = None  # the checkpointed pass, until Lightning moves past it

    @property
    def sampler(self) -> HardBatchLoader:
        return self

    def set_epoch(self, epoch: int) -> None:
        if epoch == self.epoch:
            return
        if self._saved_pass is not None and epoch == self._saved_pass["epoch"]:
            self._continue_pass(self._saved_pass)
        else:
            self.epoch, self.pass_ids, self.yielded, self.counted_before = (epoch, None, 0, 0)
        self._saved_pass = None

    def pass_length(self, epoch: int | None = None) -> int:
        """Batches this rank trains in pass ``epoch`` (the current pass by default)."""
        if (self.epoch if epoch is None else epoch) == 0:
            return len(self.fixed.rank_batch_ids)
        return self.selector.num_selected(len(self.fixed.rank_batch_ids))

    def pass_batch_ids(self) -> list[int]:
        """Ids of the batches this rank trains in the current pass, in order (chosen once per pass)."""
        if self.pass_ids is None:
            self.pass_ids = (
                list(self.fixed.rank_batch_ids) if self.epoch == 0 else self.selector.select(self.fixed.rank_batch_ids)
            )
        return self.pass_ids

    def __len__(self) -> int:
        return self.counted_before + self.pass_length()

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        while self.yielded < self.pass_length():
            batch_id = self.pass_batch_ids()[self.yielded]
            index = self.fixed.batches[batch_id]
            batch = {INPUTS: self.images[index], TARGETS: self.labels[index], "batch_id": torch.tensor([batch_id])}
            self.yielded += 1
            yield {name: t.pin_memory() for name, t in batch.items()} if self.pin_memory else batch

    def position(self) -> dict[str, Any]:
        """Where this rank stands: the pass, its batches (``None`` before its first one is drawn), how many were
        yielded, and the batches Lightning counted in the epoch before them."""
        return {
            "epoch": self.epoch,
            "pass_ids": None if self.pass_ids is None else list(self.pass_ids),
            "yielded": self.yielded,
            "counted_before": self.counted_before,
        }

    def resume_after(self, position: dict[str, Any]) -> None:
        """Continue from ``position`` (a :meth:`position`) the way Lightning resumes a checkpoint: from the saved
        batch of an unfinished pass, or with the next pass, counted after the finished one, in the same epoch."""
        finished = position["yielded"] == self.pass_length(position["epoch"])
        if not finished and not set(position["pass_ids"] or []) <= set(self.fixed.rank_batch_ids):
            raise ValueError(
                f"the checkpoint stopped in pass {position['epoch']} at batches {position['pass_ids']}, which another "
                "rank trains (a checkpoint holds rank 0's position): resume distributed runs from end-of-pass "
                "checkpoints"
            )
        self._continue_pass(position)
        if finished:  # Lightning re-enters the finished pass's epoch with the next pass (or ends it at once)
            self._saved_pass = position
            self.epoch, self.pass_ids, self.yielded = position["epoch"] + 1, None, 0
            self.counted_before = position["counted_before"] + self.pass_length(position["epoch"])

    def _continue_pass(self, position: dict[str, Any]) -> None:
        self.epoch, self.yielded = position["epoch"], position["yielded"]
        self.pass_ids = None if position["pass_ids"] is None else list(position["pass_ids"])
        self.counted_before = position["counted_before"]


class HardBatchDataModule(WrappingDataModule):
    """Trains on fixed mini-batches of ``datamodule`` with DyBAT's hard-batch re-training; evaluation is unchanged.

    Training batches are ``{"inputs": images, "targets": labels, "batch_id": id}``; the module training on them calls
    :meth:`record_batch_losses` once per step with the (all-gathered under DDP) batch ids and their losses.
    ``num_classes``, ``in_channels``, ``image_size``, ``mean``, ``std`` and ``inputs_normalized`` are those of
    ``datamodule``.

    Args:
        datamodule: the dataset, an :class:`~lit_methods.datamodules.base.InMemoryVisionDataModule` with ``fast_loader=True``;
            its ``batch_size``, augmentation, validation and test splits are used as they are (the paper uses no
            augmentation: ``crop_padding=0``, ``horizontal_flip=False``).
        delta: fraction of the fixed batches re-trained in every pass after the first, in (0, 1] (paper: 0.2, 0.5,
            0.8; 1 is ordinary training on fixed batches).
        shuffle: build the fixed batches from a permutation seeded by ``datamodule.seed`` instead of dataset order.
    """

    def __init__(self, datamodule: InMemoryVisionDataModule, delta: float = 0.5, shuffle: bool = False) -> None:
        super().__init__(datamodule)
        if not isinstance(datamodule, InMemoryVisionDataModule) or not datamodule.fast_loader:
            raise ValueError(
                f"HardBatchDataModule needs an InMemoryVisionDataModule with fast_loader=True, got {datamodule!r}"
            )
        if datamodule.ssl_views:
            raise ValueError(f"ssl_views={datamodule.ssl_views}: hard-batch training is supervised")
        if not 0.0 < delta <= 1.0:
            raise ValueError(f"delta must lie in (0, 1], got {delta}")
        self.delta = delta
        self.shuffle = shuffle
        self.fixed: FixedBatches | None = None
        self.selector: HardBatchSelector | None = None
        self._pending_state: dict[str, Any] | None = None
        self.loader: HardBatchLoader | None = None
        self._pending_position: dict[str, Any] | None = None

    # -- what the training module calls ------------------------------------------------------------------------
    def record_batch_losses(self, batch_ids: Tensor, losses: Tensor) -> None:
        """Record the training loss of each fixed batch in ``batch_ids`` (1-D, every rank's batch of this step
        under DDP, so the losses stay identical on every rank). Call it once per training step, with the loss
        computed before the step's update."""
        if self.selector is None:
            raise RuntimeError("HardBatchDataModule.setup('fit') has not built the fixed batches yet")
        self.selector.record(batch_ids, losses)

    def budget_steps(self, epochs: int) -> int:
        """Optimizer steps (per process) of ``epochs`` ordinary epochs over this rank's fixed batches: the value of
        ``trainer.max_steps`` that gives hard-batch training the same compute as ``epochs`` epochs."""
        if self.fixed is None:
            raise RuntimeError("call setup('fit') first")
        return epochs * len(self.fixed.rank_batch_ids)

    # -- Lightning hooks ----------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if stage in (None, "fit") and self.fixed is None:
            rank, world_size = self.datamodule.rank_and_world_size()
            num_samples = len(self.datamodule.train_labels)
            self.fixed = FixedBatches(
                num_samples, self.datamodule.batch_size, self.shuffle, self.datamodule.seed, rank, world_size
            )
            self.selector = HardBatchSelector(len(self.fixed), self.delta)
            self.selector.num_selected(len(self.fixed.rank_batch_ids))  # rejects a delta that selects nothing
            if self._pending_state is not None:
                self.selector.load_state_dict(self._pending_state)
                self._pending_state = None

    def train_dataloader(self) -> HardBatchLoader:
        if self.fixed is None or self.selector is None:
            raise RuntimeError("HardBatchDataModule.setup('fit') has not built the fixed batches yet")
        if self.trainer is not None and self.trainer.max_steps == -1:
            raise ValueError(
                "HardBatchDataModule trains to a step budget: set trainer.max_steps (see budget_steps) and "
                "max_epochs=-1, got max_steps=-1"
            )
        dm = self.datamodule
        self.loader = HardBatchLoader(dm.train_images, dm.train_labels, self.fixed, self.selector, dm.pin_memory)
        if self._pending_position is not None:
            limit = None if self.trainer is None else self.trainer.limit_train_batches
            if limit is not None and not (isinstance(limit, float) and limit == 1.0):
                raise ValueError(
                    f"resuming with limit_train_batches={limit} is not supported: a limited "
                    "pass ends before its last batch and the resumed position would not match Lightning's"
                )
            self.loader.resume_after(self._pending_position)
            self._pending_position = None
        return self.loader

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {} if self.selector is None else {"selector": self.selector.state_dict()}
        if self.loader is not None:
            state["loader"] = self.loader.position()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending_position = state_dict.get("loader")
        if "selector" not in state_dict:
            return
        if self.selector is None:
            self._pending_state = state_dict["selector"]
        else:
            self.selector.load_state_dict(state_dict["selector"])
