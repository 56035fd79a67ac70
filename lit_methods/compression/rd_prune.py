"""Layer-adaptive magnitude pruning with rate-distortion curves and a dynamic-programming allocation.

Xu, Wang et al., ICCV 2023, https://arxiv.org/abs/2308.10438 (official code: github.com/Akimoto-Cris/RD_PRUNE).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from lit_methods.base import ImageClassifier
from lit_methods.compression.common import MaskedLayers, example_inputs, log_sparsity
from lit_methods.datamodules.batch import as_batch
from lit_methods.pruning.rate_distortion import dp_allocate, fill_budget, magnitude_mask, rd_curves

__all__ = ["RDPrune"]

PRUNABLE_TYPES = (nn.Conv2d, nn.Linear)


class RDPrune(MaskedLayers, ImageClassifier):
    """Iterative unstructured pruning whose per-layer sparsities minimise the output distortion (Xu et al.,
    https://arxiv.org/abs/2308.10438).

    Schedule: ``pretrain_epochs`` of dense training, then ``num_iterations`` rounds of ``epochs_per_iteration``
    epochs; at the start of round ``i`` (0-based) the conv/linear weights are pruned to the global sparsity
    ``1 - (1 - amount_per_iteration) ** (i + 1)`` (one-shot: one round with ``amount_per_iteration`` the target).
    Each pruning step measures, on the calibration images, every layer's output-distortion curve (the model's
    output with only that layer pruned by magnitude to ``k / grid_size``, against the current model's output,
    worst case over samples with ``worst_case``), picks per-layer sparsities by exact dynamic programming over kept
    weight counts (:func:`lit_methods.pruning.dp_allocate`; a layer never gets less sparse), prunes each layer by
    magnitude and gives back the largest pruned weights until exactly ``floor((1 - target) * n)`` weights are kept
    (so the budget holds within one weight). Masks stay applied (gradients of masked weights are zeroed and the
    weights re-masked after every step).

    The calibration images are the first ``calibration_size`` training images the module sees (after the
    datamodule's augmentation), kept in a buffer so a resumed run prunes with the same ones. Masks, calibration
    images and the round counter are in the checkpoint. Logged per epoch: ``rd_prune/sparsity`` and the pruned share
    of each layer (``rd_prune/layers/*`` and a bar-chart PNG next to the logs). Under DDP rank 0's masks are
    broadcast.

    Args:
        backbone: the network; every ``nn.Conv2d``/``nn.Linear`` weight is prunable unless named in ``exclude``.
        amount_per_iteration: share of the remaining weights removed per round, in (0, 1) (official: 0.2).
        num_iterations: pruning rounds (official: up to 20).
        pretrain_epochs: dense epochs before the first round.
        epochs_per_iteration: epochs of retraining per round (official: 80k steps).
        calibration_size: calibration images (official CIFAR: 1024).
        grid_size: sparsity levels ``M`` of each curve (official ``maxsps``: 100).
        worst_case: worst-case curves (official runs) instead of the mean.
        budget_unit: the dynamic program counts kept weights in units of this many weights (1: exact; larger
            bounds its cost on big nets).
        exclude: backbone module names never pruned.
        **kwargs: the arguments of :class:`~lit_methods.ImageClassifier` (``in_channels`` and ``image_size`` are
            needed for the calibration buffer).
    """

    slug: ClassVar[str] = "rd-prune"

    def __init__(
        self,
        backbone: nn.Module,
        amount_per_iteration: float = 0.2,
        num_iterations: int = 1,
        pretrain_epochs: int = 1,
        epochs_per_iteration: int = 1,
        calibration_size: int = 1024,
        grid_size: int = 100,
        worst_case: bool = True,
        budget_unit: int = 1,
        exclude: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        if not 0.0 < amount_per_iteration < 1.0:
            raise ValueError(f"amount_per_iteration must lie in (0, 1), got {amount_per_iteration}")
        for name, value, low in (
            ("num_iterations", num_iterations, 1), ("pretrain_epochs", pretrain_epochs, 0),
            ("epochs_per_iteration", epochs_per_iteration, 1), ("calibration_size", calibration_size, 1),
            ("grid_size", grid_size, 1), ("budget_unit", budget_unit, 1),
        ):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        super().__init__(backbone, **kwargs)
        shape = example_inputs(self.in_channels, self.image_size, type(self).__name__).shape[1:]
        modules = dict(backbone.named_modules())
        exclude = list(exclude or [])
        unknown = [name for name in exclude if not isinstance(modules.get(name), PRUNABLE_TYPES)]
        if unknown:
            raise ValueError(f"exclude names {unknown}, which are not conv/linear layers of {type(backbone).__name__}")
        layer_names = [n for n, m in modules.items() if isinstance(m, PRUNABLE_TYPES) and n not in exclude]
        if not layer_names:
            raise ValueError(f"{type(backbone).__name__} has no conv/linear layer to prune")
        self.amount_per_iteration = amount_per_iteration
        self.num_iterations = num_iterations
        self.pretrain_epochs = pretrain_epochs
        self.epochs_per_iteration = epochs_per_iteration
        self.grid_size = grid_size
        self.worst_case = worst_case
        self.budget_unit = budget_unit
        self.init_masks(layer_names)
        self.register_buffer("calibration_inputs", torch.zeros(calibration_size, *shape))
        self.register_buffer("calibration_count", torch.zeros((), dtype=torch.long))
        self.register_buffer("iterations_done", torch.zeros((), dtype=torch.long))

    # -- masks -------------------------------------------------------------------------------------------------
    def sparsity(self) -> float:
        masks = list(self.mask_dict().values())
        return 1.0 - sum(float(m.sum()) for m in masks) / sum(m.numel() for m in masks)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        filled = int(self.calibration_count)
        if filled < len(self.calibration_inputs):
            images = as_batch(batch)["inputs"].detach()[: len(self.calibration_inputs) - filled]
            self.calibration_inputs[filled : filled + len(images)] = images
            self.calibration_count += len(images)
        return super().training_step(batch, batch_idx)

    # -- pruning rounds -------------------------------------------------------------------------------------------
    def on_train_epoch_start(self) -> None:
        epoch = self.current_epoch - self.pretrain_epochs
        due = 0 if epoch < 0 else min(self.num_iterations, epoch // self.epochs_per_iteration + 1)
        if int(self.iterations_done) < due:
            target = 1.0 - (1.0 - self.amount_per_iteration) ** (int(self.iterations_done) + 1)
            masks = self.allocate(target)
            masks = self.trainer.strategy.broadcast(masks, src=0)
            for i, name in enumerate(self.layer_names):
                getattr(self.masks, f"layer{i}").copy_(masks[name])
            self.apply_masks()
            self.iterations_done += 1

    @torch.no_grad()
    def allocate(self, target_sparsity: float, inputs: Tensor | None = None) -> dict[str, Tensor]:
        """Masks with global sparsity ``target_sparsity`` by the RD allocation on ``inputs`` (default: the
        calibration buffer); the model is unchanged."""
        if inputs is None:
            count = int(self.calibration_count)
            if count == 0:
                raise ValueError("no calibration image was collected: train at least one batch before pruning")
            inputs = self.calibration_inputs[:count]
        weights, old = self.weights(), self.mask_dict()
        amounts = [k / self.grid_size for k in range(self.grid_size + 1)]
        was_training = self.training
        self.eval()
        try:
            curves = rd_curves(self, weights, inputs, amounts, old, self.worst_case)
        finally:
            self.train(was_training)
        sizes = [w.numel() for w in weights.values()]
        budget = int((1.0 - target_sparsity) * sum(sizes))
        previous = [1.0 - float(m.mean()) for m in old.values()]
        # grid levels at or above each layer's current sparsity (rounded down to the grid so the level is reachable)
        floors = [int(p * self.grid_size + 1e-9) / self.grid_size for p in previous]
        picked = dp_allocate(sizes, curves, amounts, budget, floors, self.budget_unit)
        masks = {
            name: magnitude_mask(weights[name], max(amounts[k], prev), old[name])
            for (name, k, prev) in zip(weights, picked, previous)
        }
        return fill_budget(weights, masks, budget, frozen=old)

    def on_train_epoch_end(self) -> None:
        self.log("rd_prune/sparsity", self.sparsity())
        sparsity = self.layer_sparsity()
        log_sparsity(self, sparsity, "rd_prune/layers")
