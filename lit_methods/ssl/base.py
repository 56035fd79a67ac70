"""The self-supervised base: a backbone's pooled features, an SSL objective over views, online evaluation."""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
from timm.optim import Lars
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lit_methods.base import WarmupCosine, drop_object_hyperparameters, parameter_groups
from lit_methods.datamodules.batch import as_batch
from lit_methods.ssl.monitors import OnlineLinearProbe, WeightedKNNClassifier

__all__ = ["SSLMethod", "constant_lr_factor", "mlp_projector"]


def mlp_projector(in_features: int, hidden_features: int, out_features: int) -> nn.Sequential:
    """The 2-layer MLP projection head of SimCLR and MoCo v2: Linear, ReLU, Linear."""
    return nn.Sequential(nn.Linear(in_features, hidden_features), nn.ReLU(), nn.Linear(hidden_features, out_features))


def constant_lr_factor(step: int) -> float:
    """LR factor of the parameter groups kept at their base rate (no warmup, no decay); picklable."""
    return 1.0


class SSLMethod(L.LightningModule):
    """Base of the self-supervised methods (the solo-learn design with typed arguments).

    Training batches are ``([view_1, ..., view_n], labels)`` (a datamodule with ``ssl_views >= 2``; multi-crop views
    may differ in size); the labels only feed the online monitors. Every view goes through the backbone; subclasses
    add their heads in ``__init__`` and implement :meth:`ssl_loss` over all views and their backbone features. The
    base trains an :class:`OnlineLinearProbe` on detached features of the first view, fills a
    :class:`WeightedKNNClassifier` bank with them, and reports ``val/probe_acc`` and ``val/knn_acc`` on the
    single-view validation batches.

    One optimizer, SGD or LARS (You et al., "Large Batch Training of Convolutional Networks", arXiv:1708.03888, as
    :class:`timm.optim.Lars`): the method's parameters at ``lr``, the probe at ``probe_lr`` without weight decay,
    all with linear warmup then cosine decay sized from ``trainer.estimated_stepping_batches``; the child modules
    named by :meth:`constant_lr_modules` keep ``lr`` throughout (SimSiam's predictor). Biases and normalization
    parameters get no weight decay and, with LARS, no trust-ratio adaptation (as in BYOL and solo-learn); the probe
    is never adapted either.

    Args:
        backbone: a network with ``forward_features`` and ``num_features`` (every :mod:`lit_methods.nets` backbone);
            its classifier is removed (``reset_classifier(0)``).
        num_classes: classes of the monitors (filled from the datamodule by the CLI).
        lr: peak learning rate of the method's parameters.
        momentum: SGD momentum.
        weight_decay: weight decay of the method's parameters (none on biases and norm parameters).
        warmup_steps: linear warmup, in optimizer steps (int) or as a fraction of all steps (float).
        probe_lr: learning rate of the linear probe.
        knn_k: neighbours of the kNN monitor.
        knn_temperature: vote temperature of the kNN monitor.
        optimizer: ``"sgd"`` or ``"lars"``.
        lars_trust_coefficient: LARS trust coefficient ``eta``: the adapted rate of a weight tensor ``w`` is
            ``lr * eta * |w| / (|g| + weight_decay * |w|)`` (BYOL: 1e-3; solo-learn's CIFAR configs: 0.02).
        lars_clip: LARC clipping (solo-learn's ``clip_lr``): the trust ratio is ``min(ratio / lr, 1)``.
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
        optimizer: Literal["sgd", "lars"] = "sgd",
        lars_trust_coefficient: float = 1e-3,
        lars_clip: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        drop_object_hyperparameters(self)
        if not (hasattr(backbone, "forward_features") and hasattr(backbone, "reset_classifier")):
            raise ValueError(
                f"{type(backbone).__name__} needs forward_features and reset_classifier (a lit_methods.nets backbone)"
            )
        if lr <= 0 or probe_lr <= 0:
            raise ValueError(f"learning rates must be > 0, got lr={lr}, probe_lr={probe_lr}")
        if isinstance(warmup_steps, float) and not 0.0 <= warmup_steps < 1.0:
            raise ValueError(f"warmup_steps as a fraction must lie in [0, 1), got {warmup_steps}")
        if optimizer not in ("sgd", "lars"):
            raise ValueError(f"optimizer must be 'sgd' or 'lars', got {optimizer!r}")
        if lars_trust_coefficient <= 0:
            raise ValueError(f"lars_trust_coefficient must be > 0, got {lars_trust_coefficient}")
        backbone.reset_classifier(0)
        self.backbone = backbone
        self.num_features: int = backbone.num_features
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.warmup_steps = warmup_steps
        self.probe_lr = probe_lr
        self.optimizer_name = optimizer
        self.lars_trust_coefficient = lars_trust_coefficient
        self.lars_clip = lars_clip
        self.probe = OnlineLinearProbe(self.num_features, num_classes)
        self.probe_val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.knn = WeightedKNNClassifier(num_classes, k=knn_k, temperature=knn_temperature)

    def forward(self, x: Tensor) -> Tensor:
        """Pooled backbone features."""
        return self.backbone.forward_features(x)

    def ssl_loss(self, views: list[Tensor], features: list[Tensor]) -> Tensor:
        """The method's objective from the views and their backbone features (``features[i] = self(views[i])``)."""
        raise NotImplementedError

    def constant_lr_modules(self) -> tuple[str, ...]:
        """Names of child modules whose learning rate stays at ``lr`` (no warmup or decay); none by default."""
        return ()

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

    def configure_optimizers(self) -> Any:
        constant = set(self.constant_lr_modules())
        unknown = (constant - {name for name, _ in self.named_children()}) | (constant & {"probe"})
        if unknown:
            raise ValueError(f"constant_lr_modules names {sorted(unknown)}, which are not method child modules")
        scheduled = nn.ModuleList(module for name, module in self.named_children() if name not in constant | {"probe"})
        groups = [{**group, "scheduled": True} for group in self._decay_groups(scheduled)]
        for name in sorted(constant):
            groups += [{**group, "scheduled": False} for group in self._decay_groups(getattr(self, name))]
        groups.append(
            {"params": list(self.probe.parameters()), "weight_decay": 0.0, "lr": self.probe_lr, "scheduled": True}
        )
        if self.optimizer_name == "lars":
            # timm adapts a group when its weight decay is non-zero or always_adapt is set: the weights are adapted
            # whatever weight_decay is; biases, norm parameters and the probe have zero decay and no flag
            for group in groups:
                group["always_adapt"] = group.pop("lars_adapt", False)
            optimizer: torch.optim.Optimizer = Lars(
                groups,
                lr=self.lr,
                momentum=self.momentum,
                trust_coeff=self.lars_trust_coefficient,
                trust_clip=self.lars_clip,
            )
        else:
            for group in groups:
                group.pop("lars_adapt", None)
            optimizer = torch.optim.SGD(groups, lr=self.lr, momentum=self.momentum)
        total = int(self.trainer.estimated_stepping_batches)
        warmup = round(self.warmup_steps * total) if isinstance(self.warmup_steps, float) else self.warmup_steps
        cosine = WarmupCosine(warmup, total)
        factors = [cosine if group["scheduled"] else constant_lr_factor for group in optimizer.param_groups]
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def _decay_groups(self, module: nn.Module) -> list[dict[str, Any]]:
        """``module``'s weights (decayed, LARS-adapted) and its biases and norm parameters (neither)."""
        decay, no_decay = parameter_groups(module, self.weight_decay, exclude_norm_and_bias=True)
        return [{**decay, "lars_adapt": True}, no_decay]
