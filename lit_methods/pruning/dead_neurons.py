"""Dynamic dead neuron rate (DNR) of ReLU networks, the diagnostic of "AP: Selective Activation for De-sparsifying
Pruned Neural Networks" (Liu et al., TMLR 2023, https://arxiv.org/abs/2212.06145).

Definition used here: every element of a ReLU output is one (unit, sample) pair (a unit is a channel at one spatial
position for convolutional maps, a feature for flat ones); the pair is *dead* when the output is exactly 0. The
*dynamic* DNR is measured on the training forward passes, as the network changes, and accumulated over the batches
seen since the last reset (one epoch when logged with ``on_epoch=True``):

- ``average="global"``: dead pairs / all pairs, pooled over every observed ReLU;
- ``average="layer"``: the dead fraction of each observed ReLU, then the unweighted mean over ReLUs.

The paper does not say which of the two it averages, so :class:`~lit_methods.callbacks.ActivatingWhilePruning` logs
both.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from torchmetrics import Metric

__all__ = ["DeadNeuronRate", "observe_relu_outputs"]


class DeadNeuronRate(Metric):
    """Fraction of ReLU outputs that are exactly zero (dead (unit, sample) pairs); DDP-safe sum states.

    Args:
        num_layers: number of ReLU layers that feed :meth:`update` (their indices are ``0 .. num_layers - 1``).
        average: ``"global"`` (pooled over all pairs) or ``"layer"`` (mean over layers of each layer's rate).
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, num_layers: int, average: Literal["global", "layer"] = "global") -> None:
        super().__init__()
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers must be an int >= 1, got {num_layers!r}")
        if average not in ("global", "layer"):
            raise ValueError(f"average must be 'global' or 'layer', got {average!r}")
        self.num_layers = num_layers
        self.average = average
        self.add_state("dead", default=torch.zeros(num_layers, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros(num_layers, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, activations: Tensor, layer: int = 0) -> None:
        """Count the zeros of one ReLU output ``activations`` (any shape, batch included) of layer ``layer``."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must lie in [0, {self.num_layers}), got {layer}")
        self.dead[layer] += (activations.detach() == 0).sum()
        self.total[layer] += activations.numel()

    def compute(self) -> Tensor:
        if self.average == "global":
            return self.dead.sum().double().div(self.total.sum()).float()
        seen = self.total > 0
        return (self.dead[seen].double() / self.total[seen]).mean().float()


def observe_relu_outputs(module: nn.Module, observe: Callable[[Tensor, int], None]) -> list[RemovableHandle]:
    """Register forward hooks calling ``observe(output, layer_index)`` on every ``nn.ReLU`` of ``module``.

    Only ``nn.ReLU`` modules are seen: ReLUs applied functionally (``F.relu``) inside a module's ``forward`` are not.
    Each call of a ReLU module is observed once (an in-place ReLU included). Returns the hook handles (call
    ``.remove()`` on each to detach); raises when ``module`` has no ``nn.ReLU``.
    """
    relus = [m for m in module.modules() if isinstance(m, nn.ReLU)]
    if not relus:
        raise ValueError(f"{type(module).__name__} has no nn.ReLU module whose outputs could be observed")

    def make_hook(index: int) -> Callable[[nn.Module, tuple[Tensor, ...], Tensor], None]:
        def hook(_module: nn.Module, _inputs: tuple[Tensor, ...], output: Tensor) -> None:
            observe(output, index)

        return hook

    return [relu.register_forward_hook(make_hook(i)) for i, relu in enumerate(relus)]
