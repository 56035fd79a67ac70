"""IIR-SNN: iterative initialization and retraining down to one timestep (Chowdhury, Rathi & Roy, arXiv:2110.05929)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from lit_methods.base import ImageClassifier
from lit_methods.snn.neurons import SpikingVGG

__all__ = ["IIRSNN"]


class IIRSNN(ImageClassifier):
    """Surrogate-gradient training of a :class:`~lit_methods.snn.SpikingVGG` whose timesteps shrink stage by stage.

    The run is split into stages: stage ``i`` trains for ``stage_epochs[i]`` epochs at ``timesteps[i]`` steps, each
    stage starting from the weights, thresholds and leaks the previous stage ended with (the paper's iterative
    initialization and retraining, 5 -> 4 -> 3 -> 2 -> 1). One ``fit`` runs every stage; the stage is a function of
    the epoch, so a resumed run continues in the right stage. After the last stage the net keeps training at its
    last timestep count. Leaks are clamped to <= 1 after every optimizer step. Each spiking layer's firing rate is
    logged (``train/firing_rate/<i>``, ``val/firing_rate/<i>``) with the current timesteps (``timesteps``).

    Differences from the official code (``SayeedChowdhury/IIR-SNN``), stated: the net trains from scratch (the paper
    first converts a BN-folded ANN with 90th-percentile thresholds; that stage is not included), the logits are the
    classifier's membrane averaged over timesteps, and the learning-rate schedule runs over the whole fit rather
    than restarting per stage (``lr_schedule="constant"`` reproduces a flat rate).

    Args:
        backbone: a :class:`~lit_methods.snn.SpikingVGG` (its ``timesteps`` is set by the schedule).
        timesteps: timesteps of each stage, each >= 1 (paper: 5, 4, 3, 2, 1).
        stage_epochs: epochs of each stage (one int: the same for every stage).
        amsgrad: AMSGrad variant of the default Adam (official: on).
        **kwargs: the arguments of :class:`~lit_methods.ImageClassifier` (default optimizer here: Adam with ``lr``
            and ``weight_decay``, official lr 1e-4).
    """

    slug: ClassVar[str] = "iir-snn"

    def __init__(
        self,
        backbone: SpikingVGG,
        timesteps: Sequence[int] = (5, 4, 3, 2, 1),
        stage_epochs: int | Sequence[int] = 1,
        amsgrad: bool = True,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        lr_schedule: Literal["cosine", "onecycle", "constant"] = "constant",
        **kwargs: Any,
    ) -> None:
        if not isinstance(backbone, SpikingVGG):
            raise ValueError(f"IIRSNN trains a lit_methods.snn.SpikingVGG backbone, got {type(backbone).__name__}")
        timesteps = list(timesteps)
        if not timesteps or any(isinstance(t, bool) or not isinstance(t, int) or t < 1 for t in timesteps):
            raise ValueError(f"timesteps must be a non-empty list of integers >= 1, got {timesteps}")
        epochs = [stage_epochs] * len(timesteps) if isinstance(stage_epochs, int) else list(stage_epochs)
        if len(epochs) != len(timesteps) or any(e < 1 for e in epochs):
            raise ValueError(
                f"stage_epochs must be one int >= 1 or one per stage ({len(timesteps)} stages), got {stage_epochs}"
            )
        super().__init__(backbone, lr=lr, weight_decay=weight_decay, lr_schedule=lr_schedule, **kwargs)
        self.timestep_stages = timesteps
        self.stage_epochs = epochs
        self.amsgrad = amsgrad
        self.backbone.timesteps = timesteps[0]

    def timesteps_at_epoch(self, epoch: int) -> int:
        """The timesteps of the stage that ``epoch`` (0-based) belongs to; the last stage's after the schedule."""
        end = 0
        for steps, epochs in zip(self.timestep_stages, self.stage_epochs):
            end += epochs
            if epoch < end:
                return steps
        return self.timestep_stages[-1]

    def make_default_optimizer(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        """Adam (AMSGrad by default) as in the official code; the base's SGD does not suit thresholds and leaks."""
        return torch.optim.Adam(groups, lr=self.lr, amsgrad=self.amsgrad)

    def on_train_epoch_start(self) -> None:
        self.backbone.timesteps = self.timesteps_at_epoch(self.current_epoch)

    def on_validation_epoch_start(self) -> None:
        self.backbone.timesteps = self.timesteps_at_epoch(self.current_epoch)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A loaded module evaluates at the timesteps of the stage its checkpoint was taken in."""
        super().on_load_checkpoint(checkpoint)
        self.backbone.timesteps = self.timesteps_at_epoch(int(checkpoint.get("epoch", 0)))

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.backbone.clamp_leaks()

    def _log_firing_rates(self, stage: str) -> None:
        for index, rate in enumerate(self.backbone.last_firing_rates):
            self.log(f"{stage}/firing_rate/{index}", rate, on_step=False, on_epoch=True)
        self.log(f"{stage}/timesteps", float(self.backbone.timesteps), on_step=False, on_epoch=True)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        self._log_firing_rates("train")
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = super().validation_step(batch, batch_idx)
        self._log_firing_rates("val")
        return loss
