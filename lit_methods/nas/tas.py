"""TAS: network pruning via transformable architecture search (Dong & Yang, NeurIPS 2019, arXiv:1905.09717).

The search (:class:`TAS`) learns a categorical distribution over the width of every width decision and the depth of
every stage of a CIFAR ResNet; :class:`TASDistillation` then trains the argmax shape from scratch with knowledge
distillation from the unpruned network.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from lit_methods.base import ImageClassifier, MethodBase, drop_object_hyperparameters, load_pretrained_weights
from lit_methods.datamodules.batch import as_batch
from lit_methods.nas.shapes import (
    ResNetShape,
    channel_interpolate,
    depth_choices,
    shape_flops,
    width_choices,
)

__all__ = ["TAS", "TASDistillation", "TASSearchResNet", "flop_loss", "kd_loss", "sample_two"]

ARCH_OPTIMIZER_KEY = "tas_architecture_optimizer"
BEST_SHAPE_KEY = "tas_best_shape"


def sample_two(logits: Tensor, tau: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """TAS' sampling of 2 candidates: Gumbel-perturbed log-softmax over ``tau`` gives probabilities, 2 indices are
    drawn from them without replacement, and the mixing weights are the softmax of the 2 chosen perturbed logits
    (differentiable in ``logits``). A single candidate is returned with weight 1."""
    if logits.numel() == 1:
        return torch.zeros(1, dtype=torch.long), torch.ones(1, device=logits.device)
    gumbel = -torch.empty(logits.shape).exponential_(generator=generator).log().to(logits.device)
    perturbed = (logits.log_softmax(-1) + gumbel) / tau
    indices = torch.multinomial(perturbed.detach().softmax(-1).cpu(), 2, replacement=False, generator=generator)
    return indices, perturbed[indices.to(logits.device)].softmax(-1)


def gumbel_softmax(logits: Tensor, tau: float, generator: torch.Generator) -> Tensor:
    """Gumbel-softmax probabilities of all candidates (TAS' depth mixing)."""
    gumbel = -torch.empty(logits.shape).exponential_(generator=generator).log().to(logits.device)
    return ((logits.log_softmax(-1) + gumbel) / tau).softmax(-1)


def flop_loss(expected_flops: Tensor, current_flops: float, full_flops: float, target: float, tolerance: float) -> Tensor:
    """TAS' FLOPs cost: ``-log E[F]`` when the argmax shape is under ``(target - tolerance) * F_full`` (grow),
    ``+log E[F]`` when it is over ``target * F_full`` (shrink), 0 in between."""
    if current_flops < (target - tolerance) * full_flops:
        return -expected_flops.log()
    if current_flops > target * full_flops:
        return expected_flops.log()
    return expected_flops.new_zeros(())


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, weight: float, temperature: float) -> Tensor:
    """``(1 - weight) * CE + weight * T^2 * KL(teacher_T || student_T)`` (Hinton et al., arXiv:1503.02531)."""
    soft = F.kl_div(
        F.log_softmax(student_logits / temperature, -1), F.softmax(teacher_logits / temperature, -1),
        reduction="batchmean",
    )
    return (1 - weight) * F.cross_entropy(student_logits, targets) + weight * temperature**2 * soft


