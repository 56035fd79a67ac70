"""SimSiam (Chen & He, "Exploring Simple Siamese Representation Learning", https://arxiv.org/abs/2011.10566)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from lit_methods.losses.negative_cosine import NegativeCosineLoss
from lit_methods.ssl.base import SSLMethod
from lit_methods.ssl.hallucinator import optional_hallucinator

__all__ = ["SimSiam", "simsiam_predictor", "simsiam_projector"]


def simsiam_projector(in_features: int, hidden_features: int, out_features: int, layers: int) -> nn.Sequential:
    """SimSiam's projection MLP: ``layers - 1`` blocks of Linear (no bias), BN, ReLU, then Linear (no bias: a BN
    follows) and a BN without affine parameters on the output."""
    if layers not in (2, 3):
        raise ValueError(f"projection_layers must be 2 or 3, got {layers}")
    blocks: list[nn.Module] = []
    width = in_features
    for _ in range(layers - 1):
        blocks += [nn.Linear(width, hidden_features, bias=False), nn.BatchNorm1d(hidden_features), nn.ReLU()]
        width = hidden_features
    blocks += [nn.Linear(width, out_features, bias=False), nn.BatchNorm1d(out_features, affine=False)]
    return nn.Sequential(*blocks)


def simsiam_predictor(features: int, hidden_features: int) -> nn.Sequential:
    """SimSiam's bottleneck prediction MLP: Linear (no bias), BN, ReLU, Linear back to ``features``."""
    return nn.Sequential(
        nn.Linear(features, hidden_features, bias=False),
        nn.BatchNorm1d(hidden_features),
        nn.ReLU(),
        nn.Linear(hidden_features, features),
    )


class SimSiam(SSLMethod):
    """Symmetric negative cosine between each view's prediction ``p = h(z)`` and the other view's projection ``z``
    under a stop-gradient; no negatives, no momentum encoder.

    With two views the loss is ``D(p1, z2) / 2 + D(p2, z1) / 2`` (the paper's Eq. 2); with more views (multi-crop)
    it is the mean of ``D(p_i, z_j)`` over all ordered pairs ``i != j``, which reduces to the paper's for two.

    Following the official code (facebookresearch/simsiam) rather than the paper's prose, the projector's linear
    layers have no bias (each is followed by BN) and its output BN has no affine parameters. The paper's
    ablation (Table 1) keeps the predictor's learning rate fixed while the rest decays: ``fixed_predictor_lr``
    puts the predictor in a parameter group that stays at ``lr`` without warmup or decay (solo-learn's
    ``static_lr``). Unlike the official code, biases and BN parameters get no weight decay (the base's rule).

    CIFAR (the paper's appendix): ResNet-18 CIFAR variant, SGD lr ``0.03 * batch / 256`` with batch 512, weight
    decay 5e-4, momentum 0.9, 800 epochs, cosine decay; the CIFAR projector has 2 layers (as PatrickHua/SimSiam's
    CIFAR config reads the appendix; solo-learn keeps 3) of width 2048 and the predictor's hidden layer is 512.

    Args:
        projection_hidden_dim: hidden width of the projector (2048).
        projection_dim: output width of the projector and the predictor (2048).
        projection_layers: linear layers of the projector: 3 (ImageNet) or 2 (the paper's CIFAR setting).
        prediction_hidden_dim: bottleneck width of the predictor (512).
        fixed_predictor_lr: keep the predictor's learning rate at ``lr`` (no warmup, no cosine decay).
        hallucinator: add the :class:`~lit_methods.ssl.hallucinator.Hallucinator`'s extra positives (Wu et al.,
            https://arxiv.org/abs/2307.12168), two views only: as in the official code, ``p1 -> [p1; H(p1, p2)]``
            and ``p2 -> [p2; H(p2, p1)]`` (both from the original predictions), against the targets ``[z2; z2]``
            and ``[z1; z1]``. Off (the default), the method is plain SimSiam.
        hallucinator_max_ratio: upper end of the Hallucinator's extrapolation ratio range (0.1).
        **kwargs: the arguments of :class:`~lit_methods.ssl.SSLMethod`.
    """

    slug: ClassVar[str] = "simsiam"

    def __init__(
        self,
        backbone: nn.Module,
        projection_hidden_dim: int = 2048,
        projection_dim: int = 2048,
        projection_layers: int = 3,
        prediction_hidden_dim: int = 512,
        fixed_predictor_lr: bool = True,
        hallucinator: bool = False,
        hallucinator_max_ratio: float = 0.1,
        **kwargs: Any,
    ) -> None:
        super().__init__(backbone, **kwargs)
        if min(projection_hidden_dim, projection_dim, prediction_hidden_dim) < 1:
            raise ValueError(
                "widths must be >= 1, got projection_hidden_dim="
                f"{projection_hidden_dim}, projection_dim={projection_dim}, prediction_hidden_dim={prediction_hidden_dim}"
            )
        self.projector = simsiam_projector(self.num_features, projection_hidden_dim, projection_dim, projection_layers)
        self.predictor = simsiam_predictor(projection_dim, prediction_hidden_dim)
        self.fixed_predictor_lr = fixed_predictor_lr
        self.loss_fn = NegativeCosineLoss()
        self.hallucinator = optional_hallucinator(projection_dim, hallucinator, hallucinator_max_ratio)

    def param_group_options(self) -> dict[str, dict[str, Any]]:
        """With ``fixed_predictor_lr`` the predictor's groups keep the base rate (no warmup or decay)."""
        fixed = {"predictor": {"scheduled": False}} if self.fixed_predictor_lr else {}
        return fixed | super().param_group_options()

    def ssl_loss(self, views: list[Tensor], features: list[Tensor]) -> Tensor:
        projections = [self.projector(f) for f in features]
        predictions = [self.predictor(z) for z in projections]
        if self.hallucinator is not None:
            if len(views) != 2:
                raise ValueError(f"the hallucinator option takes two views, got {len(views)}")
            (p1, p2), (z1, z2) = predictions, projections
            predictions = [self.hallucinator.extend(p1, p2)[0], self.hallucinator.extend(p2, p1)[0]]
            projections = [torch.cat([z1, z1]), torch.cat([z2, z2])]
        pairs = [(i, j) for i in range(len(views)) for j in range(len(views)) if i != j]
        return sum(self.loss_fn(predictions[i], projections[j]) for i, j in pairs) / len(pairs)
