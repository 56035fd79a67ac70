"""The one base of every method module (:class:`MethodBase`) and the classifier supervised methods build on."""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from lit_methods.datamodules.batch import as_batch
from lit_methods.datamodules.normalization import Normalize

__all__ = [
    "ImageClassifier",
    "MethodBase",
    "WarmupCosine",
    "constant_lr_factor",
    "drop_object_hyperparameters",
    "load_pretrained_weights",
    "parameter_groups",
    "read_checkpoint",
]

LR_SCHEDULES = ("cosine", "onecycle", "constant")
LR_SCHEDULE_STEPS_KEY = "lr_schedule_steps"
RNG_STATES_KEY = "global_rng_states"
_PLAIN_HPARAM_TYPES = (dict, list, tuple, str, int, float, bool, type(None))
_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def drop_object_hyperparameters(module: L.LightningModule) -> None:
    """Remove hyper-parameters that are Python objects (a backbone or an optimizer factory given in Python).

    Checkpoints then load with ``weights_only=True``; pass those objects again to ``load_from_checkpoint``. From the
    CLI such arguments hold their config (a dict) and stay, so a CLI-trained module reloads from its checkpoint alone.
    """
    for name, value in list(module.hparams.items()):
        if not isinstance(value, _PLAIN_HPARAM_TYPES):
            del module.hparams[name]


def parameter_groups(module: nn.Module, weight_decay: float, exclude_norm_and_bias: bool) -> list[dict[str, Any]]:
    """Optimizer parameter groups of ``module``'s trainable parameters; with ``exclude_norm_and_bias`` biases and
    norm-layer parameters get a group of their own without decay.

    Every group is marked for LARS (:class:`timm.optim.Lars`, which reads ``always_adapt`` per group): the decayed
    weights are adapted whatever the weight decay, biases and norm parameters never (as in BYOL and solo-learn).
    """
    if not exclude_norm_and_bias:
        params = [p for p in module.parameters() if p.requires_grad]
        return [{"params": params, "weight_decay": weight_decay, "always_adapt": True}]
    decay, no_decay = [], []
    for submodule in module.modules():
        for name, param in submodule.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            is_norm = isinstance(submodule, _NORM_TYPES)
            (no_decay if is_norm or name.endswith("bias") else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay, "always_adapt": True},
        {"params": no_decay, "weight_decay": 0.0, "always_adapt": False},
    ]


def constant_lr_factor(step: int) -> float:
    """LR factor of the parameter groups kept at their base rate (no warmup, no decay); picklable."""
    return 1.0


