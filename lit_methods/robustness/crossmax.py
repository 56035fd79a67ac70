"""Multi-resolution self-ensembles aggregated by CrossMax (Fort & Lakshminarayanan, "Ensemble everything everywhere:
Multi-scale aggregation for adversarial robustness", arXiv:2408.05446, https://arxiv.org/abs/2408.05446).

Following the official notebook (``stanislavfort/ensemble-everything-everywhere``): every input is turned into a
stack of randomly jittered, noised copies at several resolutions inside the model (so attacks differentiate through
the randomness), the backbone's first convolution takes the stacked channels, linear probes read intermediate layers,
and the logits of the probes and of the backbone's head are aggregated by CrossMax. Differences: the notebook's colour
blend is kept (its contrast draw is overwritten there, so it is left out); the stack keeps the input size instead of
resizing to 224; probes read an average-pooled (``probe_pool`` x ``probe_pool``) activation rather than the whole
flattened map (the card's memory pitfall); downsampling uses antialiased bicubic interpolation.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_methods.base import ImageClassifier, read_checkpoint
from lit_methods.datamodules.batch import as_batch
from lit_methods.robustness.attacks import check_eps, make_attack, robust_accuracy, write_robust_accuracy_table

__all__ = ["CrossMax", "MultiResolutionInput", "crossmax"]


def crossmax(logits: Tensor, k: int = 3) -> Tensor:
    """CrossMax of ``(B, N, C)`` logits of ``N`` predictors: subtract each predictor's max over classes, then each
    class's max over predictors, and take per class the ``k``-th largest value over predictors -> ``(B, C)``."""
    if logits.dim() != 3:
        raise ValueError(f"crossmax expects (batch, predictors, classes) logits, got shape {tuple(logits.shape)}")
    if not 1 <= k <= logits.shape[1]:
        raise ValueError(f"k must lie in [1, {logits.shape[1]} predictors], got {k}")
    centred = logits - logits.max(dim=2, keepdim=True).values
    centred = centred - centred.max(dim=1, keepdim=True).values
    return centred.topk(k, dim=1).values[:, k - 1]


class MultiResolutionInput(nn.Module):
    """The stochastic multi-resolution stack: ``(B, C, H, W)`` pixels in [0, 1] -> ``(B, C * R, H, W)`` in [0, 1].

    For each of the ``R`` resolutions ``r``: every image is rolled by a random shift in ``[-jitter, jitter]`` pixels
    (x and y), blended with its grayscale version by a random amount in ``[color_blend_min, 1]`` (colour images),
    downsampled (bicubic, antialiased) to ``r`` rows, noised with ``noise * U[0, 1)``, upsampled back, noised again and
    clipped to [0, 1]. Random draws come from the global torch RNG and stay on in evaluation (the paper's model is
    stochastic at test time; evaluate it with EOT attacks).

    Args:
        resolutions: target heights (the width scales with the aspect ratio); one equal to the input height keeps
            the resolution (notebook for 32x32 CIFAR: 32, 16, 8, 4).
        jitter: largest shift in pixels (notebook: 3).
        noise: amplitude of the uniform noise at both levels (notebook: 0.2).
        color_blend_min: smallest weight of the colour image in the colour/grayscale blend (notebook: 0.5).
    """

    def __init__(
        self,
        resolutions: Sequence[int] = (32, 16, 8, 4),
        jitter: int = 3,
        noise: float = 0.2,
        color_blend_min: float = 0.5,
    ) -> None:
        super().__init__()
        resolutions = tuple(resolutions)
        if not resolutions or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in resolutions):
            raise ValueError(f"resolutions must be positive integers, got {resolutions!r}")
        if isinstance(jitter, bool) or not isinstance(jitter, int) or jitter < 0:
            raise ValueError(f"jitter must be an integer >= 0, got {jitter!r}")
        if not noise >= 0:
            raise ValueError(f"noise must be >= 0, got {noise}")
        if not 0.0 <= color_blend_min <= 1.0:
            raise ValueError(f"color_blend_min must lie in [0, 1], got {color_blend_min}")
        self.resolutions, self.jitter, self.noise, self.color_blend_min = resolutions, jitter, noise, color_blend_min

    def roll(self, pixels: Tensor) -> Tensor:
        """Each image rolled (circularly) by its own random shift."""
        if self.jitter == 0:
            return pixels
        batch, _, height, width = pixels.shape
        shifts = torch.randint(-self.jitter, self.jitter + 1, (2, batch), device=pixels.device)
        rows = (torch.arange(height, device=pixels.device)[None] - shifts[0, :, None]) % height
        cols = (torch.arange(width, device=pixels.device)[None] - shifts[1, :, None]) % width
        index_rows = rows[:, None, :, None].expand(-1, pixels.shape[1], -1, width)
        rolled = pixels.gather(2, index_rows)
        return rolled.gather(3, cols[:, None, None, :].expand(-1, pixels.shape[1], height, -1))

    def forward(self, pixels: Tensor) -> Tensor:
        batch, channels, height, width = pixels.shape
        versions = []
        for resolution in self.resolutions:
            image = self.roll(pixels)
            if channels == 3:
                amount = torch.empty(batch, 1, 1, 1, device=pixels.device).uniform_(self.color_blend_min, 1.0)
                gray = image.mean(dim=1, keepdim=True)
                image = amount * image + (1 - amount) * gray
            if resolution < height:
                size = (resolution, max(1, round(resolution * width / height)))
                image = F.interpolate(image, size=size, mode="bicubic", align_corners=False, antialias=True)
            image = image + self.noise * torch.rand_like(image)
            if resolution < height:
                image = F.interpolate(image, size=(height, width), mode="bicubic", align_corners=False)
            image = image + self.noise * torch.rand_like(image)
            versions.append(image.clamp(0.0, 1.0))
        return torch.cat(versions, dim=1)


