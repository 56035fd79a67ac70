"""OTOv2: train once with DHSPG over zero-invariant groups, then build the slim network automatically.

Chen et al., "OTOv2: Automatic, Generic, User-Friendly", ICLR 2023, https://arxiv.org/abs/2303.06862. The groups come
from torch-pruning's dependency graph (instead of the official ONNX tracing); DHSPG is
:class:`lit_methods.pruning.DHSPG`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from lit_methods.base import ImageClassifier
from lit_methods.compression.common import example_inputs, log_sparsity
from lit_methods.pruning.dhspg import DHSPG
from lit_methods.pruning.structured import channel_groups, export_pruned

__all__ = ["OTOv2"]


class OTOv2(ImageClassifier):
    """One-shot structured pruning: DHSPG zeroes whole zero-invariant groups (ZIGs) during training, and the slim
    network without them computes the same function (Chen et al., https://arxiv.org/abs/2303.06862).

    ZIGs are the channels of the backbone's coupled channel groups (torch-pruning's dependency graph: a conv's
    filter, its bias, the BN scale and shift of that channel, and the same for every partner of a residual add or a
    concatenation). The optimizer is :class:`~lit_methods.pruning.DHSPG` (SGD direction with momentum and weight
    decay; warm-up, partition, group-lasso shrinking and half-space projection stages); the module's ``lr_schedule``
    scales its learning rate. :meth:`export_compressed` returns the physically smaller backbone (its logits equal the
    dense model's up to rounding); with ``export_path`` it is saved at the end of training. Logged per epoch:
    ``otov2/group_sparsity`` (share of exactly-zero ZIGs), ``otov2/omega`` (sum of ZIG norms) and the zero share of
    each channel group (``otov2/channels/*`` and a bar-chart PNG next to the logs).

    Args:
        backbone: a network torch-pruning can trace.
        target_group_sparsity: share of ZIGs to zero, in (0, 1) (official tutorials: 0.8 for ResNet-50).
        tolerance: extra share of ZIGs in the redundant set (official VGG-16: 0.21).
        partition_step: optimizer steps before the partition (official: ``start_pruning_steps``, 10 epochs).
        projection_step: first optimizer step of half-space projection.
        lmbda: base group-lasso coefficient (official: 1e-3; VGG-16 5e-4).
        lmbda_amplify: amplification of the adaptive coefficient (official 1.1).
        hat_lmbda_coeff: cap of the adaptive coefficient as a multiple of ``lmbda`` (official 10).
        epsilon: half-space projection threshold in [0, 1) (official 0.95 for ResNet-50, 0.9 for VGG-16).
        nesterov: must stay False (DHSPG's momentum is heavy-ball).
        ignored_layers: backbone module names whose outputs are never pruned (default ``["fc"]`` when there is one).
        export_path: file the slim network is saved to (``torch.save``) at the end of training.
        **kwargs: the arguments of :class:`~lit_methods.ImageClassifier` (``lr``, ``momentum``, ``weight_decay``
            and the schedule configure DHSPG; a custom ``optimizer`` and ``nesterov=True`` are refused).
    """

    slug: ClassVar[str] = "otov2"

    def __init__(
        self,
        backbone: nn.Module,
        target_group_sparsity: float = 0.5,
        tolerance: float = 0.0,
        partition_step: int = 1000,
        projection_step: int = 2000,
        lmbda: float = 1e-3,
        lmbda_amplify: float = 1.1,
        hat_lmbda_coeff: float = 10.0,
        epsilon: float = 0.95,
        nesterov: bool = False,
        ignored_layers: list[str] | None = None,
        export_path: str | None = None,
        **kwargs: Any,
    ) -> None:
        if not 0.0 < target_group_sparsity < 1.0:
            raise ValueError(f"target_group_sparsity must lie in (0, 1), got {target_group_sparsity}")
        if kwargs.get("optimizer") is not None:
            raise ValueError("OTOv2 trains with its own optimizer (DHSPG): leave optimizer unset")
        if nesterov:
            raise ValueError("DHSPG uses heavy-ball momentum: nesterov must be False, got True")
        super().__init__(backbone, nesterov=False, **kwargs)
        if ignored_layers is None:
            ignored_layers = ["fc"] if isinstance(getattr(backbone, "fc", None), nn.Module) else []
        self.ignored_layers = list(ignored_layers)
        self.export_path = export_path
        self.example_inputs = example_inputs(self.in_channels, self.image_size, type(self).__name__)
        self.groups = channel_groups(backbone, self.example_inputs, self.ignored_layers)
        self.dhspg_options = dict(
            target_group_sparsity=target_group_sparsity,
            tolerance=tolerance,
            partition_step=partition_step,
            projection_step=projection_step,
            lmbda=lmbda,
            lmbda_amplify=lmbda_amplify,
            hat_lmbda_coeff=hat_lmbda_coeff,
            epsilon=epsilon,
        )
        # refuse bad DHSPG settings at construction, not at fit
        DHSPG([p for p in backbone.parameters()], self.groups, dict(backbone.named_parameters()), lr=self.lr,
              **self.dhspg_options)

    def make_default_optimizer(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        return DHSPG(
            params,
            self.groups,
            dict(self.backbone.named_parameters()),
            lr=self.lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            **self.dhspg_options,
        )

    def zero_masks(self) -> dict[str, Tensor]:
        """Per channel group (by root layer name), which channels are exactly zero (every out-side slice)."""
        params = dict(self.backbone.named_parameters())
        return {group.root: group.channel_norms(params) == 0 for group in self.groups}

    def group_sparsity(self) -> float:
        """Share of ZIGs whose parameters are all exactly zero."""
        masks = list(self.zero_masks().values())
        return float(sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks))

    def on_train_epoch_end(self) -> None:
        params = dict(self.backbone.named_parameters())
        self.log("otov2/group_sparsity", self.group_sparsity())
        self.log("otov2/omega", float(sum(group.channel_norms(params).sum() for group in self.groups)))
        log_sparsity(self, {root: float(m.float().mean()) for root, m in self.zero_masks().items()}, "otov2/channels")

    def on_train_end(self) -> None:
        if self.export_path is not None and self.trainer.is_global_zero:
            Path(self.export_path).parent.mkdir(parents=True, exist_ok=True)
            torch.save(self.export_compressed(), self.export_path)

    def export_compressed(self) -> nn.Module:
        """The backbone without its exactly-zero ZIGs (a plain ``nn.Module`` in eval mode)."""
        keep = {root: ~zero for root, zero in self.zero_masks().items()}
        return export_pruned(self.backbone, self.example_inputs.to(self.device), keep, self.ignored_layers)
