"""The self-supervised base: a backbone's pooled features, an SSL objective over views, online evaluation."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lit_methods.base import MethodBase, drop_object_hyperparameters
from lit_methods.datamodules.batch import as_batch
from lit_methods.ssl.monitors import OnlineLinearProbe, WeightedKNNClassifier

__all__ = ["SSLMethod", "mlp_projector"]


def mlp_projector(in_features: int, hidden_features: int, out_features: int) -> nn.Sequential:
    """The 2-layer MLP projection head of SimCLR and MoCo v2: Linear, ReLU, Linear."""
    return nn.Sequential(nn.Linear(in_features, hidden_features), nn.ReLU(), nn.Linear(hidden_features, out_features))


class SSLMethod(MethodBase):
    """Base of the self-supervised methods (the solo-learn design with typed arguments).

    Training batches are ``([view_1, ..., view_n], labels)`` (a datamodule with ``ssl_views >= 2``; multi-crop views
    may differ in size); the labels only feed the online monitors. Every view goes through the backbone; subclasses
    add their heads in ``__init__`` and implement :meth:`ssl_loss` over all views and their backbone features. The
    base trains an :class:`OnlineLinearProbe` on detached features of the first view, fills a
    :class:`WeightedKNNClassifier` bank with them, and reports ``val/probe_acc`` and ``val/knn_acc`` on the
    single-view validation batches.

    One optimizer (:class:`~lit_methods.base.MethodBase`): SGD by default, or any ``optimizer`` callable such as
    LARS (You et al., "Large Batch Training of Convolutional Networks", arXiv:1708.03888: ``class_path:
    timm.optim.Lars`` with ``lr``, ``momentum``, ``trust_coeff`` and ``trust_clip`` in its ``init_args``). The
    method's parameters train at ``lr`` (or the optimizer's own), the probe at ``probe_lr`` without weight decay, all
    with linear warmup then cosine decay sized from ``trainer.estimated_stepping_batches``; child modules named by
    :meth:`param_group_options` with ``scheduled: False`` keep their rate throughout (SimSiam's predictor). Biases
    and normalization parameters get no weight decay and, with LARS, no trust-ratio adaptation (as in BYOL and
    solo-learn); the probe is never adapted either.

    Args:
        backbone: a network with ``forward_features`` and ``num_features`` (every :mod:`lit_methods.nets` backbone);
            its classifier is removed (``reset_classifier(0)``).
        num_classes: classes of the monitors (filled from the datamodule by the CLI).
        lr: peak learning rate of the method's parameters with the default SGD.
        momentum: SGD momentum.
        weight_decay: weight decay of the method's parameters (none on biases and norm parameters).
        warmup_steps: linear warmup, in optimizer steps (int) or as a fraction of all steps (float).
        probe_lr: learning rate of the linear probe.
        knn_k: neighbours of the kNN monitor.
        knn_temperature: vote temperature of the kNN monitor.
        optimizer: replaces the default SGD; called with the parameter groups (``class_path`` from the CLI).
        lr_scheduler: replaces the warmup-cosine schedule; called with the optimizer, it schedules every group.
        mean: per-channel normalization mean of the data (filled from the datamodule by the CLI).
        std: per-channel normalization standard deviation of the data (filled from the datamodule by the CLI).
        inputs_normalized: ``False`` when batches are [0, 1] pixels: the model normalizes them with ``mean`` and
            ``std`` first.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int = 10,
        lr: float = 0.3,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        warmup_steps: int | float = 0.1,
        probe_lr: float = 0.1,
        knn_k: int = 200,
        knn_temperature: float = 0.1,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        inputs_normalized: bool = True,
    ) -> None:
        super().__init__(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            warmup_steps=warmup_steps,
            exclude_norm_and_bias_from_weight_decay=True,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            mean=mean,
            std=std,
            inputs_normalized=inputs_normalized,
        )
        self.save_hyperparameters()
        drop_object_hyperparameters(self)
        if not (hasattr(backbone, "forward_features") and hasattr(backbone, "reset_classifier")):
            raise ValueError(
                f"{type(backbone).__name__} needs forward_features and reset_classifier (a lit_methods.nets backbone)"
            )
        if probe_lr <= 0:
            raise ValueError(f"probe_lr must be > 0, got {probe_lr}")
        backbone.reset_classifier(0)
        self.backbone = backbone
        self.num_features: int = backbone.num_features
        self.probe_lr = probe_lr
        self.probe = OnlineLinearProbe(self.num_features, num_classes)
        self.probe_val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.knn = WeightedKNNClassifier(num_classes, k=knn_k, temperature=knn_temperature)

    def forward(self, x: Tensor) -> Tensor:
        """Pooled backbone features."""
        return self.backbone.forward_features(self.normalize_inputs(x))

    def ssl_loss(self, views: list[Tensor], features: list[Tensor]) -> Tensor:
        """The method's objective from the views and their backbone features (``features[i] = self(views[i])``)."""
        raise NotImplementedError

    def param_group_options(self) -> dict[str, dict[str, Any]]:
        """The probe at ``probe_lr``, without weight decay or LARS adaptation (its group comes last); methods add
        their own modules (SimSiam's constant-rate predictor)."""
        return {"probe": {"lr": self.probe_lr, "weight_decay": 0.0, "always_adapt": False}}

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """One step on ``{"views": [...], "targets": ...}`` (or a ``([view, ...], targets)`` tuple)."""
        batch = as_batch(batch)
        views, targets = batch.get("views", batch.get("inputs")), batch["targets"]
        if not isinstance(views, (list, tuple)) or len(views) < 2:
            raise ValueError(
                "self-supervised training needs multi-view batches: set the datamodule's ssl_views=2 or more"
            )
        features = [self(view) for view in views]
        loss = self.ssl_loss(views, features)
        probe_loss, _ = self.probe(features[0], targets)
        self.knn.update(bank_features=features[0], bank_targets=targets)
        self.log_dict({"train/ssl_loss": loss, "train/probe_loss": probe_loss}, on_step=True)
        return loss + probe_loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        batch = as_batch(batch)
        images, targets = batch["inputs"], batch["targets"]
        features = self(images)
        _, logits = self.probe(features, targets)
        self.probe_val_acc.update(logits, targets)
        self.log("val/probe_acc", self.probe_val_acc, on_step=False, on_epoch=True)
        self.knn.update(test_features=features, test_targets=targets)

    def on_validation_epoch_end(self) -> None:
        if len(self.knn.bank_features):  # the sanity check runs before any training batch filled the bank
            self.log("val/knn_acc", self.knn.compute())
        self.knn.reset()

    def on_train_epoch_start(self) -> None:
        self.knn.reset()  # the bank holds the features of the current epoch
