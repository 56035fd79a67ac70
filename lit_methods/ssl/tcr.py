"""TCR pretraining, the first stage of MLC (Ding, Tong, Chan, Dai, Ma, Haeffele, "Unsupervised Manifold
Linearizing and Clustering", ICCV 2023, https://arxiv.org/abs/2301.01805)."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from lit_methods.losses.total_coding_rate import TotalCodingRateLoss
from lit_methods.ssl.base import SSLMethod

__all__ = ["TCRPretrain", "coding_rate_head"]


def coding_rate_head(
    in_features: int, hidden_features: int, out_features: int, batch_norm: bool = True
) -> nn.Sequential:
    """The feature (and cluster) head of TCR and MLC: Linear, BatchNorm, ReLU, Linear.

    With ``batch_norm=False`` the BatchNorm is an ``nn.Identity`` (MoCo v2's projector, Linear-ReLU-Linear, whose
    weights then load into layers 0 and 3)."""
    if hidden_features < 1 or out_features < 1:
        raise ValueError(f"head widths must be >= 1, got hidden_dim={hidden_features}, feature_dim={out_features}")
    return nn.Sequential(
        nn.Linear(in_features, hidden_features),
        nn.BatchNorm1d(hidden_features) if batch_norm else nn.Identity(),
        nn.ReLU(),
        nn.Linear(hidden_features, out_features),
    )


class TCRPretrain(SSLMethod):
    """Total-coding-rate self-supervised pretraining: maximise the coding rate of the view-averaged features plus
    ``lambda`` times the agreement of the views (:class:`~lit_methods.losses.total_coding_rate.TotalCodingRateLoss`)
    over ``normalize(feature_head(backbone(view)))``.

    Its checkpoint is what :class:`~lit_methods.ssl.mlc.MLC` starts from (``MLC(pretrained_checkpoint=...)`` or
    ``MLC.from_pretrained(tcr)``): the backbone and the feature head are copied, and the feature head also into
    MLC's cluster head, so the head arguments here must match MLC's. The paper's appendix (eps, lambda, head width)
    was not available and no official code was found: the defaults are MCR^2's ``eps^2 = 0.5`` and ``lambda = 1``
    (with the agreement averaged over images; untuned: it gave MLC a start that beats k-means on digits,
    ``tests/ssl/test_mlc_digits.py``).

    Args:
        hidden_dim: hidden width of the feature head (Linear-BN-ReLU-Linear).
        feature_dim: output width ``d`` of the feature head (128 in the paper).
        eps: coding-rate precision.
        invariance_weight: ``lambda``, weight of the mean cosine agreement between the views of an image.
        **kwargs: the arguments of :class:`~lit_methods.ssl.SSLMethod`.
    """

    def __init__(
        self,
        backbone: nn.Module,
        hidden_dim: int = 2048,
        feature_dim: int = 128,
        eps: float = 0.5**0.5,
        invariance_weight: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(backbone, **kwargs)
        self.feature_head = coding_rate_head(self.num_features, hidden_dim, feature_dim)
        self.loss_fn = TotalCodingRateLoss(eps, invariance_weight)

    def ssl_loss(self, views: list[Tensor], features: list[Tensor]) -> Tensor:
        return self.loss_fn([self.feature_head(f) for f in features])
