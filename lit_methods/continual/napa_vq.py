"""NAPA-VQ: Neighborhood-Aware Prototype Augmentation with Vector Quantization for exemplar-free class-incremental
learning (Malepathirana, Senanayake, Halgamuge, ICCV 2023, arXiv:2308.09297; official code ``TamashaM/NAPA-VQ``).

Every (rotation-augmented) class owns a learnable code vector (CV) in feature space; training minimises the
cross-entropy of negative Euclidean distances to the CVs (DCE, temperature ``T``). A neural-gas graph over the CVs
(:func:`update_edges`) records which classes neighbour each other, and drives

* the neighbourhood-aware loss (:func:`na_loss`): a hinge pushing each feature closer to its own CV than to a
  distance-weighted mix of its class's graph neighbours;
* NA-PA, from the second task on: pseudo-features of old classes, an old class's prototype (mean feature) moved
  toward the prototype of a random graph neighbour, ``gamma * p_c + (1 - gamma) * p_n`` with ``gamma ~ U(0.5, 1)``,
  trained with DCE and the NA loss under the old class's label;
* feature distillation from the frozen model of the previous task (``||F_new(x) - F_old(x)||``, the Frobenius norm
  over the batch, not averaged, as the official code).

Old CVs get no update after their task (their gradient is zeroed before the plain-SGD step). Labels are augmented
with the four 90-degree rotations as in PASS: image ``x`` rotated by ``k * 90`` degrees has label ``4 y + k``;
inference uses the rotation-0 CVs only, with L2-normalised features and CVs (training uses raw distances).

Following the official code where the card differs: the graph is pruned below ``edge_min`` *before* it is
symmetrised (so a symmetrised entry may be smaller than ``edge_min`` until its next update), a class's neighbours
in the NA loss come from the updated, not yet symmetrised graph, and the prototypes of a new task's classes are first
computed with the previous model before the task (NA-PA may interpolate toward them), then with the trained model
after it. Deviation: prototypes are means over the task's un-augmented training images (the official code reads its
augmented training loader).

The task sequence runs as one fit over a :class:`~lit_methods.datamodules.continual.ClassIncrementalDataModule`
(:mod:`lit_methods.continual.base`); each task restarts Adam (lr ``lr``, then ``lr * incremental_lr_factor``) and the
CVs' SGD rate (``cv_lr``, then times the same factor), each with its own step decay counted in the task's epochs. The
CV step is written out (plain SGD, no state), so one Lightning optimizer (Adam over the backbone) counts the steps.
Under DDP the graph is averaged over the processes after each step and the prototype sums are all-reduced.
"""

from __future__ import annotations

import copy
import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_methods.base import drop_object_hyperparameters
from lit_methods.continual.base import ContinualMethod, backbone_features
from lit_methods.datamodules.batch import as_batch

__all__ = ["NAPAVQ", "na_loss", "neighbourhood_prototypes", "rotate_with_labels", "update_edges"]

ROTATIONS = 4


