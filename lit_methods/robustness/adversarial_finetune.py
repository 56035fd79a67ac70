"""PGD adversarial training and adversarial fine-tuning with a slow-start, fast-decay learning rate (Jeddi, Shafiee,
Wong, "A Simple Fine-tuning Is All You Need: Towards Robust Deep Learning via Adversarial Fine-tuning",
arXiv:2012.13628, https://arxiv.org/abs/2012.13628).

No official code is available and the stored sources do not hold the paper's schedule constants, so the shape of
:class:`SlowStartFastDecay` (linear warm-up from ~0 to the peak, then a fast exponential, linear or cosine decay to a
small fraction of the peak) and its defaults (warm-up over half of the steps, exponential decay to 1% of the peak)
follow the paper's description "slow start, fast decay" and are unconfirmed against its figures (searched again:
the stored web pages hold only the abstract, the code index no implementation by the authors). On digits the
schedule beats a constant rate at a high peak (0.5: PGD-10 0.67-0.70 vs 0.14-0.24) and ties with it at 0.05-0.2
(``tests/robustness/test_adversarial_finetune.py``).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lit_methods.base import ImageClassifier, read_checkpoint
from lit_methods.datamodules.batch import as_batch
from lit_methods.robustness.attacks import check_attack_arguments, pgd_linf

__all__ = ["AdversarialFineTune", "SlowStartFastDecay"]

NEEDS_PIXELS = (
    "AdversarialFineTune attacks [0, 1] pixels and normalizes them itself, but {what}: build the datamodule with "
    "normalize=False (in a config: data.init_args.normalize: false)"
)


class SlowStartFastDecay:
    """LR factor of step ``i`` of ``total``: ``(i + 1) / W`` for the ``W = max(1, round(warmup_fraction * total))``
    warm-up steps (peak 1 at step ``W - 1``), then a decay from 1 to ``final_lr_fraction`` at the last step
    ``total - 1``. With ``p = (i - W + 1) / (total - W)``: ``exponential`` gives ``final ** p``, ``linear``
    ``1 - (1 - final) p``, ``cosine`` ``final + (1 - final)(1 + cos(pi p)) / 2``. Picklable, for ``LambdaLR``.

    Args:
        total: optimizer steps of the whole run (``trainer.estimated_stepping_batches``).
        warmup_fraction: share of the steps spent warming up, in (0, 1).
        decay: shape of the decay.
        final_lr_fraction: factor at the last step, in (0, 1) (``exponential``) or [0, 1) (the others).
    """

    def __init__(
        self,
        total: int,
        warmup_fraction: float = 0.5,
        decay: Literal["exponential", "linear", "cosine"] = "exponential",
        final_lr_fraction: float = 0.01,
    ) -> None:
        check_schedule_arguments(warmup_fraction, decay, final_lr_fraction)
        if total < 1:
            raise ValueError(f"total must be >= 1 step, got {total}")
        self.total = total
        self.warmup = max(1, round(warmup_fraction * total))
        self.decay = decay
        self.final = final_lr_fraction

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup + 1) / max(1, self.total - self.warmup))
        if self.decay == "exponential":
            return self.final**progress
        if self.decay == "linear":
            return 1.0 - (1.0 - self.final) * progress
        return self.final + (1.0 - self.final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def check_schedule_arguments(warmup_fraction: float, decay: str, final_lr_fraction: float) -> None:
    if not 0.0 < warmup_fraction < 1.0:
        raise ValueError(f"warmup_fraction must lie in (0, 1), got {warmup_fraction}")
    if decay not in ("exponential", "linear", "cosine"):
        raise ValueError(f"decay must be 'exponential', 'linear' or 'cosine', got {decay!r}")
    lowest = 0.0 if decay != "exponential" else math.nextafter(0.0, 1.0)
    if not lowest <= final_lr_fraction < 1.0:
        raise ValueError(
            f"final_lr_fraction must lie in {'(0' if lowest else '[0'}, 1) for {decay}, got {final_lr_fraction}"
        )


class AdversarialFineTune(ImageClassifier):
    """PGD adversarial training (Madry et al., arXiv:1706.06083) of a classifier, by default as the paper's
    adversarial fine-tuning of a pre-trained one with the slow-start, fast-decay learning rate stepped every step.

    The model works in [0, 1] pixel space: it needs data that is not normalized (``normalize: false`` on the
    datamodule, hence ``inputs_normalized=False``) and applies its own :class:`~lit_methods.datamodules.Normalize`
    (``mean``, ``std``) in :meth:`forward`, before the backbone. Every training batch is replaced by its L-infinity
    PGD examples (crafted on the pixels) and the model minimises their cross-entropy; ``train/acc`` is the accuracy
    on those adversarial examples. Validation and test log the clean metrics of :class:`~lit_methods.ImageClassifier`
    and the accuracy under PGD with ``eval_attack_steps`` steps as ``val/robust_acc`` / ``test/robust_acc`` (the
    attack runs with gradients enabled even under the trainer's inference mode).

    Args:
        backbone: the classifier of normalized images (pre-trained, or loaded from ``pretrained_checkpoint``).
        mean: per-channel normalization mean in [0, 1] units, applied by the model (the datamodule's ``mean``; the
            CLI fills it from the data; ``setup`` refuses a value that differs from the datamodule's).
        std: per-channel normalization standard deviation (the datamodule's ``std``).
        inputs_normalized: whether the data arrives normalized (the datamodule's ``inputs_normalized``, filled by
            the CLI); must be ``False``: construction refuses ``True``, and ``setup`` a datamodule that normalizes.
        eps: L-infinity radius in [0, 1] pixel units (paper: 8/255).
        alpha: PGD step size (paper: 2/255).
        attack_steps: PGD steps when training (paper: 10; 7 to 10 are common).
        eval_attack_steps: PGD steps of the robust accuracy (PGD-20 in the paper's evaluation).
        random_start: PGD starts from a uniform random point of the eps-ball (global torch RNG).
        attack_bn_mode: ``"eval"`` crafts training examples with normalization layers in evaluation mode (no running
            statistics updated by the attack), ``"train"`` in training mode as Madry et al.'s code does.
        pretrained_checkpoint: a Lightning checkpoint of an :class:`~lit_methods.ImageClassifier` (its
            ``backbone.*`` weights) or a plain ``state_dict`` of the backbone, loaded into the backbone once, in
            ``setup`` (so a resumed run's own weights replace it); ``None`` keeps the backbone as given.
        lr_schedule: ``"slow_start_fast_decay"`` (:class:`SlowStartFastDecay`, the paper's) or one of
            :class:`~lit_methods.ImageClassifier`'s schedules (``"cosine"``, ``"onecycle"``, ``"constant"``) for PGD
            adversarial training from scratch.
        warmup_fraction: share of the steps in the slow start.
        decay: ``"exponential"``, ``"linear"`` or ``"cosine"`` decay after the peak.
        final_lr_fraction: learning rate at the last step, as a fraction of ``lr``.
        test_autoattack: also log ``test/autoattack_acc``, the accuracy under the standard AutoAttack ensemble of
            ``torchattacks`` (Croce & Hein, arXiv:2003.01690) at the same ``eps``; needs ``torchattacks``
            (``pip install lit-methods[robustness]``) and is slow.
        **kwargs: the other arguments of :class:`~lit_methods.ImageClassifier` (``lr`` is the peak).
    """

    slug: ClassVar[str] = "adv-finetune"
    lr_schedules = (*ImageClassifier.lr_schedules, "slow_start_fast_decay")
    requires_pixel_inputs = True

    def __init__(
        self,
        backbone: nn.Module,
        mean: tuple[float, ...] = (0.0,),
        std: tuple[float, ...] = (1.0,),
        inputs_normalized: bool = False,
        eps: float = 8 / 255,
        alpha: float = 2 / 255,
        attack_steps: int = 10,
        eval_attack_steps: int = 20,
        random_start: bool = True,
        attack_bn_mode: Literal["eval", "train"] = "eval",
        pretrained_checkpoint: str | None = None,
        lr_schedule: Literal["slow_start_fast_decay", "cosine", "onecycle", "constant"] = "slow_start_fast_decay",
        warmup_fraction: float = 0.5,
        decay: Literal["exponential", "linear", "cosine"] = "exponential",
        final_lr_fraction: float = 0.01,
        test_autoattack: bool = False,
        **kwargs: Any,
    ) -> None:
        if inputs_normalized:
            raise ValueError(NEEDS_PIXELS.format(what="inputs_normalized=True"))
        check_attack_arguments(eps, alpha, attack_steps)
        check_attack_arguments(eps, alpha, eval_attack_steps)
        check_schedule_arguments(warmup_fraction, decay, final_lr_fraction)
        if attack_bn_mode not in ("eval", "train"):
            raise ValueError(f"attack_bn_mode must be 'eval' or 'train', got {attack_bn_mode!r}")
        super().__init__(
            backbone, lr_schedule=lr_schedule, mean=mean, std=std, inputs_normalized=inputs_normalized, **kwargs
        )
        self.eps = eps
        self.alpha = alpha
        self.attack_steps = attack_steps
        self.eval_attack_steps = eval_attack_steps
        self.random_start = random_start
        self.attack_bn_mode = attack_bn_mode
        self.pretrained_checkpoint = pretrained_checkpoint
        self.warmup_fraction = warmup_fraction
        self.decay = decay
        self.final_lr_fraction = final_lr_fraction
        self.test_autoattack = test_autoattack
        self._pretrained_loaded = False
        if test_autoattack:
            import torchattacks  # noqa: F401  (fail at construction, not after training, when it is missing)

            self.test_autoattack_acc = MulticlassAccuracy(self.num_classes, average="micro")
        self.val_robust_acc = MulticlassAccuracy(self.num_classes, average="micro")
        self.test_robust_acc = MulticlassAccuracy(self.num_classes, average="micro")

    # -- pre-trained weights -----------------------------------------------------------------------------------
    def load_pretrained(self, path: str) -> None:
        """Load a backbone ``state_dict`` (plain, or the ``backbone.*`` entries of a Lightning checkpoint)."""
        state = read_checkpoint(path)
        state = state.get("state_dict", state)
        key_map = {"backbone.": "backbone."} if any(key.startswith("backbone.") for key in state) else {"": "backbone."}
        self.load_pretrained_weights(state, key_map, strict=True, source_name=path)

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        if getattr(datamodule, "inputs_normalized", False):
            raise ValueError(NEEDS_PIXELS.format(what=f"{type(datamodule).__name__} yields normalized inputs"))
        for name in ("mean", "std"):
            expected = getattr(datamodule, name, None)
            ours = getattr(self.normalize, name).flatten().cpu()
            if expected is not None and not torch.allclose(ours, torch.tensor(expected, dtype=torch.float32)):
                raise ValueError(
                    f"the model was given {name}={tuple(ours.tolist())} but the datamodule has {name}={expected}"
                )
        if self.pretrained_checkpoint is not None and not self._pretrained_loaded:
            self.load_pretrained(self.pretrained_checkpoint)
            self._pretrained_loaded = True

    # -- the attack ----------------------------------------------------------------------------------------------
    def adversarial_pixels(self, pixels: Tensor, targets: Tensor, steps: int) -> Tensor:
        """PGD examples, in [0, 1] pixels, of a batch of [0, 1] ``pixels``."""
        return pgd_linf(self, pixels, targets, self.eps, self.alpha, steps, self.random_start)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        batch = as_batch(batch)
        pixels, targets = batch["inputs"], batch["targets"]
        was_training = self.backbone.training
        self.backbone.train(self.attack_bn_mode == "train")
        try:
            adversarial = self.adversarial_pixels(pixels, targets, self.attack_steps)
        finally:
            self.backbone.train(was_training)
        loss, logits, targets = self.shared_step({"inputs": adversarial, "targets": targets}, "train")
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        self._update_metrics("train", logits, targets)
        return loss

    def _robust_step(self, batch: Any, stage: str) -> None:
        batch = as_batch(batch)
        pixels, targets = batch["inputs"], batch["targets"]
        with torch.inference_mode(False), torch.enable_grad():
            adversarial = self.adversarial_pixels(pixels.clone(), targets.clone(), self.eval_attack_steps)
            with torch.no_grad():
                logits = self(adversarial)
        metric = getattr(self, f"{stage}_robust_acc")
        metric.update(logits, targets)
        self.log(f"{stage}/robust_acc", metric, on_step=False, on_epoch=True, prog_bar=stage == "val")

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = super().validation_step(batch, batch_idx)
        self._robust_step(batch, "val")
        return loss

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = super().test_step(batch, batch_idx)
        self._robust_step(batch, "test")
        if self.test_autoattack:
            self._autoattack_step(batch)
        return loss

    def _autoattack_step(self, batch: Any) -> None:
        import torchattacks

        batch = as_batch(batch)
        pixels, targets = batch["inputs"], batch["targets"]
        # in evaluation mode like the backbone: torchattacks puts a model that looks trained back into training mode
        pixel_model = nn.Sequential(self.normalize, self.backbone).train(self.backbone.training)
        attack = torchattacks.AutoAttack(pixel_model, norm="Linf", eps=self.eps, n_classes=self.num_classes, seed=0)
        with torch.inference_mode(False), torch.enable_grad():
            adversarial = attack(pixels.clone(), targets.clone())
            with torch.no_grad():
                logits = pixel_model(adversarial)
        self.test_autoattack_acc.update(logits, targets)
        self.log("test/autoattack_acc", self.test_autoattack_acc, on_step=False, on_epoch=True)

    # -- the schedule --------------------------------------------------------------------------------------------
    def make_lr_scheduler(self, optimizer: torch.optim.Optimizer) -> Any:
        if self.lr_schedule != "slow_start_fast_decay":
            return super().make_lr_scheduler(optimizer)
        total = int(self.trainer.estimated_stepping_batches)
        factor = SlowStartFastDecay(total, self.warmup_fraction, self.decay, self.final_lr_fraction)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