class WarmupCosine:
    """LR factor: linear warmup over ``warmup`` steps, then cosine decay to 0 at ``total`` steps (picklable)."""

    def __init__(self, warmup: int, total: int) -> None:
        self.warmup = warmup
        self.total = max(total, 1)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint or state dict file read on the CPU with ``weights_only=True``; ``FileNotFoundError`` naming the
    file when it does not exist."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no pretrained weights file at {str(path)!r}")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_pretrained_weights(
    module: nn.Module,
    source: str | Path | Mapping[str, Any],
    key_map: Mapping[str, str],
    strict: bool = True,
    fresh_prefixes: Sequence[str] = (),
    source_name: str | None = None,
) -> None:
    """Load the weights of ``source`` into ``module`` with renamed key prefixes.

    Args:
        module: the module that receives the weights.
        source: a Lightning checkpoint or a state dict, as a file (read with ``weights_only=True``) or a mapping;
            a checkpoint's ``state_dict`` entry is used.
        key_map: source key prefix -> module key prefix, e.g. ``{"backbone.": "backbone.", "projector.":
            "feature_head."}``; a key takes the longest prefix it starts with, and source keys under none are not
            read (a probe, a loss). ``{"": "backbone."}`` reads a whole state dict into ``module.backbone``.
        strict: every module key under the target prefixes (except ``fresh_prefixes``) must be given, and every
            renamed source key must exist in the module; otherwise a ``ValueError`` names the missing and unexpected
            keys (with ``strict=False`` they are listed in a warning). Mis-shaped keys always raise.
        fresh_prefixes: module key prefixes that keep their own initialization (e.g. a new classifier, ``"fc."``).
        source_name: how errors name the source (default: the file's path, or "the given state dict").
    """
    if not key_map:
        raise ValueError("key_map must map at least one source prefix to a module prefix")
    if isinstance(source, (str, Path)):
        name = source_name or str(source)
        weights: Mapping[str, Any] = read_checkpoint(source)
    else:
        name = source_name or "the given state dict"
        weights = source
    if "state_dict" in weights:
        weights = weights["state_dict"]
    source_prefixes = sorted(key_map, key=len, reverse=True)
    fresh = tuple(fresh_prefixes)
    renamed: dict[str, Tensor] = {}
    for key, value in weights.items():
        prefix = next((p for p in source_prefixes if key.startswith(p)), None)
        if prefix is not None:
            target = key_map[prefix] + key.removeprefix(prefix)
            if not (fresh and target.startswith(fresh)):
                renamed[target] = value
    if not renamed:
        wanted = ", ".join(repr(prefix + "*") for prefix in key_map)
        raise ValueError(f"{name} holds no {wanted} weights (its keys begin {sorted(weights)[:5]})")
    own = module.state_dict()
    targets = tuple(key_map.values())
    expected = {k for k in own if k.startswith(targets) and not (fresh and k.startswith(fresh))}
    missing, unexpected = sorted(expected - renamed.keys()), sorted(renamed.keys() - own.keys())
    shapes = {
        k: (tuple(own[k].shape), tuple(v.shape)) for k, v in renamed.items() if k in own and own[k].shape != v.shape
    }
    problems = []
    if missing:
        problems.append(f"missing {missing}")
    if unexpected:
        problems.append(f"unexpected {unexpected}")
    mismatch = f"{type(module).__name__} does not match the weights in {name}"
    if shapes:
        raise ValueError(f"{mismatch}: shapes (module, pretrained) differ: {shapes}; " + "; ".join(problems))
    if problems and strict:
        raise ValueError(f"{mismatch}: " + "; ".join(problems))
    if problems:
        rank_zero_warn(f"{mismatch} (loaded with strict=False): " + "; ".join(problems))
    module.load_state_dict({k: v for k, v in renamed.items() if k in own}, strict=False)


def global_rng_states() -> dict[str, Any]:
    """This process' global random states (torch CPU and CUDA, numpy, Python) as tensors and plain values, so a
    checkpoint holding them still loads with ``weights_only=True``."""
    kind, keys, position, has_gauss, cached_gauss = np.random.get_state()
    version, python_state, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gauss": float(cached_gauss)},
        "python": {"version": version, "state": torch.tensor(python_state, dtype=torch.int64), "gauss_next": gauss_next},
    }


def set_global_rng_states(states: Mapping[str, Any]) -> None:
    """Restore what :func:`global_rng_states` returned (CUDA states only where as many devices are visible)."""
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
    numpy_state = states["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gauss"],
        )
    )
    python_state = states["python"]
    random.setstate((python_state["version"], tuple(python_state["state"].tolist()), python_state["gauss_next"]))


