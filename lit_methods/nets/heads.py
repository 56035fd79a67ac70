"""Fixed (untrained) projection heads: the reweighting head of Xue, Gan, Ni, Joshi & Mirzasoleiman, "Investigating
the Benefits of Projection Head for Representation Learning" (ICLR 2024, https://arxiv.org/abs/2403.11391), shared by
the self-supervised study (:class:`lit_methods.ssl.ProjectionHeadStudy`) and the supervised classifier
(:class:`lit_methods.supervised.ProjectionHeadClassifier`)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["FixedReweightHead"]


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
