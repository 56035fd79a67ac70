"""SlimFit: memory-efficient fine-tuning by freezing most weight tensors each step (inter-layer scheduling, ILS) and
storing GELU inputs in low-bit fixed point.

Ardakani, Haan, Tan, Popovici, Cheung, Zhao, Peng, Cong, Abbasi, "SlimFit: Memory-Efficient Fine-Tuning of
Transformer-based Models Using Training Dynamics", 2023, https://arxiv.org/abs/2305.18513; official code
arashardakani/SlimFit (``ViT/CIFAR10.py``, ``ViT/utils_ILS.py``).

ILS, as coded: the eligible tensors are every parameter with more than one dimension plus LayerNorm weights, minus
the classifier and the embeddings (``excluded``). Each starts with a large random score. Every step the
``int(freeze_ratio * count)`` tensors with the smallest scores are frozen (``requires_grad=False``; ties go to the
lower index) and after the step each trainable tensor's score becomes its normalised weight change
``sum |w_prev - w_now| / |w_prev| / numel`` (``|w_prev|`` floored at ``eps``); frozen tensors keep their stale
score. Biases and LayerNorm biases are never frozen. Frozen tensors get no gradient (Lightning's
``zero_grad(set_to_none=True)``), so optimizers such as AdamW leave them and their state alone, weight decay
included.

Memory: a frozen linear layer's input is no longer saved for its weight gradient (autograd saves only what the
needed gradients use), and with ``quantize_gelu`` GELU inputs are saved as ``gelu_bits``-bit fixed point with
``gelu_fraction_bits`` fractional bits (official: 4 bits, 1 fractional, so values are clamped to [-4, 3.5]), packed
``8 // gelu_bits`` to a byte, through ``torch.autograd.graph.saved_tensors_hooks`` instead of custom autograd
functions. Not implemented from the official code: 8-bit storage of the attention matmul operands (timm's ViT
uses fused ``scaled_dot_product_attention``), 8-bit inputs of trainable linear layers and the top-10% pruning of
frozen LayerNorm activations.

Logged: ``slimfit/frozen_tensors`` each step; each epoch ``slimfit/saved_activation_bytes`` (the most bytes of
non-parameter tensors saved for backward in one training step of the epoch, each storage counted once) and on CUDA
``slimfit/peak_memory_bytes`` (``torch.cuda.max_memory_allocated``). :attr:`SlimFit.frozen_steps` holds, per epoch,
how many steps each tensor was frozen. Under DDP use ``DDPStrategy(find_unused_parameters=True)``: the trainable
set changes every step (every rank computes the same set, since scores depend only on the synchronised weights).
"""

from __future__ import annotations

import re
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

__all__ = ["InterLayerScheduler", "SlimFit", "pack_fixed_point", "relative_change", "unpack_fixed_point"]

DEFAULT_EXCLUDED = (r"(^|\.)fc\.", r"(^|\.)head\.", r"cls_token", r"pos_embed", r"patch_embed")
PACKABLE_BITS = (2, 4, 8)
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