class MethodBase(L.LightningModule):
    """The one base of every method module: parameter groups, the injectable optimizer and LR schedule, loading
    pretrained weights with a key map, and input normalization when the data leaves it to the model.

    In the style of solo-learn's ``BaseMethod`` (da Costa et al., "solo-learn: A Library of Self-supervised Methods
    for Visual Representation Learning", JMLR 2022), small and typed. Subclasses call ``save_hyperparameters`` and
    :func:`drop_object_hyperparameters` themselves (their own arguments are the hyper-parameters).

    **Parameter groups** (:meth:`optimizer_parameters`): the method's trainable parameters with weight decay,
    biases and norm parameters without it (``exclude_norm_and_bias_from_weight_decay``). Child modules named by
    :meth:`param_group_options` get groups of their own with other options: a learning rate (``"lr"``), a weight
    decay for all their parameters (``"weight_decay"``, then one group), or a constant rate (``"scheduled":
    False``: no warmup or decay). Groups carry ``always_adapt`` for LARS (:class:`timm.optim.Lars`, You et al.,
    arXiv:1708.03888): decayed weights are adapted, biases, norm parameters and groups with their own weight decay
    not, whatever arguments build the optimizer.

    **Optimizer**: ``optimizer`` (a callable of the parameter groups, from the CLI by ``class_path``, e.g.
    ``torch.optim.AdamW`` or ``timm.optim.Lars``; its own arguments hold its learning rate) or, by default, SGD with
    ``lr``, ``momentum`` and ``nesterov``. **Schedule**, stepped every optimizer step: ``lr_scheduler`` (a callable
    of the optimizer, for every group) or ``lr_schedule``: ``"cosine"`` (linear warmup over ``warmup_steps`` then
    cosine decay to 0), ``"onecycle"`` (Smith & Topin, arXiv:1708.07120) or ``"constant"``, sized from
    ``trainer.estimated_stepping_batches``; a run resumed with another length rebuilds it for the new length at the
    restored step (:meth:`resize_lr_schedule`).

    **Inputs**: with ``inputs_normalized=False`` (a datamodule built with ``normalize=False`` yields [0, 1] pixels)
    the method owns ``self.normalize``, a :class:`~lit_methods.datamodules.Normalize` of ``mean`` and ``std``, and
    its forward applies it first (:meth:`normalize_inputs`). Methods that work in pixel space set
    ``requires_pixel_inputs = True`` and refuse normalized data at construction.

    Args:
        lr: learning rate of the default SGD (the peak rate of the schedule).
        momentum: SGD momentum.
        weight_decay: weight decay of the decayed parameter groups.
        nesterov: Nesterov momentum of the default SGD.
        lr_schedule: the schedule used without ``lr_scheduler`` (above).
        warmup_steps: linear warmup of the cosine schedule, in optimizer steps (int) or as a fraction of all
            steps (float).
        exclude_norm_and_bias_from_weight_decay: no weight decay (and no LARS adaptation) on biases and
            normalization parameters.
        optimizer: replaces the default SGD; called with the parameter groups.
        lr_scheduler: replaces ``lr_schedule``; called with the optimizer.
        mean: per-channel normalization mean of the data (filled from the datamodule by the CLI).
        std: per-channel normalization standard deviation of the data (filled from the datamodule by the CLI).
        inputs_normalized: whether batches arrive normalized (the datamodule's default) or as [0, 1] pixels.
    """

    requires_pixel_inputs: ClassVar[bool] = False
    #: the ``lr_schedule`` names :meth:`make_lr_scheduler` knows; a method adding one extends both
    lr_schedules: ClassVar[tuple[str, ...]] = LR_SCHEDULES

    def __init__(
        self,
        *,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        lr_schedule: Literal["cosine", "onecycle", "constant"] = "cosine",
        warmup_steps: int | float = 0,
        exclude_norm_and_bias_from_weight_decay: bool = True,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        inputs_normalized: bool = True,
    ) -> None:
        super().__init__()
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if momentum < 0:
            raise ValueError(f"momentum must be >= 0, got {momentum}")
        if nesterov and momentum == 0:
            raise ValueError("nesterov=True needs a momentum > 0, got momentum=0")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if lr_schedule not in self.lr_schedules:
            raise ValueError(f"lr_schedule must be one of {self.lr_schedules}, got {lr_schedule!r}")
        if isinstance(warmup_steps, float) and not 0.0 <= warmup_steps < 1.0:
            raise ValueError(f"warmup_steps as a fraction must lie in [0, 1), got {warmup_steps}")
        if isinstance(warmup_steps, int) and warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        for name, factory in (("optimizer", optimizer), ("lr_scheduler", lr_scheduler)):
            if factory is not None and not callable(factory):
                raise ValueError(
                    f"{name} must be a callable (from the CLI a class_path, e.g. torch.optim.AdamW or "
                    f"timm.optim.Lars for the optimizer), got {factory!r}"
                )
        if self.requires_pixel_inputs and inputs_normalized:
            raise ValueError(
                f"{type(self).__name__} works on [0, 1] pixels and normalizes them itself: build the datamodule with "
                "normalize=False and give the model inputs_normalized=False with the data's mean and std"
            )
        if not inputs_normalized and (mean is None or std is None):
            raise ValueError(
                "inputs_normalized=False needs the data's mean and std (the CLI fills them), "
                f"got mean={mean}, std={std}"
            )
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.nesterov = nesterov
        self.lr_schedule = lr_schedule
        self.warmup_steps = warmup_steps
        self.exclude_norm_and_bias_from_weight_decay = exclude_norm_and_bias_from_weight_decay
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.inputs_normalized = inputs_normalized
        self.normalize = None if inputs_normalized else Normalize(mean, std)
        self._lr_schedule_steps: int | None = None
        self._restored_lr_schedule_steps: int | None = None

    # -- inputs ----------------------------------------------------------------------------------------------------
    def normalize_inputs(self, x: Tensor) -> Tensor:
        """``x`` normalized with the data's mean and std when batches arrive as [0, 1] pixels; else ``x``."""
        return x if self.normalize is None else self.normalize(x)

    # -- pretrained weights ------------------------------------------------------------------------------------------
    def load_pretrained_weights(
        self,
        source: str | Path | Mapping[str, Any],
        key_map: Mapping[str, str],
        strict: bool = True,
        fresh_prefixes: Sequence[str] = (),
        source_name: str | None = None,
    ) -> None:
        """Load ``source``'s weights into this method with renamed key prefixes (:func:`load_pretrained_weights`)."""
        load_pretrained_weights(self, source, key_map, strict, fresh_prefixes, source_name)

    # -- optimization ------------------------------------------------------------------------------------------------
    def param_group_options(self) -> dict[str, dict[str, Any]]:
        """Child modules whose parameters get groups of their own, with the options that differ from the method's
        (``lr``, ``weight_decay``, ``scheduled``, ``always_adapt``); none by default."""
        return {}

    def optimizer_parameters(self) -> list[dict[str, Any]]:
        """The parameter groups handed to the optimizer (see the class doc); empty groups are left out."""
        options = self.param_group_options()
        children = dict(self.named_children())
        unknown = sorted(set(options) - set(children))
        if unknown:
            raise ValueError(
                f"param_group_options names {unknown}, which are not child modules of {type(self).__name__}"
            )
        own_groups = {id(p) for name in options for p in children[name].parameters()}
        groups = []
        for group in parameter_groups(self, self.weight_decay, self.exclude_norm_and_bias_from_weight_decay):
            groups.append({**group, "params": [p for p in group["params"] if id(p) not in own_groups]})
        for name, group_options in options.items():
            module = children[name]
            if "weight_decay" in group_options:
                params = [p for p in module.parameters() if p.requires_grad]
                groups.append({"params": params, "always_adapt": False, **group_options})
            else:
                split = parameter_groups(module, self.weight_decay, self.exclude_norm_and_bias_from_weight_decay)
                groups += [{**group, **group_options} for group in split]
        return [group for group in groups if group["params"]]

    def make_default_optimizer(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        """The optimizer used without ``optimizer``: SGD with ``lr``, ``momentum`` and ``nesterov``."""
        return torch.optim.SGD(groups, lr=self.lr, momentum=self.momentum, nesterov=self.nesterov)

    def lr_schedule_steps(self) -> int:
        """The optimizer steps of the whole run (``trainer.estimated_stepping_batches``), which size the built-in
        schedules; a ``ValueError`` when the trainer's settings give no end or no step at all."""
        trainer = self.trainer
        total = trainer.estimated_stepping_batches
        if math.isinf(total):
            raise ValueError(
                f"lr_schedule={self.lr_schedule!r} is sized from the run's optimizer steps, but max_epochs="
                f"{trainer.max_epochs} and max_steps={trainer.max_steps} set no end (max_time alone does not): "
                "set trainer.max_steps or trainer.max_epochs, or use lr_schedule='constant'"
            )
        if total < 1:
            raise ValueError(
                f"this run has no optimizer step to size lr_schedule={self.lr_schedule!r} over: max_steps="
                f"{trainer.max_steps}, or the training set gives no batch (a batch_size larger than the training set "
                "gives none when the last partial batch is dropped)"
            )
        return int(total)

    def make_lr_scheduler(self, optimizer: torch.optim.Optimizer) -> Any:
        """The schedule of ``lr_schedule`` (``None`` for ``"constant"``); groups with ``scheduled: False`` keep
        their rate."""
        if self.lr_schedule == "constant":
            return None
        constant_groups = not all(group.get("scheduled", True) for group in optimizer.param_groups)
        if self.lr_schedule == "onecycle" and constant_groups:
            raise ValueError("lr_schedule='onecycle' schedules every group; use 'cosine' with constant-rate groups")
        total = self.lr_schedule_steps()
        if self.lr_schedule == "onecycle":
            # a group's "max_lr" is there when the schedule is rebuilt on a resumed optimizer (its "lr" has moved)
            peak = [group.get("max_lr", group["lr"]) for group in optimizer.param_groups]
            return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peak, total_steps=total)
        warmup = round(self.warmup_steps * total) if isinstance(self.warmup_steps, float) else self.warmup_steps
        cosine = WarmupCosine(min(warmup, total), total)
        factors = [cosine if group.get("scheduled", True) else constant_lr_factor for group in optimizer.param_groups]
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factors)

    def configure_optimizers(self) -> Any:
        groups = self.optimizer_parameters()
        if self.optimizer_factory is not None:
            optimizer = self.optimizer_factory(groups)
        else:
            optimizer = self.make_default_optimizer(groups)
        self._lr_schedule_steps = None
        if self.lr_scheduler_factory is not None:
            scheduler = self.lr_scheduler_factory(optimizer)
        else:
            scheduler = self.make_lr_scheduler(optimizer)
            if scheduler is not None:
                self._lr_schedule_steps = self.lr_schedule_steps()
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- resuming with another run length --------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Save the schedule's length and this process' global random states: dropout, per-image transforms,
        attack starts and random mixing draw from them, so a resumed run draws what the uninterrupted one would
        (Lightning's checkpoints do not hold them). Under DDP the states of rank 0 are saved."""
        if self._lr_schedule_steps is not None:
            checkpoint[LR_SCHEDULE_STEPS_KEY] = self._lr_schedule_steps
        checkpoint[RNG_STATES_KEY] = global_rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._restored_lr_schedule_steps = checkpoint.get(LR_SCHEDULE_STEPS_KEY)
        if RNG_STATES_KEY in checkpoint:
            set_global_rng_states(checkpoint[RNG_STATES_KEY])

    def on_train_start(self) -> None:
        self.resize_lr_schedule()

    def resize_lr_schedule(self) -> None:
        """After resuming, rebuild the built-in schedule for this run's length when it differs from the
        checkpoint's (a run extended from 5 to 10 steps): the new schedule continues at the restored step.

        The restored scheduler would otherwise keep the old length: one-cycle stops with an error past its last
        step and cosine trains on at rate 0. Called at ``on_train_start`` (after Lightning restored the
        scheduler's state); subclasses that override ``on_train_start`` call ``super().on_train_start()``.
        """
        restored, total = self._restored_lr_schedule_steps, self._lr_schedule_steps
        self._restored_lr_schedule_steps = None
        if restored is None or total is None or restored == total:
            return
        (config,) = self.trainer.lr_scheduler_configs
        step = config.scheduler.last_epoch
        if step >= total:
            return  # the restored run is already as long as this one: the trainer stops at once
        resized = self.make_lr_scheduler(config.scheduler.optimizer)
        resized.last_epoch = step - 1
        with warnings.catch_warnings():
            # stepping to the restored step here, before this process's first optimizer step, is intended
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
            resized.step()
        config.scheduler = resized
        rank_zero_warn(
            f"resumed at step {step} of a {restored}-step lr_schedule={self.lr_schedule!r}; the schedule is rebuilt "
            f"for this run's {total} steps and continues at step {step}"
        )


class ImageClassifier(MethodBase):
    """Image classification with any backbone: cross-entropy, top-1/top-5 accuracy, SGD and an LR schedule (the
    optimization and input handling of :class:`MethodBase`).

    Methods subclass it and override :meth:`compute_loss` (the objective), :meth:`forward` (the head) or
    :meth:`training_step`; everything else (metrics, optimizer, schedule, logging) is shared.

    Args:
        backbone: any ``nn.Module`` mapping ``(N, C, H, W)`` images to ``(N, num_classes)`` logits. From the CLI it
            is given by ``class_path``; its ``num_classes`` and ``in_channels`` are filled from the datamodule.
            A backbone (or optimizer/scheduler) built in Python is not stored with the hyper-parameters: pass it
            again to ``load_from_checkpoint(path, backbone=...)``.
        num_classes: number of classes (linked from the datamodule by the CLI; read from
            ``backbone.num_classes`` when omitted).
        in_channels: input channels; with ``image_size`` it lets the constructor check the backbone's output shape.
        image_size: input height and width (linked from the datamodule by the CLI).
        label_smoothing: label smoothing of the cross-entropy (Szegedy et al. 2016, arXiv:1512.00567).
        lr: learning rate of the default SGD optimizer (peak rate of one-cycle).
        momentum: SGD momentum.
        weight_decay: weight decay.
        nesterov: Nesterov momentum.
        lr_schedule: ``"cosine"`` (per-step cosine decay to 0 after ``warmup_steps`` of linear warmup),
            ``"onecycle"`` (Smith & Topin 2017, arXiv:1708.07120) or ``"constant"``; all sized from
            ``trainer.estimated_stepping_batches``.
        warmup_steps: linear warmup of the cosine schedule, in optimizer steps (an int) or as a fraction of all
            steps (a float).
        exclude_norm_and_bias_from_weight_decay: no weight decay on biases and normalization parameters.
        channels_last: run the backbone in channels-last memory format (faster convolutions on recent GPUs).
        optimizer: replaces the default SGD; called with the parameter groups (``class_path`` from the CLI).
        lr_scheduler: replaces ``lr_schedule``; called with the optimizer and stepped every optimizer step.
        mean: per-channel normalization mean of the data (filled from the datamodule by the CLI).
        std: per-channel normalization standard deviation of the data (filled from the datamodule by the CLI).
        inputs_normalized: ``False`` when batches are [0, 1] pixels: the model normalizes them with ``mean`` and
            ``std`` first (see :class:`MethodBase`).
    """

    slug: ClassVar[str] = "baseline"
    backbone_output: ClassVar[Literal["logits", "features"]] = "logits"
    """What :meth:`check_backbone_output` expects of the backbone: ``num_classes`` logits, or features
    (``forward_features``, ``num_features`` wide) for methods that put heads of their own on it."""

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int | None = None,
        in_channels: int | None = None,
        image_size: tuple[int, int] | None = None,
        label_smoothing: float = 0.0,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        nesterov: bool = True,
        lr_schedule: Literal["cosine", "onecycle", "constant"] = "cosine",
        warmup_steps: int | float = 0,
        exclude_norm_and_bias_from_weight_decay: bool = False,
        channels_last: bool = False,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        inputs_normalized: bool = True,
    ) -> None:
        super().__init__(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            nesterov=nesterov,
            lr_schedule=lr_schedule,
            warmup_steps=warmup_steps,
            exclude_norm_and_bias_from_weight_decay=exclude_norm_and_bias_from_weight_decay,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            mean=mean,
            std=std,
            inputs_normalized=inputs_normalized,
        )
        self.save_hyperparameters()
        drop_object_hyperparameters(self)
        if num_classes is None:
            num_classes = getattr(backbone, "num_classes", None)
            if not isinstance(num_classes, int):
                raise ValueError("num_classes was not given and the backbone has no integer `num_classes` attribute")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing}")
        self.backbone = backbone
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.image_size = tuple(image_size) if image_size is not None else None
        self.label_smoothing = label_smoothing
        self.channels_last = channels_last
        if channels_last:
            self.backbone = self.backbone.to(memory_format=torch.channels_last)
        if in_channels is not None and self.image_size is not None:
            self.check_backbone_output()
        self.train_metrics = self._make_metrics("train")
        self.val_metrics = self._make_metrics("val")
        self.test_metrics = self._make_metrics("test")
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()

    # -- construction helpers -----------------------------------------------------------------------------------
    def _make_metrics(self, stage: str) -> MetricCollection:
        metrics: dict[str, MulticlassAccuracy] = {"acc": MulticlassAccuracy(self.num_classes, average="micro")}
        if self.num_classes > 5:
            metrics["acc_top5"] = MulticlassAccuracy(self.num_classes, top_k=5, average="micro")
        return MetricCollection(metrics, prefix=f"{stage}/")

    @torch.no_grad()
    def check_backbone_output(self) -> None:
        """Construction-time check of the backbone on the data's image shape: ``backbone(x)`` gives ``num_classes``
        logits or, when the method has heads of its own (``backbone_output = "features"``),
        ``backbone.forward_features(x)`` gives ``backbone.num_features`` features. Runs in eval mode so that batch
        norm statistics are untouched."""
        was_training = self.backbone.training
        self.backbone.eval()
        try:
            dummy = torch.zeros(2, self.in_channels, *self.image_size)
            if self.backbone_output == "features":
                out = self.backbone.forward_features(dummy)
            else:
                out = self.backbone(dummy)
        finally:
            self.backbone.train(was_training)
        shape = f"{self.in_channels}x{self.image_size[0]}x{self.image_size[1]}"
        if self.backbone_output == "features":
            if out.shape != (2, self.backbone.num_features):
                raise ValueError(
                    f"the backbone's forward_features maps {shape} inputs to shape {tuple(out.shape[1:])} per sample, "
                    f"but its num_features is {self.backbone.num_features}"
                )
        elif out.shape != (2, self.num_classes):
            raise ValueError(
                f"the backbone maps {shape} inputs to shape {tuple(out.shape[1:])} per sample, but the classifier "
                f"expects ({self.num_classes},) logits; construct the backbone with num_classes and in_channels of "
                "the data"
            )

    # -- the parts methods override -----------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        x = self.normalize_inputs(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.backbone(x)

    def compute_loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Cross-entropy with label smoothing; ``targets`` are class indices or class probabilities."""
        return F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)

    def shared_step(self, batch: Any, stage: str) -> tuple[Tensor, Tensor, Tensor]:
        """Forward one batch (named fields, or an ``(inputs, targets)`` tuple); returns ``(loss, logits, targets)``."""
        batch = as_batch(batch)
        images, targets = batch["inputs"], batch["targets"]
        logits = self(images)
        return self.compute_loss(logits, targets), logits, targets

    # -- Lightning hooks ---------------------------------------------------------------------------------------
    def _update_metrics(self, stage: str, logits: Tensor, targets: Tensor) -> None:
        hard_targets = targets.argmax(dim=1) if targets.is_floating_point() else targets
        metrics = getattr(self, f"{stage}_metrics")
        metrics.update(logits.detach(), hard_targets)
        self.log_dict(metrics, on_step=False, on_epoch=True)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss, logits, targets = self.shared_step(batch, "train")
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        self._update_metrics("train", logits, targets)
        return loss

    def _eval_step(self, batch: Any, stage: str) -> Tensor:
        loss, logits, targets = self.shared_step(batch, stage)
        mean_loss = getattr(self, f"{stage}_loss")
        mean_loss.update(loss.detach(), weight=len(targets))
        self.log(f"{stage}/loss", mean_loss, on_step=False, on_epoch=True, prog_bar=stage == "val")
        self._update_metrics(stage, logits, targets)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._eval_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._eval_step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        return self(as_batch(batch)["inputs"]).softmax(dim=1)
