"""BD-KD: the loss's limits and per-sample rule, and the online student/teacher module."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lit_methods.datamodules import DigitsDataModule
from lit_methods.knowledge_distillation import BDKD, BDKDLoss
from lit_methods.nets import ConvNet
from tests.helpers import cpu_trainer

T = 4.0


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    p = F.softmax(logits / T, dim=1)
    return -(p * p.log()).sum(1)


def test_distillation_is_zero_for_equal_logits_and_positive_otherwise():
    loss = BDKDLoss(temperature=T)
    z = torch.randn(8, 5)
    assert loss.student_term(z, z) == pytest.approx(0.0, abs=1e-6)
    assert loss.teacher_term(z, z) == pytest.approx(0.0, abs=1e-6)
    other = torch.randn(8, 5)
    assert loss.student_term(z, other) > 0 and loss.teacher_term(z, other) > 0


def test_forward_balance_is_classic_kd():
    student, teacher = torch.randn(6, 10), torch.randn(6, 10)
    ours = BDKDLoss(temperature=T, balance="forward").student_term(student, teacher)
    hinton = F.kl_div(F.log_softmax(student / T, 1), F.softmax(teacher / T, 1), reduction="batchmean") * T**2
    torch.testing.assert_close(ours, hinton)


def _flat_and_peaked() -> tuple[torch.Tensor, torch.Tensor]:
    """Sample 0: flat student, peaked teacher (under-confident student); sample 1: the other way round."""
    flat, peaked = torch.tensor([0.1, 0.0, -0.1, 0.0]), torch.tensor([8.0, 0.0, 0.0, -2.0])
    return torch.stack([flat, peaked]), torch.stack([peaked, flat])


def test_under_confident_samples_weight_reverse_kl_and_over_confident_ones_forward_kl():
    student, teacher = _flat_and_peaked()
    assert _entropy(student)[0] > _entropy(teacher)[0] and _entropy(student)[1] < _entropy(teacher)[1]
    forward, reverse = BDKDLoss(temperature=T, weight_high=1.0, weight_low=0.25).sample_weights(student, teacher)
    assert forward.tolist() == [0.25, 1.0] and reverse.tolist() == [1.0, 0.25]


def test_soft_weights_are_a_sigmoid_of_the_entropy_gap():
    """``weighting="soft"``: ``reverse = low + (high - low) sigmoid(dH / s)``, ``forward = low + (high - low)
    sigmoid(-dH / s)`` from the temperature-scaled entropies, computed here by hand; they sum to ``high + low``, are
    equal at ``dH = 0`` and tend to the hard rule for a small scale. Checked to fail with the hard weights in place of
    the soft ones and with the sigmoid's sign flipped."""
    torch.manual_seed(0)
    student, teacher = torch.randn(16, 5) * 3, torch.randn(16, 5) * 3
    gap = _entropy(student) - _entropy(teacher)
    assert (gap > 0).any() and (gap < 0).any()
    loss = BDKDLoss(temperature=T, weight_high=1.0, weight_low=0.25, weighting="soft", weighting_scale=0.2)
    forward, reverse = loss.sample_weights(student, teacher)
    expected_reverse = [0.25 + 0.75 / (1 + math.exp(-g / 0.2)) for g in gap.tolist()]
    expected_forward = [0.25 + 0.75 / (1 + math.exp(g / 0.2)) for g in gap.tolist()]
    assert reverse.tolist() == pytest.approx(expected_reverse, rel=1e-5)
    assert forward.tolist() == pytest.approx(expected_forward, rel=1e-5)
    torch.testing.assert_close(forward + reverse, torch.full((16,), 1.25))
    equal = BDKDLoss(temperature=T, weighting="soft").sample_weights(student, student)
    torch.testing.assert_close(equal[0], equal[1])
    sharp = BDKDLoss(temperature=T, weight_high=1.0, weight_low=0.25, weighting="soft", weighting_scale=1e-4)
    hard = BDKDLoss(temperature=T, weight_high=1.0, weight_low=0.25)
    for soft_weight, hard_weight in zip(sharp.sample_weights(student, teacher), hard.sample_weights(student, teacher)):
        torch.testing.assert_close(soft_weight, hard_weight)
    # the student term uses the soft weights, per sample
    log_s, log_t = F.log_softmax(student / T, 1), F.log_softmax(teacher / T, 1)
    kl_forward = (log_t.exp() * (log_t - log_s)).sum(1)
    kl_reverse = (log_s.exp() * (log_s - log_t)).sum(1)
    expected = T**2 * (torch.tensor(expected_forward) * kl_forward + torch.tensor(expected_reverse) * kl_reverse).mean()
    torch.testing.assert_close(loss.student_term(student, teacher), expected)