class _ElasticConvBN(nn.Module):
    """A conv run at full width on a full-width (zero-padded) input; the output sliced to each sampled width, each
    with its own BN, interpolated channel-wise to the larger sampled width, mixed, and zero-padded to full width."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, widths: Sequence[int]) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, bias=False)
        self.widths = list(widths)
        self.bns = nn.ModuleList(nn.BatchNorm2d(w) for w in self.widths)
        self.out_channels = out_channels

    def forward(self, x: Tensor, sample: tuple[Tensor, Tensor]) -> Tensor:
        indices, weights = sample
        out = self.conv(x)
        chosen = [int(i) for i in indices]
        larger = max(self.widths[i] for i in chosen)
        mixed = sum(
            weight * channel_interpolate(self.bns[i](out[:, : self.widths[i]]), larger)
            for i, weight in zip(chosen, weights)
        )
        return F.pad(mixed, (0, 0, 0, 0, 0, self.out_channels - larger))


class TASSearchResNet(nn.Module):
    """The TAS search space over a CIFAR ResNet: one width decision per stage's residual width (stem, every block's
    second conv and the stride-2 shortcut of the stage share it, so residual sums stay aligned) and one per block's
    inner width, and one depth decision per stage of more than one block.

    The official net lets every conv choose its width and adds mismatched residuals on their common channels; tying
    the residual width per stage is our simplification (what channel pruning of a ResNet keeps consistent anyway).

    Args:
        num_classes: classifier outputs.
        in_channels: image channels.
        stage_widths: full width of each stage (CIFAR ResNets: 16, 32, 64).
        blocks: basic blocks per stage (ResNet-20: 3, 3, 3; ResNet-56: 9, 9, 9).
        width_ratios: candidate width ratios of every decision (official: 0.3 ... 1.0).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        stage_widths: Sequence[int] = (16, 32, 64),
        blocks: Sequence[int] = (3, 3, 3),
        width_ratios: Sequence[float] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
    ) -> None:
        super().__init__()
        if len(stage_widths) != len(blocks) or not stage_widths:
            raise ValueError(f"stage_widths {list(stage_widths)} and blocks {list(blocks)} need one entry per stage")
        if any(w < 1 for w in stage_widths) or any(b < 1 for b in blocks):
            raise ValueError(f"stage widths and block counts must be >= 1, got {list(stage_widths)}, {list(blocks)}")
        if not width_ratios or any(not 0 < r <= 1 for r in width_ratios):
            raise ValueError(f"width_ratios must be a non-empty list in (0, 1], got {list(width_ratios)}")
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.stage_widths = list(stage_widths)
        self.blocks = list(blocks)
        self.residual_choices = [width_choices(w, width_ratios) for w in stage_widths]
        self.inner_choices = [[width_choices(w, width_ratios) for _ in range(n)] for w, n in zip(stage_widths, blocks)]
        self.depth_options = [depth_choices(n) for n in blocks]
        decisions = [*self.residual_choices, *(c for stage in self.inner_choices for c in stage)]
        self.width_logits = nn.ParameterList(nn.Parameter(1e-3 * torch.randn(len(c))) for c in decisions)
        self.depth_logits = nn.ParameterList(nn.Parameter(1e-3 * torch.randn(len(d))) for d in self.depth_options)
        self.stem = _ElasticConvBN(in_channels, stage_widths[0], 3, 1, self.residual_choices[0])
        self.convs = nn.ModuleList()
        self.shortcuts = nn.ModuleDict()
        previous = stage_widths[0]
        for s, (width, count) in enumerate(zip(stage_widths, blocks)):
            for b in range(count):
                stride = 2 if s > 0 and b == 0 else 1
                self.convs.append(_ElasticConvBN(previous, width, 3, stride, self.inner_choices[s][b]))
                self.convs.append(_ElasticConvBN(width, width, 3, 1, self.residual_choices[s]))
                if stride == 2 or previous != width:
                    self.shortcuts[f"{s}_{b}"] = _ElasticConvBN(previous, width, 1, stride, self.residual_choices[s])
                previous = width
        self.fc = nn.Linear(previous, num_classes)

    # -- the architecture distribution ------------------------------------------------------------------------------
    def architecture_parameters(self) -> list[nn.Parameter]:
        return [*self.width_logits, *self.depth_logits]

    def weight_parameters(self) -> list[nn.Parameter]:
        arch = {id(p) for p in self.architecture_parameters()}
        return [p for p in self.parameters() if id(p) not in arch]

    def _inner_index(self, stage: int, block: int) -> int:
        return len(self.stage_widths) + sum(self.blocks[:stage]) + block

    def expected_flops(self, image_size: tuple[int, int], one_hot: bool = False) -> Tensor:
        """Expected multiply-accumulates under the softmax of the architecture logits (differentiable in them);
        ``one_hot`` uses the argmax instead (the exact count of :meth:`argmax_shape`)."""

        def probs(logits: Tensor) -> Tensor:
            return F.one_hot(logits.argmax(), len(logits)).float() if one_hot else logits.softmax(-1)

        def expected_width(decision: int, choices: list[int]) -> Tensor:
            return (probs(self.width_logits[decision]) * torch.tensor(choices, dtype=torch.float)).sum()

        residual = [expected_width(s, c) for s, c in enumerate(self.residual_choices)]
        inner = [[expected_width(self._inner_index(s, b), c) for b, c in enumerate(stage)]
                 for s, stage in enumerate(self.inner_choices)]
        block_weights = []
        for s, options in enumerate(self.depth_options):
            p = probs(self.depth_logits[s])
            block_weights.append([sum(p[i] for i, d in enumerate(options) if d > b) for b in range(self.blocks[s])])
        return shape_flops(self.in_channels, image_size, self.num_classes, residual, inner, block_weights)

    def full_flops(self, image_size: tuple[int, int]) -> int:
        shape = ResNetShape.full(self.stage_widths, self.blocks)
        weights = [[1.0] * n for n in self.blocks]
        return int(shape_flops(self.in_channels, image_size, self.num_classes, shape.residual_widths,
                               shape.inner_widths, weights))

    def argmax_shape(self) -> ResNetShape:
        """The shape of the most likely width and depth of every decision."""
        pick = [int(logits.argmax()) for logits in self.width_logits]
        residual = tuple(c[pick[s]] for s, c in enumerate(self.residual_choices))
        inner = tuple(tuple(c[pick[self._inner_index(s, b)]] for b, c in enumerate(stage))
                      for s, stage in enumerate(self.inner_choices))
        depths = tuple(self.depth_options[s][int(logits.argmax())] for s, logits in enumerate(self.depth_logits))
        return ResNetShape(residual, inner, depths)

    def sample(self, tau: float, generator: torch.Generator) -> dict[str, Any]:
        """2 candidate widths per width decision and Gumbel-softmax depth weights per stage."""
        return {
            "widths": [sample_two(logits, tau, generator) for logits in self.width_logits],
            "depths": [gumbel_softmax(logits, tau, generator) for logits in self.depth_logits],
        }

    def set_sampled_requires_grad(self, sample: dict[str, Any] | None) -> None:
        """Freeze the BNs of the widths ``sample`` did not draw for this step (they get no gradient); ``None``
        unfreezes all."""
        layers: list[tuple[_ElasticConvBN, int]] = [(self.stem, 0)]
        index = 0
        for s, count in enumerate(self.blocks):
            for b in range(count):
                layers += [(self.convs[index], self._inner_index(s, b)), (self.convs[index + 1], s)]
                if f"{s}_{b}" in self.shortcuts:
                    layers.append((self.shortcuts[f"{s}_{b}"], s))
                index += 2
        for layer, decision in layers:
            drawn = None if sample is None else {int(i) for i in sample["widths"][decision][0]}
            for i, bn in enumerate(layer.bns):
                bn.requires_grad_(drawn is None or i in drawn)

    def forward(self, x: Tensor, sample: dict[str, Any]) -> Tensor:
        widths, depth_weights = sample["widths"], sample["depths"]
        h = F.relu(self.stem(x, widths[0]))
        index = 0
        for s, count in enumerate(self.blocks):
            outputs = []
            for b in range(count):
                inner = F.relu(self.convs[index](h, widths[self._inner_index(s, b)]))
                out = self.convs[index + 1](inner, widths[s])
                shortcut = self.shortcuts[f"{s}_{b}"](h, widths[s]) if f"{s}_{b}" in self.shortcuts else h
                h = F.relu(out + shortcut)
                outputs.append(h)
                index += 2
            h = sum(w * outputs[d - 1] for w, d in zip(depth_weights[s], self.depth_options[s]))
        return self.fc(h.mean(dim=(2, 3)))


