"""The projection-head study of Xue, Gan, Ni, Joshi & Mirzasoleiman, "Investigating the Benefits of Projection Head for
Representation Learning" (ICLR 2024, https://arxiv.org/abs/2403.11391).

SimCLR trained with a choice of head (MLP, linear, none, or the paper's fixed reweighting head), and the evaluation of
the representation at every depth from the pre-projection features to the post-projection output. The paper shows
that features become increasingly unequally weighted with depth, so the pre-projection layer is less specialised to
the training loss; it proposes the fixed diagonal reweighting head as an interpretable alternative to an MLP head.
There is no official repository; the reweighting head follows ``ReweightProjectionHead`` of the authors' SpuCo fork
(weights ``kappa ** -i``, not trained), kept here as a buffer rather than a frozen parameter. The objective is SimCLR's
NT-Xent or the spectral contrastive loss of the paper's analysis
(:class:`~lit_methods.losses.spectral_contrastive.SpectralContrastiveLoss`). The paper's supervised setting is
:class:`lit_methods.supervised.ProjectionHeadClassifier`. :func:`effective_rank` measures how unequally a layer
weights its directions, and :mod:`lit_methods.ssl.projection_head_theory` replicates the linear-model theory.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from lit_methods.datamodules.batch import as_batch
from lit_methods.losses import NTXentLoss
from lit_methods.losses.spectral_contrastive import SpectralContrastiveLoss
from lit_methods.nets.heads import FixedReweightHead
from lit_methods.ssl.base import SSLMethod
from lit_methods.ssl.monitors import WeightedKNNClassifier

__all__ = [
    "ProjectionHeadStudy",
    "effective_rank",
    "knn_accuracy_by_depth",
]

HEADS = ("mlp", "linear", "none", "reweight")
LOSSES = ("ntxent", "spectral")


def effective_rank(features: Tensor) -> float:
    """``exp`` of the Shannon entropy of the normalized singular values of the ``(N, D)`` feature matrix.

    Roy & Vetterli, "The effective rank: a measure of effective dimensionality" (EUSIPCO 2007); RankMe (Garrido et
    al., arXiv:2210.02885) uses it on SSL embeddings. It lies in ``[1, min(N, D)]``: ``k`` equal non-zero singular
    values give ``k``, and weighting directions unequally lowers it. The features are not centred.
    """
    if features.dim() != 2 or min(features.shape) < 1:
        raise ValueError(f"expected an (N, D) feature matrix with N, D >= 1, got shape {tuple(features.shape)}")
    singular_values = torch.linalg.svdvals(features.double())
    total = singular_values.sum()
    if total == 0:
        raise ValueError("the effective rank of an all-zero feature matrix is undefined")
    distribution = singular_values / total
    entropy = -torch.special.xlogy(distribution, distribution).sum()
    return float(entropy.exp())


class ProjectionHeadStudy(SSLMethod):
    """SimCLR-style training of two views through the head under study; downstream use takes the pre-projection
    features.

    The head is a sequence of stages; :meth:`features_by_depth` returns the representation before the head
    (``"pre_projection"``), after each intermediate stage (``"head_layer_1"``, ...) and after the head
    (``"post_projection"``), and :func:`knn_accuracy_by_depth` evaluates each of them.

    * ``"mlp"``: Linear - ReLU - Linear (SimCLR's head); depths pre_projection, head_layer_1 (after the ReLU),
      post_projection.
    * ``"linear"``: one Linear; depths pre_projection, post_projection.
    * ``"reweight"``: :class:`FixedReweightHead` with ``kappa``; depths pre_projection, post_projection.
    * ``"none"``: the loss is applied to the backbone features themselves; post_projection equals pre_projection.

    Args:
        head: the head's kind (above).
        projection_hidden_dim: hidden width of the ``"mlp"`` head.
        projection_dim: output width of the ``"mlp"`` and ``"linear"`` heads (the others keep the backbone width).
        kappa: decay of the ``"reweight"`` head's weights (with the paper's d = 512 useful values lie near 1).
        loss: ``"ntxent"`` (SimCLR's NT-Xent on the head's output) or ``"spectral"`` (the spectral contrastive loss
            of HaoChen et al. 2021, arXiv:2106.04156, the loss of the paper's theory).
        temperature: NT-Xent temperature (0.5 on CIFAR); only for ``loss="ntxent"``.
        mu: norm bound of the spectral loss (official code: 1; ``None``: the unbounded loss of the analysis); only
            for ``loss="spectral"``.
        gather_distributed: under DDP, take negatives from every rank's batch.
        **kwargs: the arguments of :class:`~lit_methods.ssl.SSLMethod`.
    """

    slug: ClassVar[str] = "projection-head"

    def __init__(
        self,
        backbone: nn.Module,
        head: Literal["mlp", "linear", "none", "reweight"] = "mlp",
        projection_hidden_dim: int = 2048,
        projection_dim: int = 128,
        kappa: float = 1.01,
        loss: Literal["ntxent", "spectral"] = "ntxent",
        temperature: float = 0.5,
        mu: float | None = 1.0,
        gather_distributed: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(backbone, **kwargs)
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        if projection_hidden_dim < 1 or projection_dim < 1:
            raise ValueError(f"projection widths must be >= 1, got {projection_hidden_dim}, {projection_dim}")
        self.head = head
        stages: list[nn.Module] = []
        if head == "mlp":
            stages = [
                nn.Sequential(nn.Linear(self.num_features, projection_hidden_dim), nn.ReLU()),
                nn.Linear(projection_hidden_dim, projection_dim),
            ]
        elif head == "linear":
            stages = [nn.Linear(self.num_features, projection_dim)]
        elif head == "reweight":
            stages = [FixedReweightHead(self.num_features, kappa)]
        self.projector = nn.Sequential(*stages)
        self.loss_fn: nn.Module
        if loss == "ntxent":
            self.loss_fn = NTXentLoss(temperature, gather_distributed=gather_distributed)
        else:
            self.loss_fn = SpectralContrastiveLoss(mu, gather_distributed=gather_distributed)

    @property
    def depth_names(self) -> list[str]:
        """Names of the evaluated depths, from the backbone output to the head's output."""
        intermediate = [f"head_layer_{i}" for i in range(1, len(self.projector))]
        return ["pre_projection", *intermediate, "post_projection"]

    def features_by_depth(self, images: Tensor) -> dict[str, Tensor]:
        """The representation of ``images`` at each of :attr:`depth_names`."""
        representation = self(images)
        outputs = [representation]
        for stage in self.projector:
            representation = stage(representation)
            outputs.append(representation)
        if len(self.projector) == 0:  # no head: the loss sees the pre-projection features
            outputs.append(representation)
        return dict(zip(self.depth_names, outputs))

    def ssl_loss(self, views: list[Tensor], features: list[Tensor]) -> Tensor:
        z1, z2 = (self.projector(f) for f in features[:2])
        return self.loss_fn(z1, z2)


@torch.no_grad()
def _inputs_and_targets(batch: Any, device: torch.device) -> tuple[Tensor, Tensor]:
    batch = as_batch(batch)
    return batch["inputs"].to(device), batch["targets"].to(device)


def knn_accuracy_by_depth(
    model: ProjectionHeadStudy,
    bank_batches: Iterable[Any],
    query_batches: Iterable[Any],
    k: int = 200,
    temperature: float = 0.1,
) -> dict[str, float]:
    """Weighted kNN top-1 accuracy of the representation at every depth of ``model`` (in eval mode).

    Args:
        model: the trained (or untrained) study module.
        bank_batches: labelled single-view batches (named fields, or ``(images, targets)`` tuples) forming the
            kNN bank (e.g. the un-augmented training split).
        query_batches: labelled batches to classify (e.g. the test split).
        k: neighbours of the vote.
        temperature: vote temperature (``exp(cos / temperature)`` weights, the monitors' kNN).

    Returns:
        ``{depth name: accuracy in [0, 1]}`` for every name of ``model.depth_names``.
    """
    was_training = model.training
    model.eval()
    try:
        metrics = {
            name: WeightedKNNClassifier(model.probe.classifier.out_features, k=k, temperature=temperature)
            for name in model.depth_names
        }
        for batch in bank_batches:
            images, targets = _inputs_and_targets(batch, model.device)
            for name, features in model.features_by_depth(images).items():
                metrics[name].update(bank_features=features.cpu(), bank_targets=targets.cpu())
        for batch in query_batches:
            images, targets = _inputs_and_targets(batch, model.device)
            for name, features in model.features_by_depth(images).items():
                metrics[name].update(test_features=features.cpu(), test_targets=targets.cpu())
        return {name: float(metric.compute()) for name, metric in metrics.items()}
    finally:
        model.train(was_training)
