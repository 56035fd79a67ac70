"""The per-task driver shared by the class-incremental methods: task boundaries, the accuracy matrix, its metrics and
pictures.

A whole task sequence is one ``lit-methods fit`` run over a
:class:`~lit_methods.datamodules.continual.ClassIncrementalDataModule`: the datamodule trains task ``t`` during epochs
``[t * E, (t + 1) * E)``, and :class:`ContinualMethod` calls :meth:`ContinualMethod.begin_task` at the first epoch of a
new task and :meth:`ContinualMethod.end_task` after its last epoch (where exemplar-free methods take what they keep of
the task's data, e.g. prototypes). Each task is trained as its own run would be: methods reset their optimizers and
schedules in ``begin_task``. Why one fit rather than a Python loop of fits: the stream is then an ordinary config of
the project's CLI (wandb, DDP, checkpoints, ``--ckpt_path``), and a checkpoint written at the end of any epoch
(inside a task or at its end) holds the task index (:attr:`ContinualMethod.task`), the method's state (class means,
code vectors, the frozen old model), the optimizer, the global RNG states and the accuracy matrix, so an interrupted
sequence resumes exactly (the task of an epoch is a function of the epoch; ``begin_task`` runs again only when the
restored task differs from the epoch's).

Evaluation: validation (and test) batches hold every class with its ``task`` field; the accuracy of every task
fills row ``task`` of :attr:`ContinualMethod.accuracy_matrix` at each validation while training (the last one of a
task stands: validate every ``E`` epochs, ``trainer.check_val_every_n_epoch: E``). Logged: ``val/acc`` (accuracy on
the classes seen so far), ``val/avg_incremental_acc`` and ``val/forgetting``. At the end of the fit the matrix is
written as ``accuracy_matrix.md`` and ``accuracy_matrix.png`` into the run's log folder (and logged to wandb).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn

from lit_methods.base import MethodBase
from lit_methods.continual.metrics import (
    accuracy_matrix_table,
    average_forgetting,
    average_incremental_accuracy,
    save_accuracy_matrix_heatmap,
    seen_class_accuracy,
)
from lit_methods.datamodules.batch import as_batch

__all__ = ["ContinualMethod", "backbone_features"]


def backbone_features(backbone: nn.Module, inputs: Tensor) -> Tensor:
    """Pooled pre-logit features: ``backbone.forward_features`` (the nets of :mod:`lit_methods.nets` and
    ``TimmModel``) when it has one, else ``backbone(inputs)`` flattened (a feature extractor)."""
    extract = getattr(backbone, "forward_features", None)
    features = extract(inputs) if extract is not None else backbone(inputs)
    return features.flatten(1)


class ContinualMethod(MethodBase):
    """Base of the class-incremental methods (see the module doc). Subclasses implement :meth:`predict_classes`
    (class indices among the classes seen so far) and may override :meth:`begin_task` and :meth:`end_task`.

    The buffers are sized by ``num_classes`` (an upper bound on the number of tasks), so state dicts do not depend
    on the stream. ``task`` is ``-1`` before the first training epoch.
    """

    def __init__(self, *, num_classes: int | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if num_classes is None:
            raise ValueError("num_classes is required (the CLI fills it from the datamodule)")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.num_classes = num_classes
        self.register_buffer("task", torch.tensor(-1, dtype=torch.long))
        self.register_buffer("seen_classes", torch.tensor(0, dtype=torch.long))
        # -1 marks entries not measured (not NaN, so that state dicts compare equal with torch.equal)
        self.register_buffer("accuracy_matrix", torch.full((num_classes, num_classes), -1.0, dtype=torch.float64))
        self.register_buffer("task_test_sizes", torch.zeros(num_classes, dtype=torch.float64))
        self._eval_correct: Tensor | None = None
        self._eval_total: Tensor | None = None

    # -- the stream ---------------------------------------------------------------------------------------------
    def stream(self) -> Any:
        """The trainer's class-incremental datamodule (a ``ValueError`` naming what was given otherwise)."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if not all(hasattr(datamodule, name) for name in ("task_of_epoch", "tasks", "task_loader")):
            raise ValueError(
                f"{type(self).__name__} trains on a class-incremental stream: use "
                f"lit_methods.datamodules.ClassIncrementalDataModule as the datamodule, got {datamodule!r}"
            )
        if datamodule.num_classes != self.num_classes:
            raise ValueError(f"the model has num_classes={self.num_classes}, the stream {datamodule.num_classes}")
        return datamodule

    def begin_task(self, task: int) -> None:
        """Called at the first training epoch of ``task`` (after :attr:`task` and :attr:`seen_classes` are set)."""

    def end_task(self, task: int) -> None:
        """Called after the last training epoch of ``task`` (before an end-of-epoch checkpoint is written)."""

    def predict_classes(self, inputs: Tensor) -> Tensor:
        """Predicted (relabelled) classes of ``inputs`` among the :attr:`seen_classes` first ones."""
        raise NotImplementedError

    def on_train_epoch_start(self) -> None:
        stream = self.stream()
        task = stream.task_of_epoch(self.current_epoch)
        if task != int(self.task):
            self.task.fill_(task)
            self.seen_classes.fill_(stream.tasks[task].stop)
            self.begin_task(task)

    def on_train_epoch_end(self) -> None:
        stream = self.stream()
        if stream.is_last_epoch_of_task(self.current_epoch):
            self.end_task(int(self.task))

    # -- evaluation -----------------------------------------------------------------------------------------------
    def _eval_batch(self, batch: Any) -> None:
        if self.trainer.sanity_checking and int(self.seen_classes) == 0:
            return  # nothing learnt before the first task
        batch = as_batch(batch)
        if "task" not in batch:
            raise ValueError("class-incremental evaluation batches carry a 'task' field (ClassIncrementalDataModule)")
        if int(self.seen_classes) == 0:
            raise ValueError(f"{type(self).__name__} has learnt no task yet: train it on a stream first")
        predicted = self.predict_classes(batch["inputs"])
        correct = (predicted == batch["targets"]).double()
        tasks = batch["task"].long()
        if self._eval_correct is None:
            self._eval_correct = torch.zeros(self.num_classes, dtype=torch.float64, device=self.device)
            self._eval_total = torch.zeros(self.num_classes, dtype=torch.float64, device=self.device)
        self._eval_correct.index_add_(0, tasks, correct)
        self._eval_total.index_add_(0, tasks, torch.ones_like(correct))

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_batch(batch)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_batch(batch)

    def _task_accuracies(self) -> tuple[Tensor, Tensor]:
        """Per-task accuracy and sample counts of this evaluation epoch, summed over the processes."""
        correct, total = self._eval_correct, self._eval_total
        self._eval_correct = self._eval_total = None
        if correct is None or total is None:
            zeros = torch.zeros(self.num_classes, dtype=torch.float64, device=self.device)
            correct, total = zeros, zeros.clone()
        correct = self.trainer.strategy.reduce(correct, reduce_op="sum")
        total = self.trainer.strategy.reduce(total, reduce_op="sum")
        return correct / total.clamp(min=1), total

    def _log_eval(self, stage: str) -> None:
        accuracy, total = self._task_accuracies()
        seen = torch.tensor(
            [i for i, t in enumerate(total.tolist()) if t > 0 and i <= int(self.task)], dtype=torch.long
        )
        if len(seen):
            seen_acc = (accuracy[seen] * total[seen]).sum() / total[seen].sum()
            self.log(f"{stage}/acc", seen_acc.float(), sync_dist=False)
        if stage == "val" and self.trainer.state.fn == TrainerFn.FITTING and not self.trainer.sanity_checking and int(self.task) >= 0:
            t = int(self.task)
            present = (total > 0) & (torch.arange(len(total), device=total.device) <= t)
            self.accuracy_matrix[t, present] = accuracy[present]
            self.task_test_sizes[present] = total[present]
            matrix = self.measured_matrix()
            if not torch.isnan(torch.tril(matrix)).any() and bool((self.task_test_sizes[: t + 1] > 0).all()):
                sizes = self.task_test_sizes[: t + 1]
                self.log("val/avg_incremental_acc", average_incremental_accuracy(matrix, sizes))
                self.log("val/forgetting", average_forgetting(matrix))
        if stage == "test":
            for j in range(int(self.task) + 1):
                if total[j] > 0:
                    self.log(f"test/acc_task{j}", accuracy[j].float())

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    # -- results ----------------------------------------------------------------------------------------------
    def measured_matrix(self) -> Tensor:
        """The accuracy matrix of tasks ``0..task`` (rows and columns), NaN where not measured."""
        t = int(self.task) + 1
        matrix = self.accuracy_matrix[:t, :t].cpu()
        return matrix.masked_fill(matrix < 0, math.nan)

    def stream_metrics(self) -> dict[str, float]:
        """Average incremental accuracy, final accuracy on all seen classes and forgetting of the matrix so far."""
        matrix, sizes = self.measured_matrix(), self.task_test_sizes[: int(self.task) + 1].cpu()
        seen = seen_class_accuracy(matrix, sizes)
        return {
            "avg_incremental_acc": float(seen.mean()),
            "final_acc": float(seen[-1]),
            "forgetting": average_forgetting(matrix),
        }

    def on_fit_end(self) -> None:
        """Write the accuracy matrix (Markdown table and heat-map) into the run's log folder (runs with a logger)."""
        matrix = self.measured_matrix()
        if not self.trainer.loggers or not self.trainer.is_global_zero:
            return  # the pictures go next to the logs
        if matrix.numel() == 0 or torch.isnan(torch.tril(matrix)).any():
            return
        folder = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        folder.mkdir(parents=True, exist_ok=True)
        metrics = self.stream_metrics()
        summary = ", ".join(f"{name} {100 * value:.2f}" for name, value in metrics.items())
        (folder / "accuracy_matrix.md").write_text(accuracy_matrix_table(matrix) + f"\n\n{summary}\n")
        path = save_accuracy_matrix_heatmap(matrix, folder / "accuracy_matrix.png", title=type(self).__name__)
        for logger in self.trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image("accuracy_matrix", [str(path)])