class TAS(MethodBase):
    """The TAS search: alternating weight and architecture steps with the expected-FLOPs cost.

    Each training step splits its batch in halves. First the weights take an SGD step (the base optimizer and LR
    schedule) on the cross-entropy of the first half; then the architecture logits take an Adam step on the
    cross-entropy of the second half plus ``flop_weight`` times :func:`flop_loss` of the expected FLOPs (target
    ``flop_target`` of the full net's, tolerance ``flop_tolerance``). Every forward draws 2 widths per decision and
    Gumbel-softmax depth weights at temperature ``tau``, annealed by a cosine from ``tau_max`` to ``tau_min`` over
    the run. The draws come from a generator seeded by ``(sampling_seed, global step, phase)``, so DDP ranks draw the
    same shapes and a resumed run the same draws; the Adam state and the best shape are in the checkpoint.

    At each training epoch's end the argmax shape and its FLOP ratio are logged (``search/flop_ratio``,
    ``search/shape``), and the best shape (highest ``val/acc`` among epochs within the tolerance band, else the
    latest) is written to ``<log_dir>/tas_shape.json``: its ``residual_widths``, ``inner_widths`` and ``depths`` are
    the arguments of the :class:`~lit_methods.nas.ShapedResNet` that :class:`TASDistillation` trains.

    Differences from the official code, stated: the train/valid halves are halves of each batch (not a fixed split
    of the training set), and the residual width is one decision per stage (:class:`TASSearchResNet`).

    Args:
        num_classes, in_channels, image_size: the data's (filled by the CLI).
        stage_widths, blocks, width_ratios: the search space (:class:`TASSearchResNet`).
        flop_target: target FLOP ratio R in (0, 1].
        flop_tolerance: tolerance t of the cost (official 0.05).
        flop_weight: lambda_cost (official 2).
        tau_max, tau_min: Gumbel temperature range (official code: 10 -> 0.1).
        arch_lr, arch_betas, arch_weight_decay: Adam of the architecture logits (official 1e-3, (0.5, 0.999), 1e-3).
        sampling_seed: seed of the architecture draws.
        **kwargs: :class:`~lit_methods.base.MethodBase` (SGD of the weights; official lr 0.1, Nesterov, wd 5e-4).
    """

    slug: ClassVar[str] = "tas"

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: tuple[int, int] = (32, 32),
        stage_widths: Sequence[int] = (16, 32, 64),
        blocks: Sequence[int] = (3, 3, 3),
        width_ratios: Sequence[float] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
        flop_target: float = 0.5,
        flop_tolerance: float = 0.05,
        flop_weight: float = 2.0,
        tau_max: float = 10.0,
        tau_min: float = 0.1,
        arch_lr: float = 1e-3,
        arch_betas: tuple[float, float] = (0.5, 0.999),
        arch_weight_decay: float = 1e-3,
        sampling_seed: int = 0,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        nesterov: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov, **kwargs)
        self.save_hyperparameters()
        drop_object_hyperparameters(self)
        if not 0 < flop_target <= 1:
            raise ValueError(f"flop_target must lie in (0, 1], got {flop_target}")
        if not 0 <= flop_tolerance < flop_target:
            raise ValueError(f"flop_tolerance must lie in [0, flop_target={flop_target}), got {flop_tolerance}")
        if flop_weight < 0:
            raise ValueError(f"flop_weight must be >= 0, got {flop_weight}")
        if not 0 < tau_min <= tau_max:
            raise ValueError(f"need 0 < tau_min <= tau_max, got tau_min={tau_min}, tau_max={tau_max}")
        if arch_lr <= 0:
            raise ValueError(f"arch_lr must be > 0, got {arch_lr}")
        self.automatic_optimization = False
        self.net = TASSearchResNet(num_classes, in_channels, stage_widths, blocks, width_ratios)
        self.image_size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        smallest = ResNetShape(
            tuple(c[0] for c in self.net.residual_choices),
            tuple(tuple(c[0] for c in stage) for stage in self.net.inner_choices),
            tuple(d[0] for d in self.net.depth_options),
        )
        self.full_flops = self.net.full_flops(self.image_size)
        smallest_ratio = float(shape_flops(in_channels, self.image_size, num_classes, smallest.residual_widths,
                                           smallest.inner_widths, [[1.0] + [0.0] * (n - 1) for n in blocks]))
        smallest_ratio /= self.full_flops
        if smallest_ratio > flop_target:
            raise ValueError(
                f"no architecture of this search space reaches flop_target={flop_target}: the smallest has FLOP "
                f"ratio {smallest_ratio:.3f} (lower width_ratios or allow fewer blocks)"
            )
        self.flop_target, self.flop_tolerance, self.flop_weight = flop_target, flop_tolerance, flop_weight
        self.tau_max, self.tau_min = tau_max, tau_min
        self.sampling_seed = sampling_seed
        self.arch_optimizer = torch.optim.Adam(
            self.net.architecture_parameters(), lr=arch_lr, betas=tuple(arch_betas), weight_decay=arch_weight_decay
        )
        self.best_shape: dict[str, Any] | None = None
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_metrics = MetricCollection({"acc": MulticlassAccuracy(num_classes, average="micro")}, prefix="val/")

    # -- sampling ---------------------------------------------------------------------------------------------------
    def tau(self) -> float:
        """Cosine annealing from ``tau_max`` to ``tau_min`` over the run's optimizer steps."""
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else math.inf
        progress = 0.0 if not math.isfinite(total) else min(1.0, self.global_step / max(1, total))
        return self.tau_min + 0.5 * (self.tau_max - self.tau_min) * (1 + math.cos(math.pi * progress))

    def draw(self, phase: int) -> dict[str, Any]:
        """The architecture draw of this global step and phase (0 weights, 1 architecture): the same on every rank."""
        generator = torch.Generator().manual_seed(self.sampling_seed * 1_000_003 + 2 * self.global_step + phase)
        return self.net.sample(self.tau(), generator)

    def forward(self, x: Tensor) -> Tensor:
        """Logits of the argmax shape's draw (widths with weight 1, the argmax depth)."""
        widths = [(logits.argmax().view(1), torch.ones(1, device=x.device)) for logits in self.net.width_logits]
        depths = [F.one_hot(logits.argmax(), len(logits)).float() for logits in self.net.depth_logits]
        return self.net(self.normalize_inputs(x), {"widths": widths, "depths": depths})

    # -- training ---------------------------------------------------------------------------------------------------
    def optimizer_parameters(self) -> list[dict[str, Any]]:
        """The base's groups without the architecture logits (they have their own Adam)."""
        arch = {id(p) for p in self.net.architecture_parameters()}
        groups = super().optimizer_parameters()
        return [g for g in ({**g, "params": [p for p in g["params"] if id(p) not in arch]} for g in groups) if g["params"]]

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        batch = as_batch(batch)
        images, targets = self.normalize_inputs(batch["inputs"]), batch["targets"]
        half = len(targets) // 2
        if half < 1:
            raise ValueError(f"TAS splits each batch into halves; a batch of {len(targets)} is too small")
        optimizer = self.optimizers()
        # (a) weights: cross-entropy on the first half
        sample = self.draw(phase=0)
        self.net.set_sampled_requires_grad(sample)
        logits = self.net(images[:half], sample)
        weight_loss = F.cross_entropy(logits, targets[:half])
        optimizer.zero_grad()
        self.manual_backward(weight_loss)
        optimizer.step()
        self.net.set_sampled_requires_grad(None)
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        # (b) architecture: cross-entropy on the second half plus the FLOPs cost
        sample = self.draw(phase=1)
        self.arch_optimizer.zero_grad()
        arch_ce = F.cross_entropy(self.net(images[half:], sample), targets[half:])
        expected = self.net.expected_flops(self.image_size)
        current = float(self.net.expected_flops(self.image_size, one_hot=True))
        cost = flop_loss(expected, current, self.full_flops, self.flop_target, self.flop_tolerance)
        self.manual_backward(arch_ce + self.flop_weight * cost)
        self.arch_optimizer.step()
        optimizer.zero_grad()
        self.train_acc(logits.detach(), targets[:half])
        self.log("train/loss", weight_loss, prog_bar=True)
        self.log_dict({"train/arch_loss": arch_ce.detach(), "train/flop_cost": cost.detach(), "search/tau": self.tau(),
                       "search/flop_ratio_step": current / self.full_flops})
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return weight_loss.detach()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        batch = as_batch(batch)
        self.val_metrics.update(self(batch["inputs"]), batch["targets"])
        self.log_dict(self.val_metrics, on_epoch=True, prog_bar=True)

    def flop_ratio(self) -> float:
        """FLOP ratio of the argmax shape to the full net."""
        return float(self.net.expected_flops(self.image_size, one_hot=True)) / self.full_flops

    def on_train_epoch_end(self) -> None:
        ratio = self.flop_ratio()
        shape = self.net.argmax_shape().as_dict()
        self.log("search/flop_ratio", ratio, prog_bar=True)
        accuracy = self.trainer.callback_metrics.get("val/acc")
        accuracy = float(accuracy) if accuracy is not None else math.nan
        in_band = self.flop_target - self.flop_tolerance <= ratio <= self.flop_target
        best = self.best_shape
        if best is None or (in_band and (not best["in_band"] or accuracy >= best["val_acc"])) or (
            not in_band and not best["in_band"]
        ):
            self.best_shape = {"shape": shape, "flop_ratio": ratio, "val_acc": accuracy, "in_band": in_band,
                               "epoch": self.current_epoch}
        log_dir = self.trainer.log_dir
        if log_dir is not None and self.trainer.is_global_zero:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            (Path(log_dir) / "tas_shape.json").write_text(json.dumps(self.best_shape, indent=2))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[ARCH_OPTIMIZER_KEY] = self.arch_optimizer.state_dict()
        checkpoint[BEST_SHAPE_KEY] = json.dumps(self.best_shape)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if ARCH_OPTIMIZER_KEY in checkpoint:
            self.arch_optimizer.load_state_dict(checkpoint[ARCH_OPTIMIZER_KEY])
        if BEST_SHAPE_KEY in checkpoint:
            self.best_shape = json.loads(checkpoint[BEST_SHAPE_KEY])


