"""AdaPT: adaptive-precision fixed-point training of any LightningModule's linear and convolutional layers.

Kummer, Sidak, Reichmann, Gansterer, "AdaPT: Adaptive Precision Training" (https://arxiv.org/abs/2107.13490);
official code lorenz0890/AdaPT. Each ``nn.Linear``/``nn.Conv{1,2,3}d`` gets a fixed-point format ``(WL, FL)``:

- its weight and bias are ``torch.nn.utils.parametrize`` parametrizations: the registered parameter
  (``<layer>.parametrizations.weight.original``) is the fp32 master copy the optimizer updates, the layer computes
  with its stochastically rounded fixed-point value and the master receives the straight-through gradient;
- optionally its inputs and outputs are fake-quantized to the same format (the code's ``QUANT_INPUTS/OUTPUTS``);
- before each optimizer step its gradients are stochastically quantized to the format and divided by their L2
  norm (``QUANT_GRADS`` and the per-tensor normalisation of the code's ``MSGD_FP``, which also feeds the update);
  any optimizer then updates the master weights (the code uses SGD with momentum and L2);
- the normalised weight gradients fill a window whose gradient diversity sets its length; when it is full
  (``switch_at="window"``, the code) or at the end of each epoch (``switch_at="epoch"``, the paper's wording) the
  precision is pushed down to the smallest lossless format (KL of histograms) and up by the gradient diversity,
  see :mod:`lit_methods.quantization.adapt`. Biases share their layer's format (the code copies it).

Why a callback: the quantization is applied through parametrizations and hooks, so it works on any module and any
optimizer, as the other cross-cutting techniques of ``callbacks/``; the quantizer and the switching rules live in
``lit_methods.quantization`` (shared layers, not a method family). Not quantized (the code has quantized variants):
normalisation layers, pooling and embeddings. Evaluation rounds weights to nearest instead of reusing the last
stochastic draw, so validation is deterministic. Stochastic rounding draws from generators reseeded every step from
``(seed, global_step)``, one for weights and gradients and one for activations (so the batch size cannot shift the
weights' draws): every DDP rank draws the same weights and gradients, and a resumed run draws what the straight run
drew.

Logged every epoch: ``adapt/<layer>/word_length`` and ``/fraction_length``, ``adapt/mean_word_length``;
:attr:`AdaptivePrecision.history` keeps the per-epoch formats and ``controller.switches`` every switch with its
criteria. Needs from the module: nothing but its layers; register it before training starts (it rewrites
parameter names, so a checkpoint written with it loads only into a module set up with it).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lit_methods.quantization.adapt import PUSH_UP_STRATEGIES, AdaptivePrecisionController, PushUpStrategy
from lit_methods.quantization.codecs import FixedPointQuantization, fixed_point_quantize, straight_through

__all__ = ["AdaptivePrecision"]

QUANTIZED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
SWITCH_MODES = ("window", "epoch")
_SEED_STRIDE = 1_000_003
_ACTIVATION_SEED_OFFSET = 2**40


class AdaptivePrecision(Callback):
    """Adaptive-precision fixed-point training (AdaPT, https://arxiv.org/abs/2107.13490) as a callback.

    Defaults are the official CIFAR-10 ResNet config (``resnet_msgd_fp_cifar10.ini``).

    Args:
        initial_word_length: starting word length of every layer (sign bit included).
        initial_fraction_length: starting fractional length.
        min_fraction_length: push-down floor of the fractional length.
        min_lookback: shortest gradient window (steps).
        max_lookback: longest gradient window, also the first one.
        min_resolution: fewest histogram bins of the KL criterion.
        max_resolution: most bins, also the starting number.
        lookback_momentum: blend of the new window length with the old one (1 = take the new one).
        results_buffer: integer bits always kept above the fractional ones (``WL >= FL + buffer``).
        push_up_strategy: ``"min"``, ``"mean"`` or ``"max"`` of push-up's two step sizes.
        adapt_push_up_strategy: escalate the strategy while the loss does not fall (the code's behaviour).
        quantize_inputs: fake-quantize each layer's input to its format.
        quantize_outputs: fake-quantize each layer's output to its format.
        quantize_gradients: stochastically quantize each gradient to its layer's format before normalising it.
        switch_at: ``"window"`` (when a tensor's window is full) or ``"epoch"`` (all tensors at each epoch end).
        seed: seed of the stochastic rounding.
    """

    slug: ClassVar[str] = "adapt"

    def __init__(
        self,
        initial_word_length: int = 8,
        initial_fraction_length: int = 4,
        min_fraction_length: int = 4,
        min_lookback: int = 25,
        max_lookback: int = 100,
        min_resolution: int = 50,
        max_resolution: int = 150,
        lookback_momentum: float = 1.0,
        results_buffer: int = 8,
        push_up_strategy: PushUpStrategy = "min",
        adapt_push_up_strategy: bool = True,
        quantize_inputs: bool = True,
        quantize_outputs: bool = True,
        quantize_gradients: bool = True,
        switch_at: Literal["window", "epoch"] = "window",
        seed: int = 0,
    ) -> None:
        if switch_at not in SWITCH_MODES:
            raise ValueError(f"switch_at must be one of {SWITCH_MODES}, got {switch_at!r}")
        if push_up_strategy not in PUSH_UP_STRATEGIES:
            raise ValueError(f"push_up_strategy must be one of {PUSH_UP_STRATEGIES}, got {push_up_strategy!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
        self.controller_arguments: dict[str, Any] = {
            "initial_word_length": initial_word_length,
            "initial_fraction_length": initial_fraction_length,
            "min_fraction_length": min_fraction_length,
            "min_lookback": min_lookback,
            "max_lookback": max_lookback,
            "min_resolution": min_resolution,
            "max_resolution": max_resolution,
            "lookback_momentum": lookback_momentum,
            "results_buffer": results_buffer,
            "push_up_strategy": push_up_strategy,
            "adapt_push_up_strategy": adapt_push_up_strategy,
        }
        # construction-time checks of the controller's arguments
        AdaptivePrecisionController(["check"], **self.controller_arguments)
        self.quantize_inputs = quantize_inputs
        self.quantize_outputs = quantize_outputs
        self.quantize_gradients = quantize_gradients
        self.switch_at = switch_at
        self.seed = seed
        self.layers: dict[str, nn.Module] = {}
        self.controller: AdaptivePrecisionController | None = None
        self.history: list[dict[str, tuple[int, int]]] = []
        self.generator: torch.Generator | None = None
        self.activation_generator: torch.Generator | None = None
        self._pending_state: dict[str, Any] | None = None
        self._step_loss = 0.0

    # -- set-up -------------------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.layers:
            return
        self.layers = {name: m for name, m in pl_module.named_modules() if isinstance(m, QUANTIZED_LAYERS)}
        if not self.layers:
            raise ValueError(f"{type(pl_module).__name__} has no nn.Linear or nn.Conv layer for AdaPT to quantize")
        self.controller = AdaptivePrecisionController(list(self.layers), **self.controller_arguments)
        for layer in self.layers.values():
            for tensor_name in ("weight", "bias"):
                if getattr(layer, tensor_name, None) is not None:
                    parametrize.register_parametrization(
                        layer, tensor_name, FixedPointQuantization(*self.controller.format(self._name_of(layer)))
                    )
            layer.register_forward_pre_hook(self._quantize_input)
            layer.register_forward_hook(self._quantize_output)
        if self._pending_state is not None:
            self._restore(self._pending_state)

    def _name_of(self, layer: nn.Module) -> str:
        return next(name for name, m in self.layers.items() if m is layer)

    def _quantizers(self, layer: nn.Module) -> list[FixedPointQuantization]:
        return [plist[0] for plist in layer.parametrizations.values()]

    def _fake_quantize(self, layer: nn.Module, values: Tensor) -> Tensor:
        quantizer = self._quantizers(layer)[0]
        quantized = fixed_point_quantize(
            values,
            quantizer.word_length,
            quantizer.fraction_length,
            stochastic=layer.training,
            generator=self.activation_generator,
        )
        return straight_through(values, quantized)

    def _quantize_input(self, layer: nn.Module, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...] | None:
        if not self.quantize_inputs:
            return None
        return (self._fake_quantize(layer, inputs[0]), *inputs[1:])

    def _quantize_output(self, layer: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor | None:
        return self._fake_quantize(layer, output) if self.quantize_outputs else None

    def _apply_formats(self) -> None:
        for name, layer in self.layers.items():
            for quantizer in self._quantizers(layer):
                quantizer.set_format(*self.controller.format(name))

    # -- training -----------------------------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.generator = torch.Generator(device=pl_module.device)
        self.activation_generator = torch.Generator(device=pl_module.device)
        for layer in self.layers.values():
            for quantizer in self._quantizers(layer):
                quantizer.generator = self.generator

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.generator.manual_seed(self.seed * _SEED_STRIDE + trainer.global_step)
        self.activation_generator.manual_seed(self.seed * _SEED_STRIDE + trainer.global_step + _ACTIVATION_SEED_OFFSET)

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        self._step_loss += float(loss.detach())

    @torch.no_grad()
    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        loss = trainer.strategy.reduce(torch.tensor(self._step_loss, device=pl_module.device), reduce_op="mean")
        self._step_loss = 0.0
        self.controller.observe_loss(float(loss))
        for name, layer in self.layers.items():
            word_length, fraction_length = self.controller.format(name)
            for tensor_name, plist in layer.parametrizations.items():
                master = plist.original
                if master.grad is None:
                    continue
                gradient = master.grad
                if self.quantize_gradients:
                    gradient = fixed_point_quantize(gradient, word_length, fraction_length, generator=self.generator)
                norm = gradient.norm()
                master.grad = gradient / norm if norm > 0 else gradient
                if tensor_name == "weight":
                    self.controller.observe_gradient(name, master.grad)
            if self.switch_at == "window" and self.controller.window_complete(name):
                self._switch(name, layer, trainer.global_step)
        self._apply_formats()

    def _switch(self, name: str, layer: nn.Module, step: int) -> None:
        index = list(self.layers).index(name)
        seed = (self.seed * _SEED_STRIDE + step) * len(self.layers) + index
        self.controller.switch(name, layer.parametrizations.weight.original, seed=seed, step=step)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.switch_at == "epoch":
            for name, layer in self.layers.items():
                if self.controller.window_count[name] > 0:
                    self._switch(name, layer, trainer.global_step)
            self._apply_formats()
        formats = {name: self.controller.format(name) for name in self.layers}
        self.history.append(formats)
        metrics = {}
        for name, (word_length, fraction_length) in formats.items():
            metrics[f"adapt/{name}/word_length"] = float(word_length)
            metrics[f"adapt/{name}/fraction_length"] = float(fraction_length)
        metrics["adapt/mean_word_length"] = self.mean_word_length()
        pl_module.log_dict(metrics, on_step=False, on_epoch=True)

    def mean_word_length(self) -> float:
        """Word length averaged over the quantized layers, weighted by their number of weights."""
        sizes = {name: layer.parametrizations.weight.original.numel() for name, layer in self.layers.items()}
        total = sum(sizes.values())
        return sum(self.controller.word_length[name] * size for name, size in sizes.items()) / total

    # -- checkpointing ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.controller is None:
            return {}
        return {"controller": self.controller.state_dict(), "history": list(self.history)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.controller is None:
            self._pending_state = state_dict
        else:
            self._restore(state_dict)

    def _restore(self, state: dict[str, Any]) -> None:
        self.controller.load_state_dict(state["controller"])
        self.history = list(state["history"])
        self._apply_formats()
        self._pending_state = None
