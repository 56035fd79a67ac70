"""Mixed Barlow Twins (Bandara, De Melo, Patel, "Guarding Barlow Twins Against Overfitting with Mixed Samples",
https://arxiv.org/abs/2312.02151)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_methods.losses.mixed_barlow_twins import MixedBarlowTwinsRegularizer
from lit_methods.ssl.barlow_twins import BarlowTwins

__all__ = ["MixedBarlowTwins", "PROJECTORS", "mix_bt_projector"]

PROJECTORS = ("barlow_twins", "mix_bt")


def mix_bt_projector(in_features: int, hidden_features: int, out_features: int) -> nn.Sequential:
    """The official small-dataset projector of Mixed Barlow Twins (``wgcban/mix-bt``, ``model.py``): two layers,
    ``Linear(in, hidden, bias=False) - BatchNorm1d - ReLU - Linear(hidden, out)`` with a bias on the output layer."""
    return nn.Sequential(
        nn.Linear(in_features, hidden_features, bias=False),
        nn.BatchNorm1d(hidden_features),
        nn.ReLU(),
        nn.Linear(hidden_features, out_features, bias=True),
    )


class MixedBarlowTwins(BarlowTwins):
    """Barlow Twins plus the mixed-sample regularizer: each step mixes the two views,
    ``y_m = alpha * y_a + (1 - alpha) * y_b[perm]`` with one ``alpha ~ Beta(mix_beta, mix_beta)`` and a random
    permutation ``perm`` of the batch, embeds ``y_m`` with one more forward pass, and adds
    ``mix_reg_weight * lambda_offdiag *`` :class:`~lit_methods.losses.mixed_barlow_twins.MixedBarlowTwinsRegularizer`
    to the Barlow Twins loss. ``mix_reg_weight=0`` is Barlow Twins exactly (no mixed forward, no random draw).

    Follows the official small-dataset code (``wgcban/mix-bt``, ``main.py``): ``Beta(1, 1)``, mixing of the
    normalized view tensors, targets not detached, weight ``lambda_reg * lambda_BT`` (the ImageNet script's extra
    factor 0.5 and warmup of the weight are not used). Under DDP each rank mixes within its own batch and draws its
    own ``alpha``; with ``gather_distributed`` the regularizer is computed over the global batch.

    Args:
        mix_reg_weight: the paper's ``lambda_reg`` (4.0 for CIFAR and TinyImageNet, 2.0 for STL-10); 0 turns the
            regularizer off.
        mix_beta: both parameters of the Beta distribution of ``alpha`` (1.0: uniform, as the paper).
        projector: ``"barlow_twins"`` (default), Barlow Twins' 3-layer projector without biases; ``"mix_bt"``, the
            official CIFAR/STL/TinyImageNet projector of :func:`mix_bt_projector` (2 layers, output bias), both of
            widths ``projection_hidden_dim`` and ``projection_dim``.
        l2_normalize_projections: L2-normalize each projection before the losses, as the official CIFAR code's
            model does (the Barlow Twins term then differs from plain Barlow Twins).
        **kwargs: the arguments of :class:`~lit_methods.ssl.BarlowTwins` (``lambda_offdiag`` is ``lambda_BT``,
            ``gather_distributed`` applies to both terms) and :class:`~lit_methods.ssl.SSLMethod`.
    """

    slug: ClassVar[str] = "mixed-barlow-twins"

    def __init__(
        self,
        backbone: nn.Module,
        mix_reg_weight: float = 4.0,
        mix_beta: float = 1.0,
        projector: Literal["barlow_twins", "mix_bt"] = "barlow_twins",
        l2_normalize_projections: bool = False,
        **kwargs: Any,
    ) -> None:
        if projector not in PROJECTORS:
            raise ValueError(f"projector must be one of {PROJECTORS}, got {projector!r}")
        if mix_reg_weight < 0:
            raise ValueError(f"mix_reg_weight must be >= 0, got {mix_reg_weight}")
        if mix_beta <= 0:
            raise ValueError(f"mix_beta must be > 0, got {mix_beta}")
        super().__init__(backbone, **kwargs)
        if projector == "mix_bt":
            hidden_features, out_features = self.projector[0].out_features, self.projector[-1].out_features
            self.projector = mix_bt_projector(self.num_features, hidden_features, out_features)
        self.mix_reg_weight = mix_reg_weight
        self.mix_beta = mix_beta
        self.l2_normalize_projections = l2_normalize_projections
        self.mix_loss_fn = MixedBarlowTwinsRegularizer(gather_distributed=self.loss_fn.gather_distributed)

    def sample_mixing(self, batch_size: int, device: torch.device) -> tuple[float, Tensor]:
        """One mixing coefficient ``alpha ~ Beta(mix_beta, mix_beta)`` and a permutation of the batch."""
        concentration = torch.tensor(self.mix_beta, dtype=torch.float64)
        alpha = float(torch.distributions.Beta(concentration, concentration).sample())
        return alpha, torch.randperm(batch_size, device=device)

    def project(self, features: Tensor) -> Tensor:
        z = self.projector(features)
        return F.normalize(z, dim=1) if self.l2_normalize_projections else z

    def ssl_loss(self, views: list[Tensor], features: list[Tensor]) -> Tensor:
        z_a, z_b = (self.project(f) for f in features[:2])
        loss = self.loss_fn(z_a, z_b)
        if self.mix_reg_weight == 0:
            return loss
        y_a, y_b = views[0], views[1]
        alpha, perm = self.sample_mixing(len(y_a), y_a.device)
        z_mixed = self.project(self(alpha * y_a + (1 - alpha) * y_b[perm]))
        regularizer = self.mix_loss_fn(z_mixed, z_a, z_b, perm, alpha)
        self.log_dict({"train/bt_loss": loss, "train/mix_reg": regularizer}, on_step=True)
        return loss + self.mix_reg_weight * self.loss_fn.lambda_offdiag * regularizer
