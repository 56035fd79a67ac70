"""Nearest-class-mean classification on the frozen features of a pretrained backbone (Janson, Zhang, Aljundi,
Elhoseiny, "A Simple Baseline that Questions the Use of Pretrained-Models in Continual Learning", arXiv:2210.04428;
official code ``Pauljanson002/pretrained-cl``).

Nothing is trained: every training batch adds its L2-normalised features to per-class sums and counts, and a test
image gets the class whose mean feature is nearest (Euclidean). The means are not re-normalised (as the official
code). Streaming sums make the method task-free: the same means come out of any class order, task split or batch
size. Under several processes the batch sums are all-reduced at every step, so every rank holds the global sums at
all times (and a checkpoint written anywhere holds them). With Lightning's ``ddp`` strategy the means are learnt in
a predict pass (:meth:`NMCBaseline.learn_class_means`): DistributedDataParallel, which Lightning wraps a fitting
module in, refuses a module with nothing to train.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import lightning as L
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from lit_methods.base import drop_object_hyperparameters, load_pretrained_weights
from lit_methods.continual.base import ContinualMethod, backbone_features
from lit_methods.datamodules.batch import as_batch

__all__ = ["NCMHead", "NMCBaseline"]


class NCMHead(nn.Module):
    """Per-class feature sums and counts (``float64``) and nearest-class-mean prediction.

    Args:
        num_classes: number of classes.
        num_features: feature dimension.
    """

    def __init__(self, num_classes: int, num_features: int) -> None:
        super().__init__()
        if num_classes < 1 or num_features < 1:
            raise ValueError(f"num_classes and num_features must be >= 1, got {num_classes} and {num_features}")
        self.register_buffer("sums", torch.zeros(num_classes, num_features, dtype=torch.float64))
        self.register_buffer("counts", torch.zeros(num_classes, dtype=torch.float64))

    def batch_sums(self, features: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """Per-class sums and counts of one batch."""
        if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= len(self.counts)):
            raise ValueError(f"targets must lie in [0, {len(self.counts)}), got [{int(targets.min())}, {int(targets.max())}]")
        sums = torch.zeros_like(self.sums).index_add_(0, targets, features.to(self.sums.dtype))
        counts = torch.zeros_like(self.counts).index_add_(0, targets, torch.ones_like(targets, dtype=self.counts.dtype))
        return sums, counts

    def update(self, features: Tensor, targets: Tensor) -> None:
        """Add one batch; under an initialised ``torch.distributed`` group the batch sums of all processes."""
        sums, counts = self.batch_sums(features, targets)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sums)
            dist.all_reduce(counts)
        self.sums += sums
        self.counts += counts

    def means(self) -> Tensor:
        """Class means (rows of unseen classes are NaN)."""
        return self.sums / self.counts.unsqueeze(1)

    def distances(self, features: Tensor, classes: int | None = None) -> Tensor:
        """Euclidean distance from each feature to the means of the first ``classes`` classes (default: all); a
        class without samples is infinitely far."""
        means = self.means()[:classes]
        seen = self.counts[:classes] > 0
        if not bool(seen.any()):
            raise ValueError("the nearest-class-mean head has no class mean yet: feed it training batches first")
        d = torch.cdist(features.to(means.dtype), torch.where(seen.unsqueeze(1), means, 0.0))
        return d.masked_fill(~seen, torch.inf)

    def predict(self, features: Tensor, classes: int | None = None) -> Tensor:
        return self.distances(features, classes).argmin(dim=1)


class NMCBaseline(ContinualMethod):
    """NMC on frozen features, a class-incremental baseline with nothing to train (see the module doc).

    ``training_step`` adds the batch to the class means and returns the cross-entropy of the batch's negative
    squared distances to the updated means (a value to watch, not optimized). Lightning counts training steps by
    optimizer steps, so the module steps Lightning's stand-in optimizer (what ``configure_optimizers`` returning
    ``None`` gives, it changes nothing) once per batch: ``max_steps``, ``val_check_interval`` and checkpoints every
    ``n`` steps then count batches. One epoch per task is enough (more epochs count the task's samples again, which
    leaves the means unchanged only without augmentation: the configs turn it off, as the official code).

    Several processes: :meth:`NCMHead.update` all-reduces every batch's sums whenever a ``torch.distributed`` group
    is initialised (tested with two gloo processes), so all ranks hold the global means. ``trainer.fit`` under
    Lightning's ``ddp`` strategy cannot run this module (it wraps a fitting module in torch's
    ``DistributedDataParallel``, which refuses a module with no trainable parameter); under ``ddp`` learn the means
    with :meth:`learn_class_means`, a ``trainer.predict`` pass that Lightning runs unwrapped, on a disjoint share of
    the data per process (tested with a 2-process ``Trainer(strategy="ddp")``).

    Args:
        backbone: any feature extractor: a net of :mod:`lit_methods.nets`, ``TimmModel`` (the paper: ViT-B/16
            pretrained on ImageNet-21k, the CLS token after the final norm) or a module whose output is the feature.
            Frozen and kept in eval mode.
        num_classes: classes of the stream (filled from the datamodule by the CLI).
        num_features: feature dimension (default: ``backbone.num_features``).
        normalize_features: L2-normalise the features before averaging (the paper's choice).
        resize_to: resize the inputs to this square side before the backbone (the paper: 224 for ViT-B/16 on CIFAR).
        pretrained_checkpoint: weights of the backbone (a state dict or Lightning checkpoint file), read with
            ``pretrained_key_map``.
        pretrained_key_map: source key prefix -> ``backbone.`` prefix (default ``{"": "backbone."}``: a plain state
            dict of the backbone).
        mean, std, inputs_normalized: input normalization (see :class:`~lit_methods.base.MethodBase`); filled from
            the datamodule by the CLI.
    """

    slug: ClassVar[str] = "nmc-baseline"

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int | None = None,
        num_features: int | None = None,
        normalize_features: bool = True,
        resize_to: int | None = None,
        pretrained_checkpoint: str | None = None,
        pretrained_key_map: Mapping[str, str] | None = None,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        inputs_normalized: bool = True,
    ) -> None:
        # nothing is optimized: the base's optimizer arguments are unused (lr is only required to be positive)
        super().__init__(num_classes=num_classes, lr=1.0, mean=mean, std=std, inputs_normalized=inputs_normalized)
        self.save_hyperparameters()
        drop_object_hyperparameters(self)
        if resize_to is not None and resize_to < 1:
            raise ValueError(f"resize_to must be >= 1, got {resize_to}")
        if num_features is None:
            num_features = getattr(backbone, "num_features", None)
            if not isinstance(num_features, int):
                raise ValueError("num_features was not given and the backbone has no integer `num_features` attribute")
        self.automatic_optimization = False
        self.backbone = backbone
        if pretrained_checkpoint is not None:
            load_pretrained_weights(self, pretrained_checkpoint, pretrained_key_map or {"": "backbone."})
        self.backbone.requires_grad_(False)
        self.backbone.eval()
        self.normalize_features = normalize_features
        self.resize_to = resize_to
        self.head = NCMHead(num_classes, num_features)
        self._learning_means = False
        self._pending: tuple[Tensor, Tensor] | None = None

    def train(self, mode: bool = True) -> NMCBaseline:
        super().train(mode)
        self.backbone.eval()  # frozen: batch-norm statistics and dropout stay as pretrained
        return self

    def configure_optimizers(self) -> None:
        return None

    @torch.no_grad()
    def features(self, inputs: Tensor) -> Tensor:
        x = self.normalize_inputs(inputs)
        if self.resize_to is not None and tuple(x.shape[-2:]) != (self.resize_to, self.resize_to):
            x = F.interpolate(x, size=(self.resize_to, self.resize_to), mode="bilinear", align_corners=False)
        features = backbone_features(self.backbone, x)
        return F.normalize(features, dim=1) if self.normalize_features else features

    def forward(self, inputs: Tensor) -> Tensor:
        """Negative Euclidean distances to the class means (the logits of nearest-class-mean)."""
        return -self.head.distances(self.features(inputs))

    def predict_classes(self, inputs: Tensor) -> Tensor:
        return self.head.predict(self.features(inputs), int(self.seen_classes) or None)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        batch = as_batch(batch)
        features, targets = self.features(batch["inputs"]), batch["targets"]
        self.head.update(features, targets)
        self.optimizers().step()  # Lightning's no-op stand-in: counts the step (see the class doc)
        present = self.head.counts > 0
        logits = -self.head.distances(features)[:, present].pow(2)
        labels = torch.cumsum(present.long(), 0)[targets] - 1
        loss = F.cross_entropy(logits, labels).float()
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def learn_class_means(self, trainer: L.Trainer, dataloaders: Any) -> None:
        """Add every labelled batch of ``dataloaders`` to the class means through ``trainer.predict``, the way to
        learn them under Lightning's ``ddp`` strategy: Lightning does not wrap a predicting module in
        DistributedDataParallel, and its predict sampler gives each process a disjoint share of the data without
        repeats (a training sampler pads shares to equal length by repeating samples). Each process sums its share
        and the sums are all-reduced once at the end (``trainer.strategy.reduce``), so every rank holds the means of
        all the data. ``seen_classes`` is set to the classes that have a mean. Any strategy works (one process too)."""
        self._learning_means = True
        try:
            trainer.predict(self, dataloaders=dataloaders, return_predictions=False)
        finally:
            self._learning_means = False

    def on_predict_epoch_start(self) -> None:
        if self._learning_means:
            self._pending = (torch.zeros_like(self.head.sums), torch.zeros_like(self.head.counts))

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor | None:
        batch = as_batch(batch)
        if not self._learning_means or self._pending is None:
            return self.predict_classes(batch["inputs"])
        if "targets" not in batch:
            raise ValueError("learn_class_means needs labelled batches (a 'targets' field)")
        sums, counts = self.head.batch_sums(self.features(batch["inputs"]), batch["targets"])
        self._pending[0].add_(sums)
        self._pending[1].add_(counts)
        return None

    def on_predict_epoch_end(self) -> None:
        if self._learning_means and self._pending is not None:
            sums, counts = (self.trainer.strategy.reduce(t, reduce_op="sum") for t in self._pending)
            self._pending = None
            self.head.sums += sums
            self.head.counts += counts
            present = torch.nonzero(self.head.counts > 0)
            self.seen_classes.fill_(int(present.max()) + 1 if len(present) else 0)
