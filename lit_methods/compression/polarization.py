"""Channel gates trained with a polarization regulariser in one pass, then export of the physical sub-network.

Zhi et al., "Learning a Consensus Sub-Network with Polarization Regularization and One Pass Training",
https://arxiv.org/abs/2302.10798. No official code exists; the loss follows the project's card (rebuilt from the
abstract and the gate-plus-polarizer recipe of GDP), so the exact form is unconfirmed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lit_methods.base import ImageClassifier
from lit_methods.compression.common import example_inputs, log_sparsity
from lit_methods.pruning.structured import ChannelGroup, channel_groups, export_pruned

__all__ = ["ChannelGates", "Polarization", "polarization_penalty"]


def polarization_penalty(probabilities: Tensor) -> Tensor:
    """Mean of ``p (1 - p)``: zero only when every gate probability is 0 or 1."""
    return (probabilities * (1.0 - probabilities)).mean()


class ChannelGates(nn.Module):
    """One logit vector per channel group; ``mask(i)`` is the hard 0/1 gate of group ``i`` with a straight-through
    gradient to ``p = sigmoid(logit / temperature)``."""

    def __init__(self, sizes: Sequence[int], init_logit: float, temperature: float) -> None:
        super().__init__()
        self.logits = nn.ParameterList([nn.Parameter(torch.full((size,), float(init_logit))) for size in sizes])
        self.temperature = temperature

    def probabilities(self, index: int) -> Tensor:
        return torch.sigmoid(self.logits[index] / self.temperature)

    def hard(self, index: int) -> Tensor:
        """The 0/1 keep decision of each channel of group ``index``."""
        return (self.probabilities(index) > 0.5).to(self.logits[index].dtype)

    def mask(self, index: int) -> Tensor:
        probabilities = self.probabilities(index)
        hard = (probabilities > 0.5).to(probabilities.dtype)
        return hard + (probabilities - probabilities.detach())  # exactly 0/1 forward, identity gradient to p

    def all_probabilities(self) -> Tensor:
        return torch.cat([self.probabilities(i) for i in range(len(self.logits))])


class _GateHook:
    """Forward hook of a batch-norm layer multiplying its output channels by one group's gate."""

    def __init__(self, gates: ChannelGates, index: int) -> None:
        self.gates = gates
        self.index = index

    def __call__(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        mask = self.gates.mask(self.index)
        return output * mask.view(1, -1, *([1] * (output.dim() - 2)))


class Polarization(ImageClassifier):
    """Channel pruning by polarised gates in one training pass (Zhi et al., https://arxiv.org/abs/2302.10798).

    Every coupled channel group of the backbone (found by torch-pruning's dependency graph, so the channels tied by a
    residual add share one gate) gets a gate logit per channel; the gate multiplies the output of every batch-norm
    layer producing those channels (after BN, before a residual add). Forward uses the hard gate ``1[p > 0.5]`` with
    ``p = sigmoid(logit / temperature)``, backward the straight-through gradient to ``p``. The loss is
    ``CE + polarization_weight * mean p(1-p) + sparsity_weight * (mean p - target_keep_ratio)^2``: the first term
    drives every gate to 0 or 1, the second sets the share of kept channels. The gates are static parameters (the
    paper's input-independent consensus mask; the dynamic gating head is not implemented). Gates get their own
    parameter group without weight decay.

    :meth:`export_subnetwork` builds the physically smaller backbone (torch-pruning removes the channels whose gate
    is off; its logits equal the gated network's in eval mode). With ``export_path`` it is saved there
    (``torch.save`` of the module) at the end of training. Logged per epoch: ``polarization/keep_ratio``,
    ``polarization/undecided`` (share of gates with ``p`` in (0.05, 0.95)) and the pruned share of channels per group
    (``polarization/channels/*`` and a bar-chart PNG in the log directory).

    Groups without a batch-norm producer are not gated (listed in ``ungated_groups``); the classifier (``fc``) and
    ``ignored_layers`` keep their outputs.

    Args:
        backbone: a network torch-pruning can trace (conv/linear layers with batch norm).
        target_keep_ratio: share of gated channels to keep, in (0, 1) (paper: 1 - sparsity, 0.5 or 0.7).
        polarization_weight: weight of the polarization term (card: about 1; both terms are means over all gates,
            so their pull on one gate shrinks with the gate count: ``gate_lr`` compensates).
        sparsity_weight: weight of the keep-ratio term (card: 1-10).
        temperature: gate temperature ``tau``, fixed (the card's optional annealing from 1 to 0.1 is not done; 0.2
            polarises within a few epochs on digits).
        init_logit: initial logit of every gate (positive: every channel starts on; 0.5 gives ``p = 0.92``).
        gate_lr: learning rate of the gate logits (default: ``lr``; about 1 works on digits and CIFAR nets).
        ignored_layers: backbone module names whose outputs are never pruned (default: ``["fc"]`` when the backbone
            has an ``fc``).
        export_path: file to save the exported sub-network to at the end of training (``None``: no file).
        **kwargs: the arguments of :class:`~lit_methods.ImageClassifier` (``in_channels`` and ``image_size`` are
            needed to trace the backbone).
    """

    slug: ClassVar[str] = "polarization"

    def __init__(
        self,
        backbone: nn.Module,
        target_keep_ratio: float = 0.5,
        polarization_weight: float = 2.0,
        sparsity_weight: float = 10.0,
        temperature: float = 0.2,
        init_logit: float = 0.5,
        gate_lr: float | None = None,
        ignored_layers: list[str] | None = None,
        export_path: str | None = None,
        **kwargs: Any,
    ) -> None:
        if not 0.0 < target_keep_ratio < 1.0:
            raise ValueError(f"target_keep_ratio must lie in (0, 1), got {target_keep_ratio}")
        for name, value in (("polarization_weight", polarization_weight), ("sparsity_weight", sparsity_weight)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if gate_lr is not None and gate_lr <= 0:
            raise ValueError(f"gate_lr must be > 0, got {gate_lr}")
        super().__init__(backbone, **kwargs)
        if ignored_layers is None:
            ignored_layers = ["fc"] if isinstance(getattr(backbone, "fc", None), nn.Module) else []
        self.target_keep_ratio = target_keep_ratio
        self.polarization_weight = polarization_weight
        self.sparsity_weight = sparsity_weight
        self.gate_lr = gate_lr
        self.ignored_layers = list(ignored_layers)
        self.export_path = export_path
        self.example_inputs = example_inputs(self.in_channels, self.image_size, type(self).__name__)
        groups = channel_groups(backbone, self.example_inputs, self.ignored_layers)
        self.groups: list[ChannelGroup] = [group for group in groups if group.norms]
        self.ungated_groups = [group.root for group in groups if not group.norms]
        if not self.groups:
            raise ValueError(f"{type(backbone).__name__} has no channel group with a batch-norm layer to gate")
        self.gates = ChannelGates([g.num_channels for g in self.groups], init_logit, temperature)
        self._hooks: list[RemovableHandle] = []
        self._attach_gates()

    # -- gates -----------------------------------------------------------------------------------------------------
    def _attach_gates(self) -> None:
        modules = dict(self.backbone.named_modules())
        for index, group in enumerate(self.groups):
            for norm in group.norms:
                self._hooks.append(modules[norm].register_forward_hook(_GateHook(self.gates, index)))

    def _detach_gates(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def param_group_options(self) -> dict[str, dict[str, Any]]:
        return {"gates": {"weight_decay": 0.0, "lr": self.gate_lr or self.lr}}

    def keep_masks(self) -> dict[str, Tensor]:
        """The hard keep decision per channel group, by the group's root layer (backbone names)."""
        with torch.no_grad():
            return {group.root: self.gates.hard(i).bool() for i, group in enumerate(self.groups)}

    def keep_ratio(self) -> float:
        """Share of gated channels that are kept."""
        masks = list(self.keep_masks().values())
        return float(sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks))

    def undecided_share(self) -> float:
        """Share of gates whose probability lies in (0.05, 0.95)."""
        with torch.no_grad():
            p = self.gates.all_probabilities()
            return float(((p > 0.05) & (p < 0.95)).float().mean())

    def regularizer(self) -> tuple[Tensor, Tensor]:
        """``(polarization term, keep-ratio term)`` of the current gates."""
        p = self.gates.all_probabilities()
        return polarization_penalty(p), (p.mean() - self.target_keep_ratio) ** 2

    # -- training --------------------------------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        polar, keep = self.regularizer()
        self.log_dict({"polarization/polar_term": polar, "polarization/keep_term": keep}, on_step=True)
        return loss + self.polarization_weight * polar + self.sparsity_weight * keep

    def on_train_epoch_end(self) -> None:
        self.log("polarization/keep_ratio", self.keep_ratio())
        self.log("polarization/undecided", self.undecided_share())
        sparsity = {root: 1.0 - float(mask.float().mean()) for root, mask in self.keep_masks().items()}
        log_sparsity(self, sparsity, "polarization/channels")

    def on_train_end(self) -> None:
        if self.export_path is not None and self.trainer.is_global_zero:
            Path(self.export_path).parent.mkdir(parents=True, exist_ok=True)
            torch.save(self.export_subnetwork(), self.export_path)

    # -- export ----------------------------------------------------------------------------------------------------
    def export_subnetwork(self) -> nn.Module:
        """The backbone without the channels whose gate is off and without gates (a plain ``nn.Module`` in eval
        mode): it computes the gated network's eval-mode logits."""
        keep = self.keep_masks()
        self._detach_gates()
        try:
            slim = export_pruned(self.backbone, self.example_inputs.to(self.device), keep, self.ignored_layers)
        finally:
            self._attach_gates()
        return slim
