"""BD-KD: Balancing the Divergences for Online Knowledge Distillation (Amara et al., arXiv:2212.12965).

No official code was found; the loss follows the paper's description: the student's distillation term mixes forward
KL(p_t || p_s) and reverse KL(p_s || p_t) per sample, by the sign of the entropy gap H(p_s) - H(p_t): an
under-confident student (higher entropy than its teacher) gets the mode-seeking reverse KL weighted up, an
over-confident one the mean-seeking forward KL. Teacher and student train together (online, DML-style); the
teacher is regularised towards the student with a KL term. The exact weights are not public: ``weight_high`` and
``weight_low`` are knobs, and whether the rule is a hard switch or a continuous function of the entropy gap is not
known either: ``weighting`` offers both.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError

from lit_methods.base import ImageClassifier
from lit_methods.datamodules.batch import as_batch

__all__ = ["BDKD", "BDKDLoss"]


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Per-sample KL(p || q) from log-probabilities."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=1)


def _entropy(log_p: Tensor) -> Tensor:
    return -(log_p.exp() * log_p).sum(dim=1)


class BDKDLoss(nn.Module):
    """The distillation terms of BD-KD for a student and a teacher (cross-entropy terms not included).

    Args:
        temperature: softmax temperature T of both distributions; the terms are scaled by T^2.
        weight_high: weight of the emphasised divergence of a sample.
        weight_low: weight of the other divergence.
        balance: ``"adaptive"`` (BD-KD's per-sample rule) or ``"forward"`` (forward KL only: classic KD).
        weighting: how the adaptive rule turns the entropy gap ``dH = H(p_s) - H(p_t)`` into weights:
            ``"hard"`` switches (``(low, high)`` for ``(forward, reverse)`` where ``dH > 0``, else ``(high, low)``);
            ``"soft"`` interpolates, ``reverse = low + (high - low) * sigmoid(dH / weighting_scale)`` and
            ``forward = low + (high - low) * sigmoid(-dH / weighting_scale)`` (the sum stays ``high + low``; equal
            weights at ``dH = 0``; the hard rule as ``weighting_scale -> 0``).
        weighting_scale: entropy gap (nats, at temperature T) over which the soft weights move from one end to the
            other (about 73% of the way at ``dH = weighting_scale``).
        teacher_divergence: the teacher's term, ``"reverse"`` KL(p_s || p_t) or ``"forward"`` KL(p_t || p_s),
            with the student detached.
    """

    def __init__(
        self,
        temperature: float = 4.0,
        weight_high: float = 1.0,
        weight_low: float = 0.5,
        balance: Literal["adaptive", "forward"] = "adaptive",
        teacher_divergence: Literal["reverse", "forward"] = "reverse",
        weighting: Literal["hard", "soft"] = "hard",
        weighting_scale: float = 0.1,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if weight_high < 0 or weight_low < 0:
            raise ValueError(f"weights must be >= 0, got weight_high={weight_high}, weight_low={weight_low}")
        if balance not in ("adaptive", "forward"):
            raise ValueError(f"balance must be 'adaptive' or 'forward', got {balance!r}")
        if teacher_divergence not in ("reverse", "forward"):
            raise ValueError(f"teacher_divergence must be 'reverse' or 'forward', got {teacher_divergence!r}")
        if weighting not in ("hard", "soft"):
            raise ValueError(f"weighting must be 'hard' or 'soft', got {weighting!r}")
        if weighting == "soft" and balance != "adaptive":
            raise ValueError(f"weighting='soft' shapes the adaptive rule; balance={balance!r} has no rule to shape")
        if not weighting_scale > 0:
            raise ValueError(f"weighting_scale must be > 0, got {weighting_scale}")
        self.temperature = temperature
        self.weight_high = weight_high
        self.weight_low = weight_low
        self.balance = balance
        self.teacher_divergence = teacher_divergence
        self.weighting = weighting
        self.weighting_scale = weighting_scale

    def sample_weights(self, student_logits: Tensor, teacher_logits: Tensor) -> tuple[Tensor, Tensor]:
        """Per-sample weights ``(forward, reverse)`` of the student's two divergences."""
        if self.balance == "forward":
            ones = torch.ones(len(student_logits), device=student_logits.device)
            return ones, torch.zeros_like(ones)
        log_s = F.log_softmax(student_logits / self.temperature, dim=1)
        log_t = F.log_softmax(teacher_logits / self.temperature, dim=1)
        entropy_gap = _entropy(log_s) - _entropy(log_t)
        if self.weighting == "soft":
            span = self.weight_high - self.weight_low
            reverse_share = torch.sigmoid(entropy_gap / self.weighting_scale)
            return self.weight_low + span * (1 - reverse_share), self.weight_low + span * reverse_share
        under_confident = entropy_gap > 0
        high = torch.full_like(under_confident, self.weight_high, dtype=student_logits.dtype)
        low = torch.full_like(high, self.weight_low)
        return torch.where(under_confident, low, high), torch.where(under_confident, high, low)

    def student_term(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        """T^2 * mean_i [a_i FKL_i + b_i RKL_i] with the teacher detached."""
        teacher_logits = teacher_logits.detach()
        log_s = F.log_softmax(student_logits / self.temperature, dim=1)
        log_t = F.log_softmax(teacher_logits / self.temperature, dim=1)
        forward_weight, reverse_weight = self.sample_weights(student_logits.detach(), teacher_logits)
        per_sample = forward_weight * _kl(log_t, log_s) + reverse_weight * _kl(log_s, log_t)
        return self.temperature**2 * per_sample.mean()

    def teacher_term(self, teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
        """T^2 * mean_i KL between the teacher and the detached student (direction: ``teacher_divergence``)."""
        log_t = F.log_softmax(teacher_logits / self.temperature, dim=1)
        log_s = F.log_softmax(student_logits.detach() / self.temperature, dim=1)
        per_sample = _kl(log_s, log_t) if self.teacher_divergence == "reverse" else _kl(log_t, log_s)
        return self.temperature**2 * per_sample.mean()


class BDKD(ImageClassifier):
    """Online distillation: the ``backbone`` (student) and the ``teacher`` train together with BD-KD's losses.

    The student is what ``forward``, the accuracy metrics and ``predict`` use; the student's expected calibration
    error (15 bins, L1) is logged as ``val/ece``/``test/ece`` and the teacher's accuracy as ``val/teacher_acc``.
    One optimizer holds both networks' parameters.

    Args:
        backbone: the student network.
        teacher: the larger network trained alongside (``class_path`` from the CLI, data facts filled like the
            backbone's).
        temperature, weight_high, weight_low, balance, teacher_divergence, weighting, weighting_scale: see
            :class:`BDKDLoss`.
        distillation_weight: weight of the distillation terms next to each network's cross-entropy.
        **kwargs: the arguments of :class:`~lit_methods.ImageClassifier`.
    """

    slug: ClassVar[str] = "bd-kd"

    def __init__(
        self,
        backbone: nn.Module,
        teacher: nn.Module,
        temperature: float = 4.0,
        weight_high: float = 1.0,
        weight_low: float = 0.5,
        balance: Literal["adaptive", "forward"] = "adaptive",
        teacher_divergence: Literal["reverse", "forward"] = "reverse",
        weighting: Literal["hard", "soft"] = "hard",
        weighting_scale: float = 0.1,
        distillation_weight: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(backbone, **kwargs)
        if distillation_weight < 0:
            raise ValueError(f"distillation_weight must be >= 0, got {distillation_weight}")
        self.teacher = teacher
        self.distillation = BDKDLoss(
            temperature=temperature,
            weight_high=weight_high,
            weight_low=weight_low,
            balance=balance,
            teacher_divergence=teacher_divergence,
            weighting=weighting,
            weighting_scale=weighting_scale,
        )
        self.distillation_weight = distillation_weight
        self.val_ece = MulticlassCalibrationError(self.num_classes, n_bins=15, norm="l1")
        self.test_ece = MulticlassCalibrationError(self.num_classes, n_bins=15, norm="l1")
        self.val_teacher_acc = MulticlassAccuracy(self.num_classes, average="micro")

    def shared_step(self, batch: Any, stage: str) -> tuple[Tensor, Tensor, Tensor]:
        batch = as_batch(batch)
        images, targets = batch["inputs"], batch["targets"]
        student_logits = self(images)
        if stage != "train":
            loss = self.compute_loss(student_logits, targets)
            getattr(self, f"{stage}_ece").update(student_logits.softmax(dim=1), targets)
            self.log(f"{stage}/ece", getattr(self, f"{stage}_ece"), on_step=False, on_epoch=True)
            if stage == "val":
                self.val_teacher_acc.update(self.teacher(images), targets)
                self.log("val/teacher_acc", self.val_teacher_acc, on_step=False, on_epoch=True)
            return loss, student_logits, targets
        teacher_logits = self.teacher(images)
        student_loss = self.compute_loss(student_logits, targets) + self.distillation_weight * (
            self.distillation.student_term(student_logits, teacher_logits)
        )
        teacher_loss = self.compute_loss(teacher_logits, targets) + self.distillation_weight * (
            self.distillation.teacher_term(teacher_logits, student_logits)
        )
        self.log_dict({"train/student_loss": student_loss, "train/teacher_loss": teacher_loss}, on_step=True)
        return student_loss + teacher_loss, student_logits, targets
