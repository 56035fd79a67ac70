"""SlimFit: memory-efficient fine-tuning by freezing most weight tensors each step (inter-layer scheduling, ILS) and
storing the activations saved for backward in low-bit fixed point or pruned.

Ardakani, Haan, Tan, Popovici, Cheung, Zhao, Peng, Cong, Abbasi, "SlimFit: Memory-Efficient Fine-Tuning of
Transformer-based Models Using Training Dynamics", 2023, https://arxiv.org/abs/2305.18513; official code
arashardakani/SlimFit (``ViT/CIFAR10.py``, ``ViT/utils_ILS.py``, ``ViT/ILSViT.py``).

ILS, as coded: the eligible tensors are every parameter with more than one dimension plus LayerNorm weights, minus
the classifier and the embeddings (``excluded``). Each starts with a large random score. Every step the
``int(freeze_ratio * count)`` tensors with the smallest scores are frozen (``requires_grad=False``; ties go to the
lower index) and after the step each trainable tensor's score becomes its normalised weight change
``sum |w_prev - w_now| / |w_prev| / numel`` (``|w_prev|`` floored at ``eps``); frozen tensors keep their stale
score. Biases and LayerNorm biases are never frozen. Frozen tensors get no gradient (Lightning's
``zero_grad(set_to_none=True)``), so optimizers such as AdamW leave them and their state alone, weight decay
included.

Memory: a frozen linear layer's input is no longer saved for its weight gradient (autograd saves only what the
needed gradients use), and what must still be saved is compressed through ``torch.autograd.graph.saved_tensors_hooks``
(instead of the official custom autograd functions), with forward hooks on the modules telling the hooks which module
is saving (the innermost running one). The codecs are :mod:`lit_methods.quantization.codecs`'
``FixedPointActivation`` and ``PrunedLayerNormInput``:

- ``quantize_gelu``: GELU inputs as ``gelu_bits``-bit fixed point with ``gelu_fraction_bits`` fractional bits
  (official: 4 bits, 1 fractional, so values are clamped to [-4, 3.5]), packed ``8 // gelu_bits`` to a byte.
- ``quantized_linears``: the input a trainable ``nn.Linear`` saves for its weight gradient as signed 8-bit fixed point
  with 4 fractional bits (3 integer bits and the sign: rounded to 1/16, clamped to [-8, 7.9375]). The official ViT
  quantizes only the second MLP layer (``ViTOutput.dense``, timm's ``mlp.fc2``), the default here.
- ``quantize_attention``: the operands of ``q @ k^T`` and ``attn @ v`` in timm ``Attention`` modules: query, key and
  value in the same signed 8-bit format, the softmax probabilities unsigned with 8 fractional bits ([0, 255/256]),
  stored once although the softmax and the matmul both save them; the softmax backward reads the quantized
  probabilities, as in the official fused softmax-matmul. timm's fused ``scaled_dot_product_attention`` saves its own
  tensors, so during training steps the callback sets ``fused_attn = False`` on those modules (timm's explicit path)
  and restores it afterwards; evaluation keeps the fused kernel. Deviation: timm multiplies the query by
  ``head_dim ** -0.5`` before the product while the official code scales the scores after it, so the saved query
  here is the scaled one (a grid of ``sqrt(head_dim) / 16`` in query units, clamped at ``8 sqrt(head_dim)``).
  Attention dropout must be 0 (it rescales the probabilities); setup refuses it otherwise.
- ``layernorm_keep_ratio``: a LayerNorm whose weight ILS froze keeps only the ``int(ratio * numel)`` normalised
  values of largest magnitude over its whole input (official: 10%, with int32 indices) plus the per-row mean and
  ``std = sqrt(var + eps)``; its input gradient is LayerNorm's usual one computed with the pruned normalised values
  (zeros elsewhere), its bias gradient is exact. The official backward uses ``eps = 1e-12`` (the HF ViT's
  LayerNorm eps); here the module's own ``eps``. On the tiny 4-block ViT of width 32 this pruning moves the gradient
  most (cosine about 0.87 against exact with every LayerNorm frozen; 0.99 at width 192).

Logged: ``slimfit/frozen_tensors`` each step; each epoch ``slimfit/saved_activation_bytes`` (the most bytes of
non-parameter tensors saved for backward in one training step of the epoch, each storage counted once) and on CUDA
``slimfit/peak_memory_bytes`` (``torch.cuda.max_memory_allocated``). :attr:`SlimFit.frozen_steps` holds, per epoch,
how many steps each tensor was frozen. Under DDP use ``DDPStrategy(find_unused_parameters=True)``: the trainable
set changes every step (every rank computes the same set, since scores depend only on the synchronised weights).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, ClassVar

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from timm.layers import Attention
from torch import Tensor, nn

from lit_methods.quantization.codecs import PACKABLE_BITS, FixedPointActivation, PrunedLayerNormInput

__all__ = ["InterLayerScheduler", "SlimFit", "relative_change"]

DEFAULT_EXCLUDED = (r"(^|\.)fc\.", r"(^|\.)head\.", r"cls_token", r"pos_embed", r"patch_embed")
DEFAULT_QUANTIZED_LINEARS = (r"(^|\.)mlp\.fc2$",)
OPERAND_FORMAT = (8, 4)  # bits, fractional bits: 3 integer bits + 4 fractional bits + sign (official)
PROBABILITY_FORMAT = (8, 8, False)  # unsigned, 8 fractional bits: [0, 255/256] (official)
_INITIAL_SCORE = 1e6


def relative_change(previous: Tensor, current: Tensor, eps: float = 1e-8) -> float:
    """SlimFit's score: ``sum |previous - current| / max(|previous|, eps) / numel``."""
    previous, current = previous.detach().double(), current.detach().double()
    return float(((previous - current).abs() / previous.abs().clamp_min(eps)).sum() / previous.numel())


