"""Offline evaluation of a self-supervised backbone: a linear classifier and a weighted kNN on frozen features (the
linear evaluation protocol of Zhang et al., "Colorful Image Colorization", arXiv:1603.08511, as used by SimCLR,
arXiv:2002.05709, and every later SSL paper)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lit_methods.base import MethodBase, drop_object_hyperparameters
from lit_methods.datamodules.batch import as_batch
from lit_methods.ssl.monitors import WeightedKNNClassifier

__all__ = ["LinearEvaluation"]


class LinearEvaluation(MethodBase):
    """A linear classifier trained on the frozen features of a self-supervised backbone, plus a weighted kNN.

    The backbone architecture is given as ``backbone`` (from the CLI by ``class_path``, like the SSL method's) and its
    weights are read from ``ssl_checkpoint``'s ``backbone.*`` entries, strictly, when training or evaluation starts
    (:meth:`setup`, or :meth:`load_backbone` outside a Trainer; a checkpoint of this module already holds them and
    skips the read, so ``load_from_checkpoint`` does not need the SSL checkpoint). Rebuilding the
    backbone from the SSL checkpoint's hyper-parameters is not reliable: a backbone built in Python is not saved
    there (see :func:`~lit_methods.base.drop_object_hyperparameters`), while the explicit architecture works for
    every checkpoint, in Python and from a config, and a mismatch fails loudly.

    The backbone stays in eval mode (BN running statistics frozen) and receives no gradient; only the linear head
    is trained, by default with SGD and a cosine decay to 0 over ``trainer.estimated_stepping_batches`` (lightly's
    ``LinearClassifier``; solo-learn steps the rate at 60% and 80% instead), or with the injected ``optimizer`` and
    ``lr_scheduler`` (:class:`~lit_methods.base.MethodBase`). Top-1 accuracy is logged as
    ``val/acc`` and ``test/acc``. The kNN monitor (``val/knn_acc``) votes with the features of the training batches
    of the current epoch as its bank (lightly's ``KNNClassifier``: the frozen backbone makes them the training set's
    features, under its training augmentation).

    Args:
        backbone: the architecture of the SSL method's backbone (its classifier is removed).
        ssl_checkpoint: path of a checkpoint of any :class:`~lit_methods.ssl.SSLMethod` subclass.
        num_classes: classes of the labelled data (filled from the datamodule by the CLI).
        lr: learning rate of the linear head (0.1 at batch 256 in solo-learn and lightly).
        momentum: SGD momentum.
        weight_decay: weight decay of the linear head (0 in the standard protocol).
        knn_k: neighbours of the kNN evaluation.
        knn_temperature: vote temperature of the kNN evaluation.
        optimizer: replaces the default SGD; called with the head's parameter groups (``class_path`` from the CLI).
        lr_scheduler: replaces the cosine decay; called with the optimizer and stepped every optimizer step.
        mean: per-channel normalization mean of the data (filled from the datamodule by the CLI).
        std: per-channel normalization standard deviation of the data (filled from the datamodule by the CLI).
        inputs_normalized: ``False`` when batches are [0, 1] pixels: the model normalizes them with ``mean`` and
            ``std`` first.
    """

    slug: ClassVar[str] = "linear-eval"

    def __init__(
        self,
        backbone: nn.Module,
        ssl_checkpoint: str,
        num_classes: int = 10,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
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
            exclude_norm_and_bias_from_weight_decay=False,
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
        if not ssl_checkpoint:
            raise ValueError("ssl_checkpoint must be the path of an SSLMethod checkpoint, got an empty string")
        backbone.reset_classifier(0)
        self.backbone = backbone.requires_grad_(False).eval()
        self.ssl_checkpoint = ssl_checkpoint
        self.head = nn.Linear(backbone.num_features, num_classes)
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.knn = WeightedKNNClassifier(num_classes, k=knn_k, temperature=knn_temperature)
        # saved with the module: a checkpoint of this module holds the SSL weights already
        self.register_buffer("backbone_loaded", torch.tensor(False))

    def setup(self, stage: str) -> None:
        self.load_backbone()

    def load_backbone(self) -> None:
        """Read the SSL backbone weights (once: a restored checkpoint of this module has them)."""
        if not self.backbone_loaded:
            self.load_pretrained_weights(self.ssl_checkpoint, {"backbone.": "backbone."}, strict=True)
            self.backbone_loaded.fill_(True)

    def train(self, mode: bool = True) -> LinearEvaluation:
        """Switch the head's mode; the frozen backbone stays in eval mode."""
        super().train(mode)
        self.backbone.eval()
        return self

    def features(self, images: Tensor) -> Tensor:
        with torch.no_grad():
            return self.backbone.forward_features(self.normalize_inputs(images))

    def forward(self, images: Tensor) -> Tensor:
        """Class logits of the linear head on the frozen features."""
        return self.head(self.features(images))

    def _images_and_targets(self, batch: Any) -> tuple[Tensor, Tensor]:
        batch = as_batch(batch)
        images, targets = batch.get("inputs"), batch["targets"]
        if not isinstance(images, Tensor):
            raise TypeError("linear evaluation needs single-view batches: set the datamodule's ssl_views=0")
        return images, targets

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        images, targets = self._images_and_targets(batch)
        features = self.features(images)
        loss = F.cross_entropy(self.head(features), targets)
        self.knn.update(bank_features=features, bank_targets=targets)
        self.log("train/loss", loss, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        images, targets = self._images_and_targets(batch)
        features = self.features(images)
        logits = self.head(features)
        self.val_acc.update(logits, targets)
        self.log("val/loss", F.cross_entropy(logits, targets), on_epoch=True)
        self.log("val/acc", self.val_acc, on_step=False, on_epoch=True)
        self.knn.update(test_features=features, test_targets=targets)

    def on_validation_epoch_end(self) -> None:
        if len(self.knn.bank_features):  # the sanity check runs before any training batch filled the bank
            self.log("val/knn_acc", self.knn.compute())
        self.knn.reset()

    def on_train_epoch_start(self) -> None:
        self.knn.reset()

    def test_step(self, batch: Any, batch_idx: int) -> None:
        images, targets = self._images_and_targets(batch)
        self.test_acc.update(self(images), targets)
        self.log("test/acc", self.test_acc, on_step=False, on_epoch=True)
