"""The projection-head study of Xue, Gan, Ni, Joshi & Mirzasoleiman, "Investigating the Benefits of Projection Head for
Representation Learning" (ICLR 2024, https://arxiv.org/abs/2403.11391).

SimCLR trained with a choice of head (MLP, linear, none, or the paper's fixed reweighting head), and the evaluation of
the representation at every depth from the pre-projection features to the post-projection output. The paper shows
that features become increasingly unequally weighted with depth, so the pre-projection layer is less specialised to
the training loss; it proposes the fixed diagonal reweighting head as an interpretable alternative to an MLP head.
There is no official repository; the reweighting head follows ``ReweightProjectionHead`` of the authors' SpuCo fork
(weights ``kappa ** -i``, not trained), kept here as a buffer rather than a frozen parameter. The objective is SimCLR's
NT-Xent or the spectral contrastive loss of the paper's analysis
(:class:`~lit_methods.losses.spectral_contrastive.SpectralContrastiveLoss`). :class:`ProjectionHeadClassifier` is the
paper's supervised setting (the head between backbone and linear classifier, bypassed in the evaluated features, as
``SpuCoModel`` of the fork). :func:`effective_rank` measures how unequally a layer weights its directions, and
:mod:`lit_methods.ssl.projection_head_theory` replicates the linear-model theory.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from lit_methods.base import ImageClassifier
from lit_methods.losses import NTXentLoss
from lit_methods.losses.spectral_contrastive import SpectralContrastiveLoss
from lit_methods.ssl.base import SSLMethod
from lit_methods.ssl.monitors import WeightedKNNClassifier

__all__ = [
    "FixedReweightHead",
    "ProjectionHeadClassifier",
    "ProjectionHeadStudy",
    "effective_rank",
    "knn_accuracy_by_depth",
]

HEADS = ("mlp", "linear", "none", "reweight")
SUPERVISED_HEADS = ("mlp", "none", "reweight")
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


class FixedReweightHead(nn.Module):
    """``h(r) = r * w`` with the fixed weights ``w_i = kappa ** -i``, ``i = 0 .. dim - 1`` (a buffer, never trained).

    ``kappa = 1`` is the identity (training without a head); ``kappa > 1`` lets the loss weight the first dimensions
    more than the last ones while the representation ``r`` itself stays evenly weighted.

    Args:
        dim: width of the representation.
        kappa: decay factor, ``>= 1``; the smallest weight ``kappa ** -(dim - 1)`` must stay a normal float32 number
            (a larger ``kappa`` would silently zero the last dimensions).
    """

    weights: Tensor

    def __init__(self, dim: int, kappa: float) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if not kappa >= 1.0:
            raise ValueError(f"kappa must be >= 1, got {kappa}")
        weights = torch.tensor(float(kappa), dtype=torch.float64) ** -torch.arange(dim, dtype=torch.float64)
        if weights[-1] < torch.finfo(torch.float32).tiny:
            raise ValueError(
                f"kappa={kappa} underflows float32 for dim={dim}: the last weight kappa**-{dim - 1} = "
                f"{float(weights[-1]):.3g}; use a kappa closer to 1"
            )
        self.kappa = kappa
        self.register_buffer("weights", weights.float())

    def forward(self, representation: Tensor) -> Tensor:
        return representation * self.weights


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


class ProjectionHeadClassifier(ImageClassifier):
    """The paper's supervised setting: ``classifier(head(f(x)))`` trained with cross-entropy; the head is bypassed in
    the evaluated representation.

    The head sits between the backbone's pooled features ``f(x)`` and a linear classifier, and keeps their width (as
    ``SpuCoModel`` of the authors' SpuCo fork, whose ``use_ph`` flag bypasses it). Training always goes through the
    head. :meth:`forward_features` returns the pre-projection representation ``f(x)`` that downstream evaluation
    (linear probes, kNN) uses; the validation/test logits go through the head unless ``evaluate_with_head=False``,
    then they are ``classifier(f(x))`` (the fork's ``use_ph=False``).

    * ``"reweight"``: :class:`FixedReweightHead` with ``kappa`` (the paper's proposal).
    * ``"mlp"``: Linear - ReLU - Linear back to the backbone width.
    * ``"none"``: the classifier sits on ``f(x)`` (the plain classifier).

    Args:
        backbone: a :mod:`lit_methods.nets` backbone (``forward_features``, ``num_features``, ``reset_classifier``);
            its own classifier is removed.
        head: the head's kind (above).
        kappa: decay of the ``"reweight"`` head's weights.
        projection_hidden_dim: hidden width of the ``"mlp"`` head.
        evaluate_with_head: validation/test/predict logits through the head (True) or bypassing it (False).
        **kwargs: the arguments of :class:`~lit_methods.ImageClassifier` (``num_classes`` is required or taken from
            the backbone).
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: Literal["mlp", "none", "reweight"] = "reweight",
        kappa: float = 1.01,
        projection_hidden_dim: int = 2048,
        evaluate_with_head: bool = True,
        **kwargs: Any,
    ) -> None:
        if not all(hasattr(backbone, name) for name in ("forward_features", "reset_classifier", "num_features")):
            raise ValueError(
                f"{type(backbone).__name__} needs forward_features, num_features and reset_classifier "
                "(a lit_methods.nets backbone)"
            )
        if head not in SUPERVISED_HEADS:
            raise ValueError(f"head must be one of {SUPERVISED_HEADS}, got {head!r}")
        if projection_hidden_dim < 1:
            raise ValueError(f"projection_hidden_dim must be >= 1, got {projection_hidden_dim}")
        super().__init__(backbone, **kwargs)
        self.backbone.reset_classifier(0)
        width: int = backbone.num_features
        self.head_kind = head
        self.evaluate_with_head = evaluate_with_head
        self.projector: nn.Module
        if head == "mlp":
            self.projector = nn.Sequential(
                nn.Linear(width, projection_hidden_dim), nn.ReLU(), nn.Linear(projection_hidden_dim, width)
            )
        elif head == "reweight":
            self.projector = FixedReweightHead(width, kappa)
        else:
            self.projector = nn.Identity()
        self.classifier = nn.Linear(width, self.num_classes)

    @torch.no_grad()
    def check_backbone_output(self) -> None:
        """Construction-time check that the backbone's pooled features have ``num_features`` entries."""
        was_training = self.backbone.training
        self.backbone.eval()
        try:
            out = self.backbone.forward_features(torch.zeros(2, self.in_channels, *self.image_size))
        finally:
            self.backbone.train(was_training)
        if out.shape != (2, self.backbone.num_features):
            raise ValueError(
                f"the backbone's forward_features gives shape {tuple(out.shape[1:])} per sample, but its num_features "
                f"is {self.backbone.num_features}"
            )

    def forward_features(self, x: Tensor) -> Tensor:
        """The pre-projection representation ``f(x)`` (the head bypassed), for downstream evaluation."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.backbone.forward_features(x)

    def forward(self, x: Tensor) -> Tensor:
        """Logits: through the head in training (and in evaluation when ``evaluate_with_head``), else bypassing it."""
        features = self.forward_features(x)
        if self.training or self.evaluate_with_head:
            features = self.projector(features)
        return self.classifier(features)


@torch.no_grad()
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
        bank_batches: labelled ``(images, targets, ...)`` single-view batches forming the kNN bank (e.g. the
            un-augmented training split).
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
            images, targets = batch[0].to(model.device), batch[1].to(model.device)
            for name, features in model.features_by_depth(images).items():
                metrics[name].update(bank_features=features.cpu(), bank_targets=targets.cpu())
        for batch in query_batches:
            images, targets = batch[0].to(model.device), batch[1].to(model.device)
            for name, features in model.features_by_depth(images).items():
                metrics[name].update(test_features=features.cpu(), test_targets=targets.cpu())
        return {name: float(metric.compute()) for name, metric in metrics.items()}
    finally:
        model.train(was_training)