class TASDistillation(ImageClassifier):
    """The second TAS stage: a searched :class:`~lit_methods.nas.ShapedResNet` trained from scratch with knowledge
    distillation from the unpruned network, ``(1 - kd_weight) * CE + kd_weight * T^2 * KL`` (paper: 0.9, T = 4).

    Args:
        backbone: the student (a :class:`~lit_methods.nas.ShapedResNet` with the searched shape).
        teacher: the unpruned network (any module mapping images to logits), frozen and in eval mode.
        teacher_checkpoint: a checkpoint (or state dict) of a classifier whose ``backbone.*`` weights fill the
            teacher; ``None`` keeps the teacher's given weights.
        kd_weight: lambda of the soft term.
        temperature: softmax temperature T.
        **kwargs: :class:`~lit_methods.ImageClassifier`'s.
    """

    slug: ClassVar[str] = "tas"

    def __init__(
        self,
        backbone: nn.Module,
        teacher: nn.Module,
        teacher_checkpoint: str | None = None,
        kd_weight: float = 0.9,
        temperature: float = 4.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(backbone, **kwargs)
        if not 0 <= kd_weight <= 1:
            raise ValueError(f"kd_weight must lie in [0, 1], got {kd_weight}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if teacher_checkpoint is not None:
            load_pretrained_weights(teacher, teacher_checkpoint, {"backbone.": ""})
        self.teacher = teacher.requires_grad_(False).eval()
        self.kd_weight, self.temperature = kd_weight, temperature

    def train(self, mode: bool = True) -> TASDistillation:
        super().train(mode)
        self.teacher.eval()
        return self

    def shared_step(self, batch: Any, stage: str) -> tuple[Tensor, Tensor, Tensor]:
        if stage != "train":
            return super().shared_step(batch, stage)
        batch = as_batch(batch)
        images, targets = self.normalize_inputs(batch["inputs"]), batch["targets"]
        logits = self.backbone(images)
        with torch.no_grad():
            teacher_logits = self.teacher(images)
        return kd_loss(logits, teacher_logits, targets, self.kd_weight, self.temperature), logits, targets
