"""The Hallucinator (Wu, Hobbs & Hovakimyan, "Hallucination Improves the Performance of Unsupervised Visual
Representation Learning", ICCV 2023, https://arxiv.org/abs/2307.12168): extra positives generated in embedding space.

Integration in a two-view SSL method, between its head and its loss (a few lines; see :meth:`Hallucinator.extend`)::

    anchors, references = hallucinator.extend(anchors, references)   # (2N, d) each: [a; h] paired with [r; r]
    loss = loss_fn(anchors, references)

The module is trained only through the SSL loss (the official code adds no regulariser of its own) and is unused at
evaluation: the backbone's features never pass through it.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

__all__ = ["Hallucinator", "optional_hallucinator"]


class Hallucinator(nn.Module):
    """Generates one extra positive per anchor from the anchor ``a`` and its positive reference ``r`` (both ``(N, d)``).

    1. Asymmetric extrapolation (the paper's mutual-information reduction): ``e = (1 + lam) a - lam r`` moves the
       anchor away from its positive, with one ``lam ~ U(0, max_ratio)`` per call;
    2. Non-linear smoothing: ``h = MLP([a; e])`` with ``Linear(2d, H) - ReLU - Linear(H, H) - ReLU - Linear(H, d)``.

    As in the official code (``models/generator.py``, ``moco.py``, ``simsiam.py``, ``simclr_generator.py``), the
    anchor is the raw head output (MoCo: the query before L2 normalisation, SimSiam: the predictor output) and no
    tensor is detached here: gradients reach the generator, the anchor and (where it has one) the reference.

    Args:
        dim: width ``d`` of the anchors and references.
        hidden_dim: hidden width ``H`` of the MLP; ``None`` uses ``2 * dim`` (official: 256 for MoCo/SimCLR's 128,
            1024 for SimSiam's 512).
        max_ratio: upper end of the extrapolation ratio's uniform range (official: 0.1).
    """

    slug: ClassVar[str] = "hallucinator"

    def __init__(self, dim: int, hidden_dim: int | None = None, max_ratio: float = 0.1) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        hidden_dim = 2 * dim if hidden_dim is None else hidden_dim
        if hidden_dim < 1:
            raise ValueError(f"hidden_dim must be >= 1, got {hidden_dim}")
        if not max_ratio > 0:
            raise ValueError(f"max_ratio must be > 0, got {max_ratio}")
        self.dim = dim
        self.max_ratio = max_ratio
        self.smoothing = nn.Sequential(
            nn.Linear(2 * dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, dim),
        )

    def sample_ratio(self) -> float:
        """One extrapolation ratio ``lam ~ U(0, max_ratio)`` from torch's global generator (seeded runs repeat)."""
        return float(torch.rand(()) * self.max_ratio)

    @staticmethod
    def extrapolate(anchors: Tensor, references: Tensor, ratio: float) -> Tensor:
        """``(1 + ratio) * anchors - ratio * references``: each anchor pushed away from its positive."""
        return (1 + ratio) * anchors - ratio * references

    def forward(self, anchors: Tensor, references: Tensor, ratio: float | None = None) -> Tensor:
        """The hallucinated positives ``(N, d)``; ``ratio=None`` draws one with :meth:`sample_ratio`."""
        if anchors.shape != references.shape or anchors.dim() != 2 or anchors.shape[1] != self.dim:
            raise ValueError(
                f"expected anchors and references of equal shape (N, {self.dim}), "
                f"got {tuple(anchors.shape)} and {tuple(references.shape)}"
            )
        ratio = self.sample_ratio() if ratio is None else ratio
        extrapolated = self.extrapolate(anchors, references, ratio)
        return self.smoothing(torch.cat([anchors, extrapolated], dim=1))

    def extend(self, anchors: Tensor, references: Tensor, ratio: float | None = None) -> tuple[Tensor, Tensor]:
        """The pairs to feed the loss: ``([anchors; hallucinated], [references; references])``, ``(2N, d)`` each.

        Row ``i`` of the first ``N`` rows is the anchor unchanged; row ``N + i`` is its hallucinated positive, whose
        partner is the same reference as the anchor's. A method whose targets are not the references (SimSiam:
        the projections ``z``) duplicates its targets itself and keeps the first output only.
        """
        hallucinated = self(anchors, references, ratio)
        return torch.cat([anchors, hallucinated]), torch.cat([references, references])


def optional_hallucinator(dim: int, enabled: bool, max_ratio: float) -> Hallucinator | None:
    """The generator of a method's ``hallucinator`` option: ``None`` when off (no parameters, no random draws);
    ``max_ratio`` (the method's ``hallucinator_max_ratio``) is checked either way."""
    if not max_ratio > 0:
        raise ValueError(f"hallucinator_max_ratio must be > 0, got {max_ratio}")
    return Hallucinator(dim, max_ratio=max_ratio) if enabled else None