def pack_fixed_point(values: Tensor, bits: int, fraction_bits: int) -> Tensor:
    """Round ``values`` to nearest on the signed ``bits``-bit grid with ``fraction_bits`` fractional bits (saturating)
    and pack ``8 // bits`` codes into each byte of a flat ``uint8`` tensor."""
    levels = 2**bits
    scaled = torch.round(values.detach().float() * 2.0**fraction_bits)
    codes = (scaled.clamp(-(levels // 2), levels // 2 - 1) + levels // 2).to(torch.uint8).flatten()
    per_byte = 8 // bits
    codes = torch.nn.functional.pad(codes, (0, (-codes.numel()) % per_byte)).view(-1, per_byte)
    packed = torch.zeros(codes.shape[0], dtype=torch.uint8, device=codes.device)
    for slot in range(per_byte):
        packed |= codes[:, slot] << (slot * bits)
    return packed


def unpack_fixed_point(packed: Tensor, bits: int, fraction_bits: int, shape: torch.Size, dtype: torch.dtype) -> Tensor:
    """Inverse of :func:`pack_fixed_point`: the rounded values of the original ``shape`` and ``dtype``."""
    per_byte = 8 // bits
    mask = 2**bits - 1
    codes = torch.stack([(packed >> (slot * bits)) & mask for slot in range(per_byte)], dim=1).flatten()
    count = shape.numel()
    values = (codes[:count].float() - 2 ** (bits - 1)) / 2.0**fraction_bits
    return values.view(shape).to(dtype)


class SlimFit(Callback):
    """SlimFit (https://arxiv.org/abs/2305.18513): inter-layer scheduling of frozen tensors plus low-bit GELU inputs.

    Works on any LightningModule with automatic optimization; build the optimizer over all parameters (the default
    of :class:`~lit_methods.base.ImageClassifier`).

    Args:
        freeze_ratio: fraction of the eligible tensors frozen at every step (official CIFAR-10 script: 0.9).
        excluded: regular expressions; parameters whose names match one (``re.search``) are never frozen (default:
            the classifier ``fc``/``head`` and the embeddings).
        quantize_gelu: save the inputs of ``nn.GELU`` modules for backward in low-bit fixed point.
        gelu_bits: bits of a saved GELU input (2, 4 or 8), sign included.
        gelu_fraction_bits: fractional bits of a saved GELU input.
        eps: floor of ``|w_prev|`` in the score.
        seed: seed of the initial scores.
    """

    def __init__(
        self,
        freeze_ratio: float = 0.9,
        excluded: tuple[str, ...] | list[str] = DEFAULT_EXCLUDED,
        quantize_gelu: bool = True,
        gelu_bits: int = 4,
        gelu_fraction_bits: int = 1,
        eps: float = 1e-8,
        seed: int = 0,
    ) -> None:
        if not 0.0 <= freeze_ratio < 1.0:
            raise ValueError(f"freeze_ratio must lie in [0, 1), got {freeze_ratio}")
        if gelu_bits not in PACKABLE_BITS:
            raise ValueError(f"gelu_bits must be one of {PACKABLE_BITS}, got {gelu_bits!r}")
        if not 0 <= gelu_fraction_bits < gelu_bits:
            raise ValueError(f"gelu_fraction_bits must lie in [0, gelu_bits={gelu_bits}), got {gelu_fraction_bits}")
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.freeze_ratio = freeze_ratio
        self.excluded = tuple(re.compile(pattern) for pattern in excluded)
        self.quantize_gelu = quantize_gelu
        self.gelu_bits = gelu_bits
        self.gelu_fraction_bits = gelu_fraction_bits
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
        self._saved_hooks: torch.autograd.graph.saved_tensors_hooks | None = None
        self._inside_gelu = False
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
        self.scheduler = InterLayerScheduler(len(self.names), self.freeze_ratio, self.seed)
        for module in pl_module.modules():
            if isinstance(module, nn.GELU):
                module.register_forward_pre_hook(self._enter_gelu)
                module.register_forward_hook(self._leave_gelu)
        self._parameter_pointers = {p.data_ptr() for p in pl_module.parameters()}
        if self._pending_state is not None:
            self._restore(self._pending_state)

    def _enter_gelu(self, module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        self._inside_gelu = True

    def _leave_gelu(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        self._inside_gelu = False

    # -- saved activations --------------------------------------------------------------------------------------
    def _pack(self, tensor: Tensor) -> Any:
        if tensor.data_ptr() in self._parameter_pointers:
            return tensor
        if self.quantize_gelu and self._inside_gelu and tensor.is_floating_point():
            packed = pack_fixed_point(tensor, self.gelu_bits, self.gelu_fraction_bits)
            self.step_saved_bytes += packed.nbytes
            return (packed, tensor.shape, tensor.dtype)
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self._counted_storages:
            self._counted_storages.add(storage.data_ptr())
            self.step_saved_bytes += storage.nbytes()
        return tensor

    def _unpack(self, saved: Any) -> Tensor:
        if isinstance(saved, tuple):
            packed, shape, dtype = saved
            return unpack_fixed_point(packed, self.gelu_bits, self.gelu_fraction_bits, shape, dtype)
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

    def saved_activation_hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        """A fresh ``saved_tensors_hooks`` context that counts into :attr:`step_saved_bytes` the bytes saved for
        backward (parameters excluded, each storage once) and, with ``quantize_gelu``, saves GELU inputs packed."""
        self.step_saved_bytes = 0
        self._counted_storages = set()
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

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
        self._inside_gelu = False

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