def test_with_zero_low_weight_the_gradient_is_pure_reverse_then_pure_forward_kl():
    student, teacher = _flat_and_peaked()
    student.requires_grad_(True)
    BDKDLoss(temperature=T, weight_low=0.0).student_term(student, teacher).backward()
    log_s, log_t = F.log_softmax(student / T, 1), F.log_softmax(teacher / T, 1)
    reverse = (log_s.exp() * (log_s - log_t)).sum(1)[0]
    forward = (log_t.exp() * (log_t - log_s)).sum(1)[1]
    (expected,) = torch.autograd.grad(T**2 * (reverse + forward) / 2, student)
    torch.testing.assert_close(student.grad, expected)


def test_a_step_on_the_student_term_narrows_both_entropy_gaps():
    student, teacher = _flat_and_peaked()
    gap = (_entropy(student) - _entropy(teacher)).abs()
    student.requires_grad_(True)
    BDKDLoss(temperature=T).student_term(student, teacher).backward()
    stepped = student.detach() - 0.5 * student.grad
    assert ((_entropy(stepped) - _entropy(teacher)).abs() < gap).all()


def test_each_term_only_moves_its_own_network():
    student, teacher = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    loss = BDKDLoss(temperature=T)
    loss.student_term(student, teacher).backward()
    assert teacher.grad is None and student.grad is not None
    student.grad = None
    loss.teacher_term(teacher, student).backward()
    assert student.grad is None and teacher.grad is not None


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(temperature=0.0), "temperature.*0.0"),
        (dict(weight_low=-1.0), "weight_low=-1.0"),
        (dict(balance="x"), "'x'"),
        (dict(weighting="smooth"), "weighting.*'smooth'"),
        (dict(weighting="soft", balance="forward"), "weighting='soft'.*balance='forward'"),
        (dict(weighting="soft", weighting_scale=0.0), "weighting_scale.*0.0"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BDKDLoss(**kwargs)


def _module(**kwargs) -> BDKD:
    torch.manual_seed(0)
    student = ConvNet(num_classes=10, in_channels=1, depth=2, width=4, image_size=8)
    teacher = ConvNet(num_classes=10, in_channels=1, depth=2, width=16, image_size=8)
    return BDKD(student, teacher=teacher, lr=0.05, **kwargs)


def test_training_loss_is_both_networks_objectives_and_trains_both():
    model = _module(distillation_weight=0.7)
    images, targets = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    loss, logits, _ = model.shared_step((images, targets), "train")
    z_s, z_t = model.backbone(images), model.teacher(images)
    kd = model.distillation
    expected = (
        F.cross_entropy(z_s, targets) + 0.7 * kd.student_term(z_s, z_t)
        + F.cross_entropy(z_t, targets) + 0.7 * kd.teacher_term(z_t, z_s)
    )
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(logits, z_s)
    loss.backward()
    assert all(p.grad is not None for p in model.teacher.parameters())
    assert all(p.grad is not None for p in model.backbone.parameters())


def test_online_training_on_digits_logs_student_calibration(tmp_path):
    model = _module()
    trainer = cpu_trainer(max_epochs=2, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=32))
    metrics = trainer.callback_metrics
    assert metrics["val/acc"] > 0.5 and metrics["val/teacher_acc"] > 0.5  # both nets learn (chance 0.1)
    assert 0.0 <= metrics["val/ece"] <= 1.0