class CrossMax(ImageClassifier):
    """A multi-resolution self-ensemble (arXiv:2408.05446): the :class:`MultiResolutionInput` stack, a backbone whose
    first convolution takes the stacked channels, linear probes (``BatchNorm1d`` + ``Linear`` on an average-pooled
    activation) on the backbone layers named in ``probe_layers``, and :func:`crossmax` of the probes' and the
    backbone head's logits as the output of :meth:`forward`. Works on [0, 1] pixels (``normalize: false`` data) and
    normalizes each resolution's copy itself.

    Training (``stage="joint"``) minimises the head's cross-entropy plus the mean cross-entropy of the probes, which
    read detached activations (so they are trained as on a frozen backbone, as the paper's probes);
    ``stage="probes"`` freezes the backbone (loaded from ``pretrained_checkpoint``) and trains only the probes.
    ``train/acc`` and the validation/test metrics are those of the CrossMax output (``val/loss`` is the
    cross-entropy of the CrossMax values). Testing also attacks the whole stochastic ensemble with each of
    ``eval_attacks`` (``torchattacks`` names through :func:`~lit_methods.robustness.attacks.make_attack`;
    ``"EOTPGD"`` and ``"AutoAttack-rand"`` average gradients over the randomness) and logs ``test/robust_acc/<name>``;
    the per-attack table ``robust_accuracy.md`` / ``.csv`` is written in the logger's folder.

    Args:
        backbone: a classifier built for the data's ``in_channels`` (the CLI fills it); its first ``nn.Conv2d``
            taking ``in_channels`` is replaced by one taking ``in_channels * len(resolutions)``.
        probe_layers: names (``backbone.get_submodule``) of the layers whose outputs the probes read.
        resolutions, jitter, noise, color_blend_min: of :class:`MultiResolutionInput`.
        crossmax_k: CrossMax takes the ``k``-th largest value over predictors (notebook: 3).
        probe_pool: probes read an adaptive average pool of this side (4-D activations).
        stage: ``"joint"`` or ``"probes"`` (see above).
        pretrained_checkpoint: a Lightning checkpoint of a :class:`CrossMax` run (its ``backbone.*`` weights) loaded
            in ``setup`` (needed for ``stage="probes"``).
        eps: L-infinity radius of the test attacks in [0, 1] pixels (paper: 8/255).
        alpha: their step size.
        attack_steps: their steps.
        eval_attacks: ``torchattacks`` attack names run at test time.
        **kwargs: the other arguments of :class:`~lit_methods.ImageClassifier`.
    """

    slug: ClassVar[str] = "crossmax"
    requires_pixel_inputs = True

    def __init__(
        self,
        backbone: nn.Module,
        probe_layers: Sequence[str] = (),
        resolutions: Sequence[int] = (32, 16, 8, 4),
        jitter: int = 3,
        noise: float = 0.2,
        color_blend_min: float = 0.5,
        crossmax_k: int = 3,
        probe_pool: int = 2,
        stage: Literal["joint", "probes"] = "joint",
        pretrained_checkpoint: str | None = None,
        eps: float = 8 / 255,
        alpha: float = 2 / 255,
        attack_steps: int = 10,
        eval_attacks: Sequence[str] = ("PGD", "EOTPGD"),
        mean: tuple[float, ...] = (0.0,),
        std: tuple[float, ...] = (1.0,),
        inputs_normalized: bool = False,
        **kwargs: Any,
    ) -> None:
        check_eps(eps)
        if stage not in ("joint", "probes"):
            raise ValueError(f"stage must be 'joint' or 'probes', got {stage!r}")
        if stage == "probes" and pretrained_checkpoint is None:
            raise ValueError("stage='probes' trains probes on a trained backbone: give pretrained_checkpoint")
        super().__init__(backbone, mean=mean, std=std, inputs_normalized=inputs_normalized, **kwargs)
        if self.in_channels is None or self.image_size is None:
            raise ValueError("CrossMax needs in_channels and image_size (the CLI fills them from the data)")
        self.multi_resolution = MultiResolutionInput(resolutions, jitter, noise, color_blend_min)
        self.probe_layers = list(probe_layers)
        for name in self.probe_layers:
            try:
                self.backbone.get_submodule(name)
            except AttributeError:
                raise ValueError(f"probe layer {name!r} is not a submodule of the backbone") from None
        predictors = len(self.probe_layers) + 1
        if not 1 <= crossmax_k <= predictors:
            raise ValueError(f"crossmax_k must lie in [1, {predictors} predictors], got {crossmax_k}")
        self.crossmax_k, self.stage, self.pretrained_checkpoint = crossmax_k, stage, pretrained_checkpoint
        self.eps, self.alpha, self.attack_steps = eps, alpha, attack_steps
        for name in eval_attacks:  # a name torchattacks does not have fails here, not after training
            make_attack(name, nn.Linear(1, 1), eps)
        self.eval_attacks = list(eval_attacks)
        self._widen_first_convolution(len(self.multi_resolution.resolutions))
        self._activations: dict[str, Tensor] = {}
        for name in self.probe_layers:
            self.backbone.get_submodule(name).register_forward_hook(self._keep_activation(name))
        self.probes = nn.ModuleList(self._make_probe(width, probe_pool) for width in self._probe_widths(probe_pool))
        if stage == "probes":
            self.backbone.requires_grad_(False)
        self._pretrained_loaded = False
        self._robust_correct: dict[str, int] = {}
        self._robust_count = 0

    # -- construction ----------------------------------------------------------------------------------------------
    def _widen_first_convolution(self, copies: int) -> None:
        for name, module in self.backbone.named_modules():
            if isinstance(module, nn.Conv2d) and module.in_channels == self.in_channels:
                widened = nn.Conv2d(
                    module.in_channels * copies, module.out_channels, module.kernel_size, module.stride,
                    module.padding, module.dilation, module.groups, module.bias is not None, module.padding_mode,
                )  # fmt: skip
                parent_name, _, child = name.rpartition(".")
                setattr(self.backbone.get_submodule(parent_name) if parent_name else self.backbone, child, widened)
                return
        raise ValueError(f"the backbone has no nn.Conv2d taking the data's {self.in_channels} channels to widen")

    def _keep_activation(self, name: str) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Tensor) -> None:
            self._activations[name] = output

        return hook

    @torch.no_grad()
    def _probe_widths(self, probe_pool: int) -> list[int]:
        was_training = self.backbone.training
        self.backbone.eval()
        try:
            copies = len(self.multi_resolution.resolutions)
            self.backbone(torch.zeros(2, self.in_channels * copies, *self.image_size))
        finally:
            self.backbone.train(was_training)
        widths = []
        for name in self.probe_layers:
            activation = self._activations[name]
            pooled = probe_pool**2 if activation.dim() == 4 else 1
            widths.append(activation.shape[1] * pooled)
        self._activations.clear()
        return widths

    def _make_probe(self, width: int, probe_pool: int) -> nn.Module:
        return nn.Sequential(nn.AdaptiveAvgPool2d(probe_pool), nn.Flatten(), nn.BatchNorm1d(width),
                             nn.Linear(width, self.num_classes))  # fmt: skip

    # -- forward ------------------------------------------------------------------------------------------------
    def stacked_inputs(self, pixels: Tensor) -> Tensor:
        """The normalized multi-resolution stack of [0, 1] ``pixels``."""
        stack = self.multi_resolution(pixels)
        batch, _, height, width = stack.shape
        return self.normalize(stack.reshape(-1, self.in_channels, height, width)).reshape(batch, -1, height, width)

    def predictor_logits(self, pixels: Tensor, detach_probe_inputs: bool = False) -> Tensor:
        """``(B, N, C)`` logits of the probes (in ``probe_layers`` order) and, last, of the backbone's head."""
        self._activations.clear()
        head = self.backbone(self.stacked_inputs(pixels))
        logits = []
        for name, probe in zip(self.probe_layers, self.probes):
            activation = self._activations[name]
            if activation.dim() == 2:
                activation = activation[:, :, None, None]
            logits.append(probe(activation.detach() if detach_probe_inputs else activation))
        self._activations.clear()
        return torch.stack([*logits, head], dim=1)

    def final_head(self, pixels: Tensor) -> Tensor:
        """Logits of the backbone's own head alone (through the same stochastic stack)."""
        return self.backbone(self.stacked_inputs(pixels))

    def forward(self, pixels: Tensor) -> Tensor:
        return crossmax(self.predictor_logits(pixels), self.crossmax_k)

    # -- training -----------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if self.pretrained_checkpoint is not None and not self._pretrained_loaded:
            state = read_checkpoint(self.pretrained_checkpoint)
            state = state.get("state_dict", state)
            if not any(key.startswith("backbone.") for key in state):
                raise ValueError(f"{self.pretrained_checkpoint} holds no backbone.* weights of a CrossMax run")
            self.load_pretrained_weights(
                state, {"backbone.": "backbone."}, strict=True, source_name=self.pretrained_checkpoint
            )
            self._pretrained_loaded = True

    def on_train_epoch_start(self) -> None:
        if self.stage == "probes":
            self.backbone.eval()  # frozen: no running-statistics updates either

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        batch = as_batch(batch)
        pixels, targets = batch["inputs"], batch["targets"]
        logits = self.predictor_logits(pixels, detach_probe_inputs=True)
        probe_loss = torch.stack([self.compute_loss(logits[:, i], targets) for i in range(len(self.probes))])
        loss = probe_loss.mean() if len(self.probes) else logits.new_zeros(())
        if self.stage == "joint":
            loss = loss + self.compute_loss(logits[:, -1], targets)
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        self._update_metrics("train", crossmax(logits.detach(), self.crossmax_k), targets)
        return loss

    # -- robust evaluation ---------------------------------------------------------------------------------------
    def on_test_epoch_start(self) -> None:
        self._robust_correct = {name: 0 for name in self.eval_attacks}
        self._robust_count = 0

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = super().test_step(batch, batch_idx)
        batch = as_batch(batch)
        pixels, targets = batch["inputs"], batch["targets"]
        for name in self.eval_attacks:
            attack = make_attack(name, self, self.eps, self.alpha, self.attack_steps, self.num_classes)
            accuracy, _ = robust_accuracy(self, attack, pixels, targets, batch_size=len(targets))
            self._robust_correct[name] += round(accuracy * len(targets))
        self._robust_count += len(targets)
        return loss

    def on_test_epoch_end(self) -> None:
        rows = []
        reduce = self.trainer.strategy.reduce  # sums over DDP ranks (identity on one device)
        count = float(reduce(torch.tensor(float(self._robust_count), device=self.device), reduce_op="sum"))
        for name in self.eval_attacks:
            correct = float(reduce(torch.tensor(float(self._robust_correct[name]), device=self.device), reduce_op="sum"))
            accuracy = correct / max(1, count)
            self.log(f"test/robust_acc/{name}", accuracy)
            rows.append({"attack": name, "eps": self.eps, "steps": self.attack_steps, "robust_acc": accuracy})
        if rows and self.trainer.is_global_zero:
            directory = self.trainer.log_dir or self.trainer.default_root_dir
            write_robust_accuracy_table(rows, Path(directory), "robust_accuracy")
