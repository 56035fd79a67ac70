"""Total coding rate (TCR) self-supervised objective, MLC's first stage (Ding, Tong, Chan, Dai, Ma, Haeffele,
"Unsupervised Manifold Linearizing and Clustering", ICCV 2023, https://arxiv.org/abs/2301.01805; the objective of
NMCE, Li, Gao, Tong, Ma, "Neural Manifold Clustering and Embedding", https://arxiv.org/abs/2201.10000).

With ``A`` views ``z^(1..A)`` of ``n`` images (unit rows, ``(n, d)``) and their average ``zbar = mean_a z^(a)``:

    loss = -( R(zbar) + lambda * mean_i mean_{a < b} <z_i^(a), z_i^(b)> )

``R`` is MCR^2's coding rate ``1/2 logdet(I + d / (n eps^2) zbar^T zbar)`` (:func:`lit_methods.losses.mcr2.
coding_rate`): spreading the averaged features over all ``d`` directions (no collapse) while the views of an image
agree. The paper writes the agreement as ``lambda * sum_i z_i^T z_i'`` for two views; we average over images (and
over view pairs for ``A > 2``), so ``lambda`` does not scale with the batch size (our ``lambda`` is the paper's
times ``n``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_methods.losses.mcr2 import coding_rate

__all__ = ["TotalCodingRateLoss"]


class TotalCodingRateLoss(nn.Module):
    """``-(R(mean_a z^(a)) + lambda * view agreement)`` of L2-normalised projections of ``A >= 2`` views.

    The projections are L2-normalised here (each row onto the unit sphere); the rate is computed in at least fp32
    with autocast off (``logdet`` is unreliable in half precision). Batch-local: under DDP every rank codes its own
    batch (nothing is gathered), as MLC's rates are per-device minibatch quantities.

    Args:
        eps: coding-rate precision (``eps^2 = 0.5`` is MCR^2's usual choice).
        invariance_weight: ``lambda``, the weight of the mean cosine agreement between the views of an image.
    """

    def __init__(self, eps: float = 0.5**0.5, invariance_weight: float = 1.0) -> None:
        super().__init__()
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if invariance_weight < 0:
            raise ValueError(f"invariance_weight must be >= 0, got {invariance_weight}")
        self.eps = eps
        self.invariance_weight = invariance_weight

    def forward(self, projections: Sequence[Tensor]) -> Tensor:
        if len(projections) < 2:
            raise ValueError(f"the total coding rate needs >= 2 views, got {len(projections)}")
        shapes = {tuple(p.shape) for p in projections}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise ValueError(f"views must all be (N, D) of one shape, got {sorted(shapes)}")
        with torch.autocast(projections[0].device.type, enabled=False):
            views = torch.stack([F.normalize(p if p.dtype == torch.float64 else p.float(), dim=1) for p in projections])
            rate = coding_rate(views.mean(0), self.eps)
            first, second = torch.triu_indices(len(views), len(views), offset=1)
            agreement = (views[first] * views[second]).sum(-1).mean()
            return -(rate + self.invariance_weight * agreement)
