"""The learning-rate schedule of AP's official code (Liu et al., "AP: Selective Activation for De-sparsifying Pruned
Neural Networks", TMLR 2023, https://arxiv.org/abs/2212.06145; ``resnet_20.py``), restarted at every pruning cycle."""

from __future__ import annotations

from collections.abc import Sequence

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["CyclicWarmupStepFactor", "CyclicWarmupStepLR"]


class CyclicWarmupStepFactor:
    """The LR factor of optimizer step ``step`` (0-based, counted from the start of training): within each cycle of
    ``steps_per_cycle`` steps, step ``s`` of epoch ``e = s // steps_per_epoch`` gets ``min(s + 1, warmup_steps) /
    warmup_steps`` (a linear warm-up from 0 that reaches the peak at step ``warmup_steps``) until the first of
    ``drop_epochs``, and ``drop_factor ** j`` after the ``j``-th drop epoch has begun. Picklable."""

    def __init__(
        self,
        steps_per_cycle: int,
        steps_per_epoch: int,
        warmup_steps: int,
        drop_epochs: Sequence[int],
        drop_factor: float,
    ) -> None:
        self.steps_per_cycle = steps_per_cycle
        self.steps_per_epoch = steps_per_epoch
        self.warmup_steps = warmup_steps
        self.drop_epochs = tuple(drop_epochs)
        self.drop_factor = drop_factor

    def __call__(self, step: int) -> float:
        in_cycle = step % self.steps_per_cycle
        epoch = in_cycle // self.steps_per_epoch
        drops = sum(epoch >= drop for drop in self.drop_epochs)
        if drops:
            return self.drop_factor**drops
        return min(in_cycle + 1, self.warmup_steps) / self.warmup_steps


class CyclicWarmupStepLR(LambdaLR):
    """AP's official per-cycle schedule as an optimizer-step scheduler (the module's ``lr_scheduler``): each pruning
    cycle restarts a linear warm-up from 0 to the optimizer's learning rate over ``warmup_steps`` steps, then the
    rate drops by ``drop_factor`` at each of ``drop_epochs`` (epochs counted within the cycle). The official
    ResNet-20/CIFAR-10 run: peak 0.1, 20000 warm-up iterations, drops to 0.01 at epoch 25 and 0.001 at epoch 32,
    50 epochs per cycle, batch 64 (782 steps per epoch, so the warm-up is cut by the first drop at step 19550).

    Args:
        optimizer: the optimizer (its learning rate is the peak).
        steps_per_epoch: optimizer steps per training epoch.
        epochs_per_cycle: epochs per pruning cycle, as the pruning callback's ``epochs_per_cycle``.
        warmup_steps: warm-up length in optimizer steps (official: 20000).
        drop_epochs: epochs of the cycle, increasing, from which the rate is multiplied once more by
            ``drop_factor`` (official: 25 and 32).
        drop_factor: factor of each drop (official: 0.1).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        steps_per_epoch: int,
        epochs_per_cycle: int,
        warmup_steps: int = 20000,
        drop_epochs: Sequence[int] = (25, 32),
        drop_factor: float = 0.1,
    ) -> None:
        for name, value in (("steps_per_epoch", steps_per_epoch), ("epochs_per_cycle", epochs_per_cycle)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not isinstance(warmup_steps, int) or warmup_steps < 1:
            raise ValueError(f"warmup_steps must be an int >= 1, got {warmup_steps!r}")
        drop_epochs = tuple(drop_epochs)
        if list(drop_epochs) != sorted(set(drop_epochs)) or any(not 0 < e < epochs_per_cycle for e in drop_epochs):
            raise ValueError(
                f"drop_epochs must increase strictly within (0, epochs_per_cycle={epochs_per_cycle}), got {drop_epochs}"
            )
        if not 0.0 < drop_factor <= 1.0:
            raise ValueError(f"drop_factor must lie in (0, 1], got {drop_factor}")
        factor = CyclicWarmupStepFactor(
            steps_per_epoch * epochs_per_cycle, steps_per_epoch, warmup_steps, drop_epochs, drop_factor
        )
        super().__init__(optimizer, factor)
