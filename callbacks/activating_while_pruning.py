"""Activate-While-Pruning (AP) on top of iterative magnitude pruning with rewinding to the initial weights.

Liu et al., "AP: Selective Activation for De-sparsifying Pruned Neural Networks", TMLR 2023,
https://arxiv.org/abs/2212.06145. The base pruner is the lottery-ticket procedure (Frankle & Carbin 2019,
https://arxiv.org/abs/1803.03635): train a cycle, remove the smallest-magnitude surviving weights globally, rewind the
survivors to their initial values, repeat. AP spends a share of each cycle's budget on surviving *negative* weights
that moved least during the cycle; removing negative inputs raises pre-activations, so fewer ReLUs are dead.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from lit_methods.pruning import DeadNeuronRate, masked_share, observe_relu_outputs, select_surviving_weights

__all__ = ["ActivatingWhilePruning"]

PRUNABLE_TYPES = (nn.modules.conv._ConvNd, nn.Linear)
NORM_TYPES = (nn.modules.batchnorm._BatchNorm,)
REWIND_MODES = ("init", "reinit")


class ActivatingWhilePruning(Callback):
    """Iterative global magnitude pruning with rewinding plus AP's removal of negative, least-moved weights.

    Liu et al., "AP: Selective Activation for De-sparsifying Pruned Neural Networks", https://arxiv.org/abs/2212.06145.

    Schedule: a cycle is ``epochs_per_cycle`` training epochs. At the start of every later cycle (before its first
    batch, so a checkpoint written at the end of a cycle resumes into the pruning step) the callback removes
    ``prune_rate`` of the surviving conv/linear weights (:func:`lit_methods.pruning.select_surviving_weights`;
    ``ap_rate`` of them by AP), rewinds *all* parameters to their values at the start of fit (lottery-ticket
    rewinding; biases and norm parameters included, BN running statistics kept) or, with ``rewind="reinit"``,
    draws them afresh (the official code's default ``prune_type=reinit``), and clears the optimizer state
    (momentum), as the official code builds a fresh SGD per cycle. ``ap_rate=0`` is the same pruner without AP: the
    baseline. Every conv/linear weight is prunable, the classifier's included (as in the official code), unless
    named in ``exclude``.

    Masked weights stay exactly zero: their gradients are zeroed before every optimizer step and the weights are
    re-masked after every batch. The learning-rate schedule belongs to the module; the official per-cycle one
(warm-up then step drops, restarted every cycle) is :class:`lit_methods.pruning.CyclicWarmupStepLR`, given as the
module's ``lr_scheduler`` with this callback's ``epochs_per_cycle``.

    Logged each epoch: ``ap/sparsity`` (pruned share of prunable weights) and, with ``track_dead_neurons``, the
    dynamic dead neuron rate of the ``nn.ReLU`` modules over the epoch's training batches
    (:class:`lit_methods.pruning.DeadNeuronRate`): ``ap/dead_neuron_rate`` (pooled) and
    ``ap/dead_neuron_rate_layer_mean``.

    Requires of the module: conv/linear layers (``nn.Conv*d``/``nn.Linear``) and, for the DNR, ``nn.ReLU`` modules
    (functional ``F.relu`` is not observed). Under DDP the masks are computed on every rank and rank 0's are broadcast.

    Args:
        prune_rate: share of the surviving prunable weights removed per pruning step, in (0, 1) (paper: 0.2).
        ap_rate: share spent by AP on negative, least-moved weights, in [0, prune_rate] (paper: 0.02; 0: no AP).
        epochs_per_cycle: training epochs per cycle (paper: 50).
        num_prunings: pruning steps to take; ``None`` prunes at every cycle boundary until training ends.
        exclude: names of conv/linear modules (as in ``pl_module.named_modules()``, e.g. ``"backbone.fc"``) whose
            weights are never pruned.
        reset_optimizer_state: clear the optimizer state at each pruning step; when False only the state entries of
            pruned weights are zeroed.
        track_dead_neurons: measure and log the dynamic dead neuron rate.
        rewind: ``"init"`` (lottery-ticket rewinding to the parameters at the start of fit) or ``"reinit"`` (the
            official ``prune_type=reinit``): at each pruning step every module with ``reset_parameters`` draws new
            parameters with its own initialiser from torch's global generator (rank 0's draw under DDP; buffers
            such as BN running statistics are kept), the survivors keep their new values and the new values
            become the ones later ``"reinit"`` steps replace.
        prune_batchnorm_weights: also prune the weights (scales) of batch-norm layers, in the same global ranking
            as the conv/linear weights, as the official code does (it prunes every parameter named ``weight``);
            ``exclude`` may then name batch-norm modules too.
    """

    slug: ClassVar[str] = "ap"

    def __init__(
        self,
        *,
        prune_rate: float = 0.2,
        ap_rate: float = 0.02,
        epochs_per_cycle: int = 50,
        num_prunings: int | None = None,
        exclude: list[str] | None = None,
        reset_optimizer_state: bool = True,
        track_dead_neurons: bool = True,
        rewind: Literal["init", "reinit"] = "init",
        prune_batchnorm_weights: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 < prune_rate < 1.0:
            raise ValueError(f"prune_rate must lie in (0, 1), got {prune_rate}")
        if not 0.0 <= ap_rate <= prune_rate:
            raise ValueError(f"ap_rate must lie in [0, prune_rate={prune_rate}], got {ap_rate}")
        if not isinstance(epochs_per_cycle, int) or epochs_per_cycle < 1:
            raise ValueError(f"epochs_per_cycle must be an int >= 1, got {epochs_per_cycle!r}")
        if num_prunings is not None and (not isinstance(num_prunings, int) or num_prunings < 0):
            raise ValueError(f"num_prunings must be None or an int >= 0, got {num_prunings!r}")
        if rewind not in REWIND_MODES:
            raise ValueError(f"rewind must be one of {REWIND_MODES}, got {rewind!r}")
        self.prune_rate = prune_rate
        self.ap_rate = ap_rate
        self.epochs_per_cycle = epochs_per_cycle
        self.num_prunings = num_prunings
        self.exclude = list(exclude or [])
        self.reset_optimizer_state = reset_optimizer_state
        self.track_dead_neurons = track_dead_neurons
        self.rewind = rewind
        self.prune_batchnorm_weights = prune_batchnorm_weights
        self.prunable_types = PRUNABLE_TYPES + (NORM_TYPES if prune_batchnorm_weights else ())
        self.prunings_done = 0
        self.masks: dict[str, Tensor] = {}
        self.initial_params: dict[str, Tensor] = {}
        self.cycle_start_weights: dict[str, Tensor] = {}
        self.prunable: dict[str, nn.Parameter] = {}
        self._dnr_metrics: list[DeadNeuronRate] = []
        self._hooks: list[RemovableHandle] = []
        self._observing = False

    # -- setup ---------------------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        modules = dict(pl_module.named_modules())
        kinds = "conv/linear/batch-norm" if self.prune_batchnorm_weights else "conv/linear"
        for name in self.exclude:
            if not isinstance(modules.get(name), self.prunable_types):
                module_name = type(pl_module).__name__
                raise ValueError(f"exclude names {name!r}, which is not a {kinds} module of {module_name}")
        self.prunable = {
            f"{name}.weight": module.weight
            for name, module in modules.items()
            if isinstance(module, self.prunable_types) and name not in self.exclude and module.weight is not None
        }
        if not self.prunable:
            raise ValueError(f"{type(pl_module).__name__} has no prunable conv/linear layer (exclude={self.exclude})")
        if self.track_dead_neurons and not self._hooks:
            self._hooks = observe_relu_outputs(pl_module, self._observe)  # raises without nn.ReLU modules
            num_relus = sum(isinstance(m, nn.ReLU) for m in pl_module.modules())
            self._dnr_metrics = [DeadNeuronRate(num_relus, average) for average in ("global", "layer")]

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def _observe(self, output: Tensor, layer: int) -> None:
        if self._observing:
            for metric in self._dnr_metrics:
                metric.update(output, layer)

    @torch.no_grad()
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.masks:  # a fresh run; a resumed one has its state from load_state_dict
            self.masks = {name: torch.ones_like(weight) for name, weight in self.prunable.items()}
            self.initial_params = {name: p.detach().clone() for name, p in pl_module.named_parameters()}
            self.cycle_start_weights = {name: w.detach().clone() for name, w in self.prunable.items()}
        if set(self.masks) != set(self.prunable):
            raise ValueError(
                f"the restored masks cover {sorted(self.masks)}, "
                f"but the model's prunable weights are {sorted(self.prunable)}"
            )
        device = pl_module.device
        for metric in self._dnr_metrics:
            metric.to(device)
        self.masks = {k: v.to(device) for k, v in self.masks.items()}
        self.initial_params = {k: v.to(device) for k, v in self.initial_params.items()}
        self.cycle_start_weights = {k: v.to(device) for k, v in self.cycle_start_weights.items()}
        self._apply_masks()

    # -- masks stay applied ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def _apply_masks(self) -> None:
        for name, weight in self.prunable.items():
            weight.mul_(self.masks[name])

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Optimizer) -> None:
        for name, weight in self.prunable.items():
            if weight.grad is not None:
                weight.grad.mul_(self.masks[name])

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._observing = True

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        # only the training step's own forward is observed: extra forwards of other callbacks after it (such as
        # ErrorFeedbackDP's per-sample pass under torch.func) are not activations of the trained network's step
        self._observing = False

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._observing = False
        self._apply_masks()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.log("ap/sparsity", self.sparsity())
        if self._dnr_metrics:
            global_rate, layer_mean = (metric.compute() for metric in self._dnr_metrics)
            pl_module.log("ap/dead_neuron_rate", global_rate)
            pl_module.log("ap/dead_neuron_rate_layer_mean", layer_mean)
            for metric in self._dnr_metrics:
                metric.reset()

    def sparsity(self) -> float:
        """Share of the prunable weights that are masked."""
        return masked_share(self.masks.values())

    # -- the pruning step -------------------------------------------------------------------------------------------
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        due = trainer.current_epoch // self.epochs_per_cycle
        if self.num_prunings is not None:
            due = min(due, self.num_prunings)
        if self.prunings_done < due:
            self.prune_and_rewind(trainer, pl_module)

    @torch.no_grad()
    def prune_and_rewind(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Prune (IMP + AP), broadcast rank 0's masks, rewind to the initial parameters (or draw new ones), reset the
        optimizer."""
        names = list(self.prunable)
        alive, _ = select_surviving_weights(
            torch.cat([self.prunable[n].flatten() for n in names]),
            torch.cat([self.cycle_start_weights[n].flatten() for n in names]),
            torch.cat([self.masks[n].flatten() for n in names]).bool(),
            self.prune_rate,
            self.ap_rate,
        )
        alive = trainer.strategy.broadcast(alive, src=0).to(pl_module.device)
        for name, flat in zip(names, alive.split([self.masks[n].numel() for n in names])):
            self.masks[name] = flat.view_as(self.masks[name]).to(self.masks[name].dtype)
        if self.rewind == "reinit":
            self.initial_params = self._fresh_parameters(trainer, pl_module)
        for name, param in pl_module.named_parameters():
            param.copy_(self.initial_params[name])
        self._apply_masks()
        self.cycle_start_weights = {name: w.detach().clone() for name, w in self.prunable.items()}
        self.prunings_done += 1
        for optimizer in trainer.optimizers:
            self._reset_optimizer(optimizer)

    @staticmethod
    def _fresh_parameters(trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Tensor]:
        """New parameters drawn by every module's ``reset_parameters`` (rank 0's), the buffers left as they were."""
        buffers = {name: b.detach().clone() for name, b in pl_module.named_buffers()}
        for module in pl_module.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
        for name, buffer in pl_module.named_buffers():
            buffer.copy_(buffers[name])
        fresh = {name: p.detach().clone() for name, p in pl_module.named_parameters()}
        return {name: p.to(pl_module.device) for name, p in trainer.strategy.broadcast(fresh, src=0).items()}

    def _reset_optimizer(self, optimizer: Optimizer) -> None:
        if self.reset_optimizer_state:
            optimizer.state.clear()
            return
        masks = {id(self.prunable[name]): mask for name, mask in self.masks.items()}
        for param, state in optimizer.state.items():
            mask = masks.get(id(param))
            if mask is not None:
                for value in state.values():
                    if isinstance(value, Tensor) and value.shape == mask.shape:
                        value.mul_(mask)

    # -- checkpointing ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "prunings_done": self.prunings_done,
            "masks": self.masks,
            "initial_params": self.initial_params,
            "cycle_start_weights": self.cycle_start_weights,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.prunings_done = state_dict["prunings_done"]
        self.masks = dict(state_dict["masks"])
        self.initial_params = dict(state_dict["initial_params"])
        self.cycle_start_weights = dict(state_dict["cycle_start_weights"])