class InterLayerScheduler:
    """Which tensors to freeze: the ``int(freeze_ratio * num_tensors)`` with the smallest scores.

    Args:
        num_tensors: number of eligible tensors.
        freeze_ratio: fraction of them frozen at every step, in [0, 1).
        seed: seed of the initial scores, drawn uniformly from ``[1e6, 2e6)`` (larger than any real score, so every
            tensor is trained before its score is compared).
    """

    def __init__(self, num_tensors: int, freeze_ratio: float, seed: int = 0) -> None:
        if isinstance(num_tensors, bool) or not isinstance(num_tensors, int) or num_tensors < 1:
            raise ValueError(f"num_tensors must be an integer >= 1, got {num_tensors!r}")
        if not 0.0 <= freeze_ratio < 1.0:
            raise ValueError(f"freeze_ratio must lie in [0, 1), got {freeze_ratio}")
        self.freeze_ratio = freeze_ratio
        self.pitch = int(freeze_ratio * num_tensors)
        generator = torch.Generator().manual_seed(seed)
        self.scores = _INITIAL_SCORE * (1.0 + torch.rand(num_tensors, generator=generator, dtype=torch.float64))

    def frozen(self) -> list[int]:
        """Indices of the tensors to freeze now, ascending."""
        order = torch.sort(self.scores, stable=True).indices
        return sorted(order[: self.pitch].tolist())

    def update(self, index: int, score: float) -> None:
        self.scores[index] = score

    def state_dict(self) -> dict[str, Any]:
        return {"scores": self.scores.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["scores"].shape != self.scores.shape:
            raise ValueError(f"saved scores cover {state['scores'].numel()} tensors, not {self.scores.numel()}")
        self.scores = state["scores"].clone()


@dataclass
class _Region:
    """A module whose forward is running: ``kind`` says how its saved tensors are stored."""

    kind: str
    module: nn.Module
    input: Tensor | None = None
    probabilities: Tensor | None = None
    packed_probabilities: FixedPointActivation | None = None


class SlimFit(Callback):
    """SlimFit (https://arxiv.org/abs/2305.18513): inter-layer scheduling of frozen tensors plus compressed storage
    of the activations saved for backward (low-bit GELU inputs, 8-bit linear inputs and attention operands, pruned
    frozen-LayerNorm inputs).

    Works on any LightningModule with automatic optimization; build the optimizer over all parameters (the default
    of :class:`~lit_methods.base.ImageClassifier`). The defaults follow the official ViT code; on a model without
    timm attention or an ``mlp.fc2`` layer pass ``quantize_attention=False`` / ``quantized_linears=()``.

    Args:
        freeze_ratio: fraction of the eligible tensors frozen at every step (official CIFAR-10 script: 0.9).
        excluded: regular expressions; parameters whose names match one (``re.search``) are never frozen (default:
            the classifier ``fc``/``head`` and the embeddings).
        quantize_gelu: save the inputs of ``nn.GELU`` modules for backward in low-bit fixed point.
        gelu_bits: bits of a saved GELU input (2, 4 or 8), sign included.
        gelu_fraction_bits: fractional bits of a saved GELU input.
        quantized_linears: regular expressions (``re.search``) of ``nn.Linear`` module names whose input, saved for
            the weight gradient while the weight is trainable, is stored as signed 8-bit fixed point with 4
            fractional bits (clamped to [-8, 7.9375]); each must match at least one ``nn.Linear``. Default: the
            second MLP layer of each timm block, the only one the official code quantizes; ``()`` turns it off.
        quantize_attention: store the operands of the two attention matmuls of timm ``Attention`` modules in 8
            bits: query (timm scales it by ``head_dim ** -0.5`` before the product), key and value as signed
            fixed point with 4 fractional bits, the softmax probabilities as unsigned fixed point with 8 fractional
            bits (also what the softmax backward reads). The modules are switched to timm's explicit attention
            path (``fused_attn = False``) during training steps, since the fused kernel saves its own tensors.
        layernorm_keep_ratio: for LayerNorms whose weight ILS froze, keep only this fraction of the normalised
            input (the largest magnitudes, with int32 indices) plus the per-row mean and std; the input gradient is
            then computed from the pruned normalised values (official: 0.1). ``None`` turns it off.
        eps: floor of ``|w_prev|`` in the score.
        seed: seed of the initial scores.
    """

    slug: ClassVar[str] = "slimfit"

    def __init__(
        self,
        freeze_ratio: float = 0.9,
        excluded: tuple[str, ...] | list[str] = DEFAULT_EXCLUDED,
        quantize_gelu: bool = True,
        gelu_bits: int = 4,
        gelu_fraction_bits: int = 1,
        quantized_linears: tuple[str, ...] | list[str] = DEFAULT_QUANTIZED_LINEARS,
        quantize_attention: bool = True,
        layernorm_keep_ratio: float | None = 0.1,
        eps: float = 1e-8,
        seed: int = 0,
    ) -> None:
        if not 0.0 <= freeze_ratio < 1.0:
            raise ValueError(f"freeze_ratio must lie in [0, 1), got {freeze_ratio}")
        if gelu_bits not in PACKABLE_BITS:
            raise ValueError(f"gelu_bits must be one of {PACKABLE_BITS}, got {gelu_bits!r}")
        if not 0 <= gelu_fraction_bits < gelu_bits:
            raise ValueError(f"gelu_fraction_bits must lie in [0, gelu_bits={gelu_bits}), got {gelu_fraction_bits}")
        if isinstance(quantized_linears, str):
            raise ValueError(
                f"quantized_linears must be a list of regular expressions, got the string {quantized_linears!r}"
            )
        for pattern in quantized_linears:
            try:
                re.compile(pattern)
            except (re.error, TypeError) as error:
                raise ValueError(f"quantized_linears holds {pattern!r}, not a regular expression: {error}") from None
        if not isinstance(quantize_attention, bool):
            raise ValueError(f"quantize_attention must be a bool, got {quantize_attention!r}")
        if layernorm_keep_ratio is not None and (
            isinstance(layernorm_keep_ratio, bool) or not 0.0 < layernorm_keep_ratio <= 1.0
        ):
            raise ValueError(f"layernorm_keep_ratio must be None or lie in (0, 1], got {layernorm_keep_ratio!r}")
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.freeze_ratio = freeze_ratio
        self.excluded = tuple(re.compile(pattern) for pattern in excluded)
        self.quantize_gelu = quantize_gelu
        self.gelu_bits = gelu_bits
        self.gelu_fraction_bits = gelu_fraction_bits
        self.quantized_linears = tuple(re.compile(pattern) for pattern in quantized_linears)
        self.quantize_attention = quantize_attention
        self.layernorm_keep_ratio = layernorm_keep_ratio
        self.eps = eps
        self.seed = seed
        self.names: list[str] = []
        self.tensors: list[nn.Parameter] = []
        self.scheduler: InterLayerScheduler | None = None
        self.snapshots: list[Tensor] = []
        self.frozen_steps: list[dict[str, int]] = []
        self.last_frozen: list[int] = []
        self.step_saved_bytes = 0
        self._epoch_saved_bytes = 0
        self._pending_state: dict[str, Any] | None = None
        self._saved_hooks: AbstractContextManager | None = None
        self._regions: list[_Region] = []
        self._saving = False  # inside saved_activation_hooks: the module hooks record which module is running
        self._attention_modules: list[Attention] = []
        self._parameter_pointers: set[int] = set()
        self._counted_storages: set[int] = set()

    # -- set-up -------------------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.scheduler is not None:
            return
        layer_norm_weights = {
            id(m.weight) for m in pl_module.modules() if isinstance(m, nn.LayerNorm) and m.weight is not None
        }
        for name, parameter in pl_module.named_parameters():
            eligible = parameter.ndim > 1 or id(parameter) in layer_norm_weights
            if eligible and parameter.requires_grad and not any(p.search(name) for p in self.excluded):
                self.names.append(name)
                self.tensors.append(parameter)
        if not self.names:
            raise ValueError(f"{type(pl_module).__name__} has no parameter SlimFit may freeze (all excluded?)")
        self._register_regions(pl_module)
        self.scheduler = InterLayerScheduler(len(self.names), self.freeze_ratio, self.seed)
        self._parameter_pointers = {p.data_ptr() for p in pl_module.parameters()}
        if self._pending_state is not None:
            self._restore(self._pending_state)

    def _register_regions(self, pl_module: nn.Module) -> None:
        """Forward hooks marking which module is running, so that the saved-tensor hooks know what they store."""
        model_name = type(pl_module).__name__
        unmatched = list(self.quantized_linears)
        frozen_candidates = {id(p) for p in self.tensors}
        kinds: dict[nn.Module, str] = {}
        for name, module in pl_module.named_modules():
            if self.quantize_gelu and isinstance(module, nn.GELU):
                kinds[module] = "gelu"
            elif isinstance(module, nn.Linear) and any(p.search(name) for p in self.quantized_linears):
                unmatched = [p for p in unmatched if not p.search(name)]
                kinds[module] = "linear"
            elif self.quantize_attention and isinstance(module, Attention):
                if module.attn_drop.p > 0:
                    raise ValueError(
                        f"quantize_attention stores attention probabilities in [0, 1) but {name}.attn_drop.p is "
                        f"{module.attn_drop.p} (dropout rescales them); use attn_drop_rate=0 or "
                        "quantize_attention=False"
                    )
                self._attention_modules.append(module)
                kinds[module] = "attention"
            elif (
                self.layernorm_keep_ratio is not None
                and isinstance(module, nn.LayerNorm)
                and module.weight is not None
                and id(module.weight) in frozen_candidates
            ):
                kinds[module] = "layernorm"
        for attention in self._attention_modules:  # what the attention's submodules save is not a matmul operand
            for child in attention.modules():
                kinds.setdefault(child, "other")
        for module, kind in kinds.items():
            module.register_forward_pre_hook(functools.partial(self._enter_region, kind))
            module.register_forward_hook(self._leave_region)
        if unmatched:
            raise ValueError(
                f"quantized_linears patterns {[p.pattern for p in unmatched]} match no nn.Linear of {model_name}: "
                "name your model's layers (module names, regular expressions) or pass quantized_linears=[]"
            )
        if self.quantize_attention and not self._attention_modules:
            raise ValueError(
                f"quantize_attention=True but {model_name} has no timm Attention module: pass quantize_attention=False"
            )

    def _enter_region(self, kind: str, module: nn.Module, inputs: tuple[Any, ...]) -> None:
        if not self._saving:  # outside a training step (validation, inference) nothing is saved for backward
            return
        self._regions.append(_Region(kind, module, inputs[0] if inputs and isinstance(inputs[0], Tensor) else None))

    def _leave_region(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        if self._regions and self._regions[-1].module is module:
            self._regions.pop()

    # -- saved activations --------------------------------------------------------------------------------------
    def _pack(self, tensor: Tensor) -> Any:
        if tensor.data_ptr() in self._parameter_pointers:
            return tensor
        stored = self._compress(tensor) if self._regions and tensor.is_floating_point() else None
        if stored is not None:
            return stored
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self._counted_storages:
            self._counted_storages.add(storage.data_ptr())
            self.step_saved_bytes += storage.nbytes()
        return tensor

    @torch.no_grad()
    def _compress(self, tensor: Tensor) -> FixedPointActivation | PrunedLayerNormInput | None:
        """The compressed form of a tensor saved inside the innermost running module, or None to keep it as is."""
        region = self._regions[-1]
        if region.kind == "gelu":
            stored = FixedPointActivation.pack(tensor, self.gelu_bits, self.gelu_fraction_bits)
        elif region.kind == "linear":
            stored = FixedPointActivation.pack(tensor, *OPERAND_FORMAT)
        elif region.kind == "attention":
            stored, counted = self._compress_attention_operand(region, tensor)
            if counted:
                return stored
        elif (
            region.kind == "layernorm"
            and not region.module.weight.requires_grad
            and region.input is not None
            and tensor.data_ptr() == region.input.data_ptr()
            and tensor.shape == region.input.shape
        ):
            stored = PrunedLayerNormInput.prune(
                tensor.detach(), len(region.module.normalized_shape), region.module.eps, self.layernorm_keep_ratio
            )
        else:
            return None
        self.step_saved_bytes += stored.nbytes
        return stored

    @staticmethod
    def _compress_attention_operand(region: _Region, tensor: Tensor) -> tuple[FixedPointActivation, bool]:
        """8-bit form of an attention matmul operand, and whether its bytes were already counted (a view of the
        probabilities the softmax saved reuses their codes)."""
        if type(tensor.grad_fn).__name__ == "SoftmaxBackward0":  # the softmax saves its output: the probabilities
            region.probabilities = tensor
            region.packed_probabilities = FixedPointActivation.pack(tensor, *PROBABILITY_FORMAT)
            return region.packed_probabilities, False
        probabilities = region.probabilities
        if probabilities is None or tensor.untyped_storage().data_ptr() != probabilities.untyped_storage().data_ptr():
            return FixedPointActivation.pack(tensor, *OPERAND_FORMAT), False
        same_layout = (
            tensor.is_contiguous()
            and tensor.storage_offset() == probabilities.storage_offset()
            and tensor.numel() == probabilities.numel()
        )
        if not same_layout:
            return FixedPointActivation.pack(tensor, *PROBABILITY_FORMAT), False
        return dataclasses.replace(region.packed_probabilities, shape=tensor.shape), True

    def _unpack(self, saved: Any) -> Tensor:
        if isinstance(saved, (FixedPointActivation, PrunedLayerNormInput)):
            return saved.restore()
        return saved

    def _close_saved_hooks(self) -> None:
        if self._saved_hooks is not None:
            self._saved_hooks.__exit__(None, None, None)
            self._saved_hooks = None

    # -- training -----------------------------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if len(self.snapshots) != len(self.tensors):
            self.snapshots = [p.detach().clone() for p in self.tensors]
        self.snapshots = [s.to(p.device) for s, p in zip(self.snapshots, self.tensors)]
        self._parameter_pointers = {p.data_ptr() for p in pl_module.parameters()}

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.frozen_steps.append(dict.fromkeys(self.names, 0))
        self._epoch_saved_bytes = 0
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        frozen = self.apply_schedule()
        for index in frozen:
            self.frozen_steps[-1][self.names[index]] += 1
        pl_module.log("slimfit/frozen_tensors", float(len(frozen)), on_step=True, on_epoch=False)
        self._saved_hooks = self.saved_activation_hooks()
        self._saved_hooks.__enter__()

    def apply_schedule(self) -> list[int]:
        """Freeze the tensors the scheduler picks now and unfreeze the others; returns the frozen indices."""
        self.last_frozen = self.scheduler.frozen()
        frozen = set(self.last_frozen)
        for index, parameter in enumerate(self.tensors):
            parameter.requires_grad_(index not in frozen)
        return self.last_frozen

    @contextlib.contextmanager
    def saved_activation_hooks(self) -> Iterator[None]:
        """A ``saved_tensors_hooks`` context that counts into :attr:`step_saved_bytes` the bytes saved for backward
        (parameters excluded, each storage once) and stores the activations the options compress in their compressed
        form; with ``quantize_attention`` the timm attention modules take their explicit path inside it."""
        self.step_saved_bytes = 0
        self._counted_storages = set()
        self._regions = []
        fused = [module.fused_attn for module in self._attention_modules]
        try:
            self._saving = True
            for module in self._attention_modules:
                module.fused_attn = False
            with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                yield
        finally:
            for module, was_fused in zip(self._attention_modules, fused):
                module.fused_attn = was_fused
            self._regions = []
            self._saving = False

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        self._close_saved_hooks()

    @torch.no_grad()
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._close_saved_hooks()
        self._epoch_saved_bytes = max(self._epoch_saved_bytes, self.step_saved_bytes)
        frozen = set(self.last_frozen)
        for index, parameter in enumerate(self.tensors):
            if index in frozen:
                continue
            self.scheduler.update(index, relative_change(self.snapshots[index], parameter, self.eps))
            self.snapshots[index].copy_(parameter)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = {"slimfit/saved_activation_bytes": float(self._epoch_saved_bytes)}
        if pl_module.device.type == "cuda":
            metrics["slimfit/peak_memory_bytes"] = float(torch.cuda.max_memory_allocated(pl_module.device))
        pl_module.log_dict(metrics, on_step=False, on_epoch=True)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for parameter in self.tensors:
            parameter.requires_grad_(True)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._close_saved_hooks()

    # -- checkpointing ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.scheduler is None:
            return {}
        return {
            "names": list(self.names),
            "scheduler": self.scheduler.state_dict(),
            "snapshots": [s.clone() for s in self.snapshots],
            "frozen_steps": [dict(epoch) for epoch in self.frozen_steps],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.scheduler is None:
            self._pending_state = state_dict
        else:
            self._restore(state_dict)

    def _restore(self, state: dict[str, Any]) -> None:
        if state["names"] != self.names:
            raise ValueError(f"the saved SlimFit state covers tensors {state['names']}, not {self.names}")
        self.scheduler.load_state_dict(state["scheduler"])
        self.snapshots = [s.clone() for s in state["snapshots"]]
        self.frozen_steps = [dict(epoch) for epoch in state["frozen_steps"]]
        self._pending_state = None
