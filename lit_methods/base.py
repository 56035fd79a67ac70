"""The classifier every supervised method of lit-methods builds on."""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

__all__ = ["ImageClassifier", "WarmupCosine", "drop_object_hyperparameters", "parameter_groups"]

_PLAIN_HPARAM_TYPES = (dict, list, tuple, str, int, float, bool, type(None))
_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def drop_object_hyperparameters(module: L.LightningModule) -> None:
    """Remove hyper-parameters that are Python objects (a backbone or an optimizer factory given in Python).

    Checkpoints then load with ``weights_only=True``; pass those objects again to ``load_from_checkpoint``. From the
    CLI such arguments hold their config (a dict) and stay, so a CLI-trained module reloads from its checkpoint alone.
    """
    for name, value in list(module.hparams.items()):
        if not isinstance(value, _PLAIN_HPARAM_TYPES):
            del module.hparams[name]


def parameter_groups(module: nn.Module, weight_decay: float, exclude_norm_and_bias: bool) -> list[dict[str, Any]]:
    """Optimizer parameter groups; with ``exclude_norm_and_bias`` biases and norm-layer parameters get no decay."""
    if not exclude_norm_and_bias:
        return [{"params": [p for p in module.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    decay, no_decay = [], []
    for submodule in module.modules():
        for name, param in submodule.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            is_norm = isinstance(submodule, _NORM_TYPES)
            (no_decay if is_norm or name.endswith("bias") else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class ImageClassifier(L.LightningModule):
    """Image classification with any backbone: cross-entropy, top-1/top-5 accuracy, SGD and an LR schedule.

    Methods subclass it and override :meth:`compute_loss` (the objective), :meth:`forward` (the head) or
    :meth:`training_step`; everything else (metrics, optimizer, schedule, logging) is shared.

    Args:
        backbone: any ``nn.Module`` mapping ``(N, C, H, W)`` images to ``(N, num_classes)`` logits. From the CLI it
            is given by ``class_path``; its ``num_classes`` and ``in_channels`` are filled from the datamodule.
            A backbone (or optimizer/scheduler) built in Python is not stored with the hyper-parameters: pass it
            again to ``load_from_checkpoint(path, backbone=...)``.
        num_classes: number of classes (linked from the datamodule by the CLI; read from
            ``backbone.num_classes`` when omitted).
        in_channels: input channels; with ``image_size`` it lets the constructor check the backbone's output shape.
        image_size: input height and width (linked from the datamodule by the CLI).
        label_smoothing: label smoothing of the cross-entropy (Szegedy et al. 2016, arXiv:1512.00567).
        lr: learning rate of the default SGD optimizer (peak rate of one-cycle).
        momentum: SGD momentum.
        weight_decay: weight decay.
        nesterov: Nesterov momentum.
        lr_schedule: ``"cosine"`` (per-step cosine decay to 0 after ``warmup_steps`` of linear warmup),
            ``"onecycle"`` (Smith & Topin 2017, arXiv:1708.07120) or ``"constant"``; all sized from
            ``trainer.estimated_stepping_batches``.
        warmup_steps: linear warmup of the cosine schedule, in optimizer steps (an int) or as a fraction of all
            steps (a float).
        exclude_norm_and_bias_from_weight_decay: no weight decay on biases and normalization parameters.
        channels_last: run the backbone in channels-last memory format (faster convolutions on recent GPUs).
        optimizer: replaces the default SGD; called with the parameter groups (``class_path`` from the CLI).
        lr_scheduler: replaces ``lr_schedule``; called with the optimizer and stepped every optimizer step.
    """

    slug: ClassVar[str] = "baseline"

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int | None = None,
        in_channels: int | None = None,
        image_size: tuple[int, int] | None = None,
        label_smoothing: float = 0.0,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        nesterov: bool = True,
        lr_schedule: Literal["cosine", "onecycle", "constant"] = "cosine",
        warmup_steps: int | float = 0,
        exclude_norm_and_bias_from_weight_decay: bool = False,
        channels_last: bool = False,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        drop_object_hyperparameters(self)
        if num_classes is None:
            num_classes = getattr(backbone, "num_classes", None)
            if not isinstance(num_classes, int):
                raise ValueError("num_classes was not given and the backbone has no integer `num_classes` attribute")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing}")
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if isinstance(warmup_steps, float) and not 0.0 <= warmup_steps < 1.0:
            raise ValueError(f"warmup_steps as a fraction must lie in [0, 1), got {warmup_steps}")
        if isinstance(warmup_steps, int) and warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.backbone = backbone
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.image_size = tuple(image_size) if image_size is not None else None
        self.label_smoothing = label_smoothing
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.nesterov = nesterov
        self.lr_schedule = lr_schedule
        self.warmup_steps = warmup_steps
        self.exclude_norm_and_bias_from_weight_decay = exclude_norm_and_bias_from_weight_decay
        self.channels_last = channels_last
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        if channels_last:
            self.backbone = self.backbone.to(memory_format=torch.channels_last)
        if in_channels is not None and self.image_size is not None:
            self.check_backbone_output()
        self.train_metrics = self._make_metrics("train")
        self.val_metrics = self._make_metrics("val")
        self.test_metrics = self._make_metrics("test")
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()

    # -- construction helpers -----------------------------------------------------------------------------------
    def _make_metrics(self, stage: str) -> MetricCollection:
        metrics: dict[str, MulticlassAccuracy] = {"acc": MulticlassAccuracy(self.num_classes, average="micro")}
        if self.num_classes > 5:
            metrics["acc_top5"] = MulticlassAccuracy(self.num_classes, top_k=5, average="micro")
        return MetricCollection(metrics, prefix=f"{stage}/")

    @torch.no_grad()
    def check_backbone_output(self) -> None:
        """Construction-time check that the backbone maps the data's images to ``num_classes`` logits.

        Methods whose backbone returns features for a head of their own override this.
        """
        was_training = self.backbone.training
        self.backbone.eval()
        try:
            dummy = torch.zeros(2, self.in_channels, *self.image_size)
            out = self.backbone(dummy)
        finally:
            self.backbone.train(was_training)
        if out.shape != (2, self.num_classes):
            raise ValueError(
                f"the backbone maps {self.in_channels}x{self.image_size[0]}x{self.image_size[1]} inputs to shape "
                f"{tuple(out.shape[1:])} per sample, but the classifier expects ({self.num_classes},) logits; "
                "construct the backbone with num_classes and in_channels of the data"
            )

    # -- the parts methods override -----------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.backbone(x)

    def compute_loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Cross-entropy with label smoothing; ``targets`` are class indices or class probabilities."""
        return F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)

    def shared_step(self, batch: Any, stage: str) -> tuple[Tensor, Tensor, Tensor]:
        """Forward one batch; returns ``(loss, logits, targets)``."""
        images, targets = batch[0], batch[1]
        logits = self(images)
        return self.compute_loss(logits, targets), logits, targets

    # -- Lightning hooks ---------------------------------------------------------------------------------------
    def _update_metrics(self, stage: str, logits: Tensor, targets: Tensor) -> None:
        hard_targets = targets.argmax(dim=1) if targets.is_floating_point() else targets
        metrics = getattr(self, f"{stage}_metrics")
        metrics.update(logits.detach(), hard_targets)
        self.log_dict(metrics, on_step=False, on_epoch=True)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss, logits, targets = self.shared_step(batch, "train")
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        self._update_metrics("train", logits, targets)
        return loss

    def _eval_step(self, batch: Any, stage: str) -> Tensor:
        loss, logits, targets = self.shared_step(batch, stage)
        mean_loss = getattr(self, f"{stage}_loss")
        mean_loss.update(loss.detach(), weight=len(targets))
        self.log(f"{stage}/loss", mean_loss, on_step=False, on_epoch=True, prog_bar=stage == "val")
        self._update_metrics(stage, logits, targets)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._eval_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._eval_step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self(images).softmax(dim=1)

    def optimizer_parameters(self) -> list[dict[str, Any]]:
        """Parameter groups handed to the optimizer; methods with extra modules extend this."""
        return parameter_groups(self, self.weight_decay, self.exclude_norm_and_bias_from_weight_decay)

    def configure_optimizers(self) -> Any:
        groups = self.optimizer_parameters()
        if self.optimizer_factory is not None:
            optimizer = self.optimizer_factory(groups)
        else:
            optimizer = torch.optim.SGD(groups, lr=self.lr, momentum=self.momentum, nesterov=self.nesterov)
        scheduler = self._make_scheduler(optimizer)
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _make_scheduler(self, optimizer: torch.optim.Optimizer) -> Any:
        if self.lr_scheduler_factory is not None:
            return self.lr_scheduler_factory(optimizer)
        if self.lr_schedule == "constant":
            return None
        total = int(self.trainer.estimated_stepping_batches)
        if self.lr_schedule == "onecycle":
            peak = [group["lr"] for group in optimizer.param_groups]
            return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peak, total_steps=total)
        warmup = round(self.warmup_steps * total) if isinstance(self.warmup_steps, float) else self.warmup_steps
        return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(warmup, total))


class WarmupCosine:
    """LR factor: linear warmup over ``warmup`` steps, then cosine decay to 0 at ``total`` steps (picklable)."""

    def __init__(self, warmup: int, total: int) -> None:
        self.warmup = warmup
        self.total = max(total, 1)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
