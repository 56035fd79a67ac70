"""Pieces shared by the compression family: per-layer sparsity logged as scalars and as a bar-chart PNG, and the
per-layer weight masks of the unstructured methods."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from torch import Tensor, nn

from lit_methods.pruning.report import save_sparsity_bar_chart

__all__ = ["MaskedLayers", "example_inputs", "log_sparsity", "save_sparsity_figure"]


def log_sparsity(module: L.LightningModule, sparsity: Mapping[str, float], tag: str) -> str | None:
    """Log ``sparsity`` (layer -> pruned share) of ``module``: its mean as ``<tag>/mean``, each layer as
    ``<tag>/<layer>``, and, on rank 0 of a run with a logger, a bar chart ``<log dir>/<tag>_epoch<E>.png`` (also
    sent to wandb when a logger is a ``WandbLogger``). Returns the PNG's path (``None`` when none is written)."""
    if not sparsity:
        return None
    values = list(sparsity.values())
    module.log(f"{tag}/mean", sum(values) / len(values), sync_dist=False)
    for name, value in sparsity.items():
        module.log(f"{tag}/{name}", value, sync_dist=False)
    trainer = module._trainer
    if trainer is None:
        return None
    return save_sparsity_figure(trainer, sparsity, tag)


def save_sparsity_figure(trainer: L.Trainer, sparsity: Mapping[str, float], tag: str) -> str | None:
    """On rank 0 of a run with a logger, the bar chart of ``sparsity`` as ``<log dir>/<tag>_epoch<E>.png``, also sent
    to wandb when a logger is a ``WandbLogger``; returns its path (``None`` when none is written)."""
    if not trainer.loggers or not trainer.is_global_zero:
        return None
    folder = trainer.log_dir or trainer.default_root_dir
    path = os.path.join(folder, f"{tag.replace('/', '_')}_epoch{trainer.current_epoch}.png")
    save_sparsity_bar_chart(sparsity, path, title=f"{tag}, epoch {trainer.current_epoch}")
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=f"{tag}/per_layer", images=[path], step=trainer.global_step)
    return path



def example_inputs(in_channels: int | None, image_size: tuple[int, int] | None, method: str) -> Tensor:
    """A zero batch of one image for tracing the backbone; a ``ValueError`` when the data's shape is not known."""
    if in_channels is None or image_size is None:
        raise ValueError(
            f"{method} traces the backbone on an example input: give in_channels and image_size (the CLI links them "
            f"from the datamodule), got in_channels={in_channels}, image_size={image_size}"
        )
    return torch.zeros(1, in_channels, *image_size)


class MaskedLayers:
    """Mixin of the modules that prune ``backbone`` weights unstructured: one mask buffer per pruned layer (in
    ``self.masks`` as ``layer0``, ``layer1``, ...; so checkpoints hold the masks), all ones at the start. Pruned
    weights stay zero in training: their gradients are masked before each optimizer step and the masks re-applied
    after each batch (momentum gathered before a pruning would otherwise move them)."""

    backbone: nn.Module
    layer_names: list[str]
    masks: nn.Module

    def init_masks(self, layer_names: Sequence[str]) -> None:
        """Masks of ones for the backbone layers named ``layer_names`` (call once, in ``__init__``)."""
        modules = dict(self.backbone.named_modules())
        self.layer_names = list(layer_names)
        self.masks = nn.Module()
        for i, name in enumerate(self.layer_names):
            self.masks.register_buffer(f"layer{i}", torch.ones_like(modules[name].weight))

    def weights(self) -> dict[str, Tensor]:
        modules = dict(self.backbone.named_modules())
        return {name: modules[name].weight for name in self.layer_names}

    def mask_dict(self) -> dict[str, Tensor]:
        return {name: getattr(self.masks, f"layer{i}") for i, name in enumerate(self.layer_names)}

    @torch.no_grad()
    def apply_masks(self) -> None:
        for weight, mask in zip(self.weights().values(), self.mask_dict().values()):
            weight.mul_(mask)

    def layer_sparsity(self) -> dict[str, float]:
        """Fraction of pruned weights per layer."""
        return {name: 1.0 - float(mask.mean()) for name, mask in self.mask_dict().items()}

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        for weight, mask in zip(self.weights().values(), self.mask_dict().values()):
            if weight.grad is not None:
                weight.grad.mul_(mask)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.apply_masks()