def rotate_with_labels(images: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Each image in its four 90-degree rotations (``(N, C, H, W) -> (4N, C, H, W)``, rotations of one image next to
    each other) with the labels ``4 y + k``."""
    rotated = torch.stack([torch.rot90(images, k, (2, 3)) for k in range(ROTATIONS)], 1).flatten(0, 1)
    labels = (targets.unsqueeze(1) * ROTATIONS + torch.arange(ROTATIONS, device=targets.device)).flatten()
    return rotated, labels


@torch.no_grad()
def update_edges(edges: Tensor, distances: Tensor, neighbours: int, decay: float, edge_min: float) -> Tensor:
    """One neural-gas update of the CV graph from a batch's feature-to-CV ``distances`` ``(N, A)``.

    For each sample, its nearest CV (the winner) gets edges of strength 1 to its ``neighbours`` nearest CVs (itself
    included); every other edge of the winner decays by ``decay`` per sample it won in the batch (an edge set
    ``s`` times by ``w`` wins decays ``max(w - s, 0)`` times, as the official code orders the batch). Edges below
    ``edge_min`` are cut. Returns the new, not yet symmetrised ``(A, A)`` graph.
    """
    num_cvs = edges.shape[0]
    k = min(neighbours, num_cvs)
    nearest = distances.topk(k, dim=1, largest=False).indices
    winners = nearest[:, 0]
    wins = torch.zeros(num_cvs, dtype=edges.dtype, device=edges.device).index_add_(
        0, winners, torch.ones_like(winners, dtype=edges.dtype)
    )
    set_counts = torch.zeros_like(edges)
    rows = winners.unsqueeze(1).expand_as(nearest)
    set_counts.index_put_((rows.reshape(-1), nearest.reshape(-1)), torch.ones(nearest.numel(), dtype=edges.dtype,
                          device=edges.device), accumulate=True)
    updated = torch.maximum(edges, (set_counts > 0).to(edges.dtype))
    decays = (wins.unsqueeze(1) - set_counts).clamp(min=0)
    updated = updated * decay**decays
    return updated * (updated >= edge_min)


def na_loss(features: Tensor, labels: Tensor, code_vectors: Tensor, edges: Tensor, scale: float = 0.001) -> Tensor:
    """The neighbourhood-aware hinge: ``mean ReLU(d+ - sum_j a_j d-_j)`` with ``d+`` the squared distance to the
    label's CV, ``d-_j`` those to the CVs ``j != y`` with ``edges[y, j] > 0`` and ``a = softmax(-scale * d-)`` over
    those neighbours (detached). A sample whose class has no neighbour contributes ``d+``."""
    squared = torch.cdist(features, code_vectors).pow(2)
    positive = squared.gather(1, labels.unsqueeze(1)).squeeze(1)
    is_neighbour = edges[labels] > 0
    is_neighbour[torch.arange(len(labels), device=labels.device), labels] = False
    logits = (-scale * squared.detach()).masked_fill(~is_neighbour, -math.inf)
    weights = torch.softmax(logits, dim=1).nan_to_num(0.0)  # rows without neighbours: all weights 0
    negative = (weights * squared.masked_fill(~is_neighbour, 0.0)).sum(dim=1)
    return F.relu(positive - negative).mean()


def neighbourhood_prototypes(
    prototypes: Tensor, edges: Tensor, classes: Tensor, gammas: Tensor, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """NA-PA pseudo-features: for each CV index in ``classes`` a random neighbour ``n`` (``edges[c, n] > 0``, itself
    included, as the official code) and ``gamma * p_c + (1 - gamma) * p_n``; returns the features and the
    neighbours."""
    weights = (edges[classes] > 0).float()
    chosen = torch.multinomial(weights, 1, generator=generator).squeeze(1)
    gammas = gammas.unsqueeze(1)
    return gammas * prototypes[classes] + (1 - gammas) * prototypes[chosen], chosen


class NAPAVQ(ContinualMethod):
    """NAPA-VQ (see the module doc) on any backbone with pooled features.

    Args:
        backbone: the feature extractor (``forward_features`` of a net of :mod:`lit_methods.nets`, the paper a
            ResNet-18 with CBAM as PASS); its classifier is removed (``reset_classifier(0)``) where it has one.
        num_classes: classes of the stream (filled from the datamodule by the CLI).
        num_features: feature dimension (default ``backbone.num_features``; the paper 512).
        image_size: input height and width (filled by the CLI; the rotations need square images).
        rotations: the four-rotation label augmentation of PASS (4 CVs per class); off: one CV per class.
        temperature: DCE temperature ``T`` (0.1).
        na_weight: weight of the NA loss (1; 0 with ``pa_weight=kd_weight=0`` is plain fine-tuning with DCE).
        pa_weight: weight of the NA-PA cross-entropy, ``lambda_pa`` (10).
        kd_weight: weight of the feature distillation, ``lambda_kd`` (10).
        neighbours: graph neighbours ``k`` set per winner (15).
        edge_decay: decay ``epsilon`` of a winner's other edges (0.9).
        edge_min: edges below it are cut (``0.9 ** 10``).
        lr: Adam learning rate of the backbone in the first task (1e-3).
        incremental_lr_factor: both rates are multiplied by it from the second task on (0.1).
        weight_decay: Adam's weight decay (2e-4).
        lr_step_epochs: the backbone's rate decays by ``lr_gamma`` every so many epochs of a task (45).
        cv_lr: SGD rate of the CVs in the first task (5).
        cv_lr_step_epochs: the CVs' rate decays by ``lr_gamma`` every so many epochs of a task (20).
        lr_gamma: step decay factor (0.1).
        mean, std, inputs_normalized: input normalization (see :class:`~lit_methods.base.MethodBase`).
    """

    slug: ClassVar[str] = "napa-vq"

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int | None = None,
        num_features: int | None = None,
        image_size: tuple[int, int] | None = None,
        rotations: bool = True,
        temperature: float = 0.1,
        na_weight: float = 1.0,
        pa_weight: float = 10.0,
        kd_weight: float = 10.0,
        neighbours: int = 15,
        edge_decay: float = 0.9,
        edge_min: float = 0.9**10,
        lr: float = 1e-3,
        incremental_lr_factor: float = 0.1,
        weight_decay: float = 2e-4,
        lr_step_epochs: int = 45,
        cv_lr: float = 5.0,
        cv_lr_step_epochs: int = 20,
        lr_gamma: float = 0.1,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        inputs_normalized: bool = True,
    ) -> None:
        super().__init__(
            num_classes=num_classes,
            lr=lr,
            weight_decay=weight_decay,
            lr_schedule="constant",
            mean=mean,
            std=std,
            inputs_normalized=inputs_normalized,
        )
        self.save_hyperparameters()
        drop_object_hyperparameters(self)
        if num_features is None:
            num_features = getattr(backbone, "num_features", None)
            if not isinstance(num_features, int):
                raise ValueError("num_features was not given and the backbone has no integer `num_features` attribute")
        if rotations and image_size is not None and image_size[0] != image_size[1]:
            raise ValueError(f"rotations=True turns images by 90 degrees: they must be square, got {tuple(image_size)}")
        for name, value in (("temperature", temperature), ("cv_lr", cv_lr), ("edge_decay", edge_decay)):
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        for name, value in (("na_weight", na_weight), ("pa_weight", pa_weight), ("kd_weight", kd_weight)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if not 0 < edge_decay < 1 or not 0 <= edge_min <= 1:
            raise ValueError(f"edge_decay must lie in (0, 1) and edge_min in [0, 1], got {edge_decay} and {edge_min}")
        if neighbours < 1 or lr_step_epochs < 1 or cv_lr_step_epochs < 1:
            raise ValueError(
                f"neighbours, lr_step_epochs and cv_lr_step_epochs must be >= 1, got {neighbours}, {lr_step_epochs}, "
                f"{cv_lr_step_epochs}"
            )
        if not 0 < incremental_lr_factor <= 1 or not 0 < lr_gamma <= 1:
            raise ValueError(
                f"incremental_lr_factor and lr_gamma must lie in (0, 1], got {incremental_lr_factor} and {lr_gamma}"
            )
        self.automatic_optimization = False
        reset_classifier = getattr(backbone, "reset_classifier", None)
        if reset_classifier is not None:
            reset_classifier(0)  # the code vectors classify: the backbone's own classifier would get no gradient
        self.backbone = backbone
        self.old_backbone = copy.deepcopy(backbone).requires_grad_(False).eval()
        self.per_class = ROTATIONS if rotations else 1
        self.rotations = rotations
        self.temperature = temperature
        self.na_weight, self.pa_weight, self.kd_weight = na_weight, pa_weight, kd_weight
        self.neighbours, self.edge_decay, self.edge_min = neighbours, edge_decay, edge_min
        self.incremental_lr_factor = incremental_lr_factor
        self.lr_step_epochs, self.cv_lr, self.cv_lr_step_epochs, self.lr_gamma = (
            lr_step_epochs, cv_lr, cv_lr_step_epochs, lr_gamma
        )
        num_cvs = num_classes * self.per_class
        self.code_vectors = nn.Parameter(torch.randn(num_cvs, num_features))
        self.register_buffer("edges", torch.eye(num_cvs))
        self.register_buffer("prototypes", torch.zeros(num_cvs, num_features))
        self.register_buffer("old_classes", torch.tensor(0, dtype=torch.long))
        self._cv_lr_now = cv_lr

    def train(self, mode: bool = True) -> NAPAVQ:
        super().train(mode)
        self.old_backbone.eval()  # the previous task's model is frozen
        return self

    # -- pieces -----------------------------------------------------------------------------------------------
    def features(self, inputs: Tensor, backbone: nn.Module | None = None) -> Tensor:
        return backbone_features(self.backbone if backbone is None else backbone, self.normalize_inputs(inputs))

    @property
    def active_cvs(self) -> int:
        return int(self.seen_classes) * self.per_class

    def predict_classes(self, inputs: Tensor) -> Tensor:
        """Nearest rotation-0 CV of a seen class, features and CVs L2-normalised."""
        features = F.normalize(self.features(inputs), dim=1)
        cvs = F.normalize(self.code_vectors[: self.active_cvs : self.per_class].detach(), dim=1)
        return torch.cdist(features, cvs).argmin(dim=1)

    def forward(self, inputs: Tensor) -> Tensor:
        """Negative distances of the normalised features to the normalised rotation-0 CVs of every class."""
        features = F.normalize(self.features(inputs), dim=1)
        return -torch.cdist(features, F.normalize(self.code_vectors[:: self.per_class], dim=1))

    def graph_loss(self, features: Tensor, labels: Tensor) -> Tensor:
        """NA loss after a graph update (the update is stored, symmetrised)."""
        active = self.active_cvs
        cvs = self.code_vectors[:active]
        pruned = update_edges(
            self.edges[:active, :active], torch.cdist(features.detach(), cvs.detach()), self.neighbours,
            self.edge_decay, self.edge_min,
        )
        loss = na_loss(features, labels, cvs, pruned)
        self.edges[:active, :active] = (pruned + pruned.T) / 2
        return loss

    def dce(self, features: Tensor, labels: Tensor) -> Tensor:
        logits = -torch.cdist(features, self.code_vectors[: self.active_cvs])
        return F.cross_entropy(logits / self.temperature, labels)

    # -- tasks ------------------------------------------------------------------------------------------------
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.backbone.parameters(), lr=self.lr, weight_decay=self.weight_decay)

    @torch.no_grad()
    def compute_prototypes(self, task: int) -> None:
        """Mean features (per rotated class) of ``task``'s un-augmented training images with the current backbone,
        summed over the processes."""
        stream = self.stream()
        was_training = self.backbone.training
        self.backbone.eval()
        sums = torch.zeros_like(self.prototypes, dtype=torch.float64)
        counts = torch.zeros(len(sums), dtype=torch.float64, device=self.device)
        for batch in stream.task_loader(task, train=True):
            inputs = stream.to_inputs(batch["inputs"].to(self.device))
            targets = batch["targets"].to(self.device)
            if self.rotations:
                inputs, targets = rotate_with_labels(inputs, targets)
            sums.index_add_(0, targets, self.features(inputs).double())
            counts.index_add_(0, targets, torch.ones_like(targets, dtype=torch.float64))
        self.backbone.train(was_training)
        sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
        seen = counts > 0
        self.prototypes[seen] = (sums[seen] / counts[seen].unsqueeze(1)).to(self.prototypes.dtype)

    def begin_task(self, task: int) -> None:
        stream = self.stream()
        self.old_classes.fill_(stream.tasks[task].start)
        optimizer = self.optimizers().optimizer
        optimizer.state.clear()  # each task trains with a fresh Adam, as the official code
        if task > 0:
            self.old_backbone.load_state_dict(self.backbone.state_dict())
            self.compute_prototypes(task)  # new classes, previous model: NA-PA may interpolate toward them

    def end_task(self, task: int) -> None:
        self.compute_prototypes(task)

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        stream = self.stream()
        epoch_in_task = self.current_epoch - int(self.task) * stream.epochs_per_task
        factor = self.incremental_lr_factor if int(self.task) > 0 else 1.0
        for group in self.optimizers().optimizer.param_groups:
            group["lr"] = self.lr * factor * self.lr_gamma ** (epoch_in_task // self.lr_step_epochs)
        self._cv_lr_now = self.cv_lr * factor * self.lr_gamma ** (epoch_in_task // self.cv_lr_step_epochs)

    # -- training ---------------------------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        batch = as_batch(batch)
        inputs, targets = batch["inputs"], batch["targets"]
        if self.rotations:
            inputs, targets = rotate_with_labels(inputs, targets)
        features = self.features(inputs)
        loss_dce = self.dce(features, targets)
        loss_na = self.graph_loss(features, targets) if self.na_weight else features.new_zeros(())
        loss = loss_dce + self.na_weight * loss_na
        old = int(self.old_classes)
        if old > 0 and (self.kd_weight or self.pa_weight):
            with torch.no_grad():
                old_features = self.features(inputs, self.old_backbone)
            loss_kd = torch.linalg.norm(features - old_features)
            draws = len(batch["targets"])
            classes = torch.randint(0, old, (draws,), device=self.device) * self.per_class
            gammas = torch.empty(draws, device=self.device).uniform_(0.5, 1.0)
            augmented, _ = neighbourhood_prototypes(
                self.prototypes[: self.active_cvs], self.edges[: self.active_cvs, : self.active_cvs], classes, gammas
            )
            loss_pa = self.dce(augmented, classes)
            if self.na_weight:
                loss = loss + self.na_weight * self.graph_loss(augmented, classes)
            loss = loss + self.pa_weight * loss_pa + self.kd_weight * loss_kd
            self.log_dict({"train/loss_kd": loss_kd, "train/loss_pa": loss_pa}, on_step=True, on_epoch=False)
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.code_vectors.grad = None
        self.manual_backward(loss)
        if self.code_vectors.grad is not None:
            self.code_vectors.grad[: old * self.per_class] = 0  # old CVs stay where their task left them
        optimizer.step()
        with torch.no_grad():
            if self.code_vectors.grad is not None:
                self.code_vectors -= self._cv_lr_now * self.code_vectors.grad
        self.code_vectors.grad = None
        if self.trainer.world_size > 1:
            self.edges.copy_(self.trainer.strategy.reduce(self.edges, reduce_op="mean"))
        self.log_dict(
            {"train/loss": loss, "train/loss_dce": loss_dce, "train/loss_na": loss_na},
            on_step=True, on_epoch=False, prog_bar=True,
        )
        return loss.detach()
