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


def _online_student_ece(seed: int, loss: BDKDLoss, epochs: int = 30, train_size: int = 300) -> float:
    """Student ECE (15 bins, L1, torchmetrics) on the held-out digits after online training of a width-8 student and
    a width-32 teacher (ConvNet-2, batch norm) on ``train_size`` digits: SGD 0.05, momentum 0.9, cosine, no weight
    decay, both cross-entropies plus ``loss``'s student and teacher terms, as :class:`BDKD` trains them."""
    from torchmetrics.functional.classification import multiclass_calibration_error

    from lit_methods.datamodules.digits import load_digits_uint8

    images, labels = load_digits_uint8()
    inputs = images.float() / 255
    inputs = (inputs - inputs.mean()) / inputs.std()
    order = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(0))
    train, held_out = order[:train_size], order[train_size:]
    torch.manual_seed(seed)
    student = ConvNet(num_classes=10, in_channels=1, depth=2, width=8, norm="batchnorm", image_size=8)
    teacher = ConvNet(num_classes=10, in_channels=1, depth=2, width=32, norm="batchnorm", image_size=8)
    optimizer = torch.optim.SGD([*student.parameters(), *teacher.parameters()], lr=0.05, momentum=0.9)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * math.ceil(train_size / 64))
    shuffle = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in train[torch.randperm(train_size, generator=shuffle)].split(64):
            z_s, z_t, y = student(inputs[idx]), teacher(inputs[idx]), labels[idx]
            total = F.cross_entropy(z_s, y) + F.cross_entropy(z_t, y)
            total = total + loss.student_term(z_s, z_t) + loss.teacher_term(z_t, z_s)
            optimizer.zero_grad()
            total.backward()
            optimizer.step()
            schedule.step()
    student.eval()
    with torch.no_grad():
        probabilities = student(inputs[held_out]).softmax(dim=1)
    return multiclass_calibration_error(probabilities, labels[held_out], 10, n_bins=15, norm="l1").item()


@pytest.mark.slow
def test_student_is_better_calibrated_than_with_mutual_learning_on_digits():
    """The paper's calibration claim: the BD-KD student's ECE is lower than the deep-mutual-learning student's
    (DML, Zhang et al. arXiv:1706.00384: forward KL for the student, KL(p_s || p_t) for the teacher) under the same
    budget, for each of 3 seeds. Both runs use T = 1 (DML's), the same nets, data, seeds and teacher term, so the
    only difference is BD-KD's per-sample balance of the student's divergences (default weights 1 / 0.5).
    Measured (300 training digits, 1,497 held out, 30 epochs): BD-KD 0.0417/0.0400/0.0374 vs DML
    0.0456/0.0475/0.0437 (seeds 0-2; seeds 3-5 also lower: 0.036/0.041/0.044 vs 0.042/0.050/0.051), accuracy equal
    (94-96%). These students are under-confident (mean confidence 0.91 at 95% accuracy) and BD-KD's reverse-KL
    emphasis sharpens them. At our CPU config's T = 4 the claim does NOT hold on digits: BD-KD 0.063/0.071/0.060
    vs DML at T = 1 0.055/0.060/0.038, and equal to DML at T = 4 (0.062/0.067/0.057). Checked to fail with the
    method replaced by DML (``balance="forward"`` on both sides: equal ECE)."""
    torch.set_num_threads(1)  # tiny nets; the figures above are single-threaded
    bdkd, dml = [], []
    for seed in (0, 1, 2):
        bdkd.append(_online_student_ece(seed, BDKDLoss(temperature=1.0)))
        dml.append(_online_student_ece(seed, BDKDLoss(temperature=1.0, balance="forward")))
    print(f"student ECE, BD-KD {[round(v, 4) for v in bdkd]} vs DML {[round(v, 4) for v in dml]}")
    assert all(ours < theirs for ours, theirs in zip(bdkd, dml)), (bdkd, dml)
    assert sum(bdkd) < 0.95 * sum(dml), (bdkd, dml)
