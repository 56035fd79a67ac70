"""TAS: channel interpolation, expected FLOPs against torch's FLOP counter on one-hot shapes, the cost's gradient,
the search's FLOP ratio with and without the cost on digits, and KD retraining of the searched shape."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from lit_methods import ImageClassifier
from lit_methods.datamodules import DigitsDataModule
from lit_methods.nas import TAS, ShapedResNet, TASDistillation, TASSearchResNet, channel_interpolate, flop_loss
from lit_methods.nas.tas import sample_two
from tests.helpers import cpu_trainer


def test_channel_interpolation_averages_contiguous_channel_pairs():
    x = torch.randn(2, 4, 3, 3)
    expected = torch.stack([(x[:, 0] + x[:, 1]) / 2, (x[:, 2] + x[:, 3]) / 2], dim=1)
    torch.testing.assert_close(channel_interpolate(x, 2), expected)
    assert channel_interpolate(x, 8).shape == (2, 8, 3, 3)


def counted_macs(net: torch.nn.Module, in_channels: int, size: int) -> int:
    """Multiply-accumulates of convolutions and linear layers by torch's FLOP counter (2 FLOPs per MAC)."""
    with FlopCounterMode(display=False) as counter:
        net(torch.zeros(1, in_channels, size, size))
    return counter.get_total_flops() // 2


@pytest.mark.parametrize("blocks", [(1, 1, 1), (3, 2, 3)])
def test_expected_flops_on_one_hot_probabilities_equal_the_counted_flops(blocks):
    """Random argmax widths and depths: the expected FLOPs with one-hot probabilities equal torch's count of the
    plain network of that shape (a wrong depth weighting, stride or shortcut term fails the (3, 2, 3) case)."""
    torch.manual_seed(0)
    search = TASSearchResNet(num_classes=10, in_channels=3, stage_widths=(16, 32, 64), blocks=blocks)
    for logits in [*search.width_logits, *search.depth_logits]:
        logits.data = torch.randn_like(logits)
    shape = search.argmax_shape()
    net = ShapedResNet(10, 3, shape.residual_widths, shape.inner_widths, shape.depths)
    expected = search.expected_flops((16, 16), one_hot=True)
    assert int(expected) == counted_macs(net, 3, 16) == net.flops(3, (16, 16))
    full = ShapedResNet(10, 3, (16, 32, 64), [[w] * n for w, n in zip((16, 32, 64), blocks)], blocks)
    assert search.full_flops((16, 16)) == counted_macs(full, 3, 16)


def test_the_flop_cost_has_a_gradient_in_every_architecture_logit_and_points_the_right_way():
    search = TASSearchResNet(num_classes=10, in_channels=1, stage_widths=(8, 16, 32), blocks=(3, 1, 1))
    expected = search.expected_flops((8, 8))
    full = search.full_flops((8, 8))
    flop_loss(expected, current_flops=0.9 * full, full_flops=full, target=0.5, tolerance=0.05).backward()
    multi_option = [logits for logits in search.architecture_parameters() if len(logits) > 1]
    assert len(multi_option) == len(search.width_logits) + 1  # the 3-block stage has a depth choice
    for logits in multi_option:
        assert logits.grad is not None and logits.grad.abs().sum() > 0
    # shrinking: descending the cost moves probability towards narrower widths (the first candidates)
    first = search.width_logits[0].grad
    assert first[0] < 0 < first[-1]
    assert flop_loss(expected, 0.47 * full, full, 0.5, 0.05) == 0


def test_two_sampled_candidates_are_distinct_and_drawn_alike_for_the_same_seed():
    logits = torch.randn(8, requires_grad=True)
    indices, weights = sample_two(logits, 1.0, torch.Generator().manual_seed(3))
    again, _ = sample_two(logits, 1.0, torch.Generator().manual_seed(3))
    assert indices.tolist() == again.tolist() and indices[0] != indices[1]
    assert torch.isclose(weights.sum(), torch.tensor(1.0))
    weights[0].backward()
    assert logits.grad.abs().sum() > 0


def test_bad_search_settings_are_refused():
    with pytest.raises(ValueError, match=r"flop_target must lie in \(0, 1\], got 1.5"):
        TAS(num_classes=10, in_channels=1, image_size=(8, 8), flop_target=1.5)
    with pytest.raises(ValueError, match="no architecture of this search space reaches flop_target=0.05"):
        TAS(num_classes=10, in_channels=1, image_size=(8, 8), stage_widths=(8, 16, 32), blocks=(1, 1, 1),
            width_ratios=(0.8, 1.0), flop_target=0.05, flop_tolerance=0.0)


def search(flop_weight: float, tmp_path) -> TAS:
    """200 search steps on digits (batch 64, halves of 32) with a ResNet-8 space of widths (8, 16, 32)."""
    torch.set_num_threads(1)
    L.seed_everything(0)
    module = TAS(num_classes=10, in_channels=1, image_size=(8, 8), stage_widths=(8, 16, 32), blocks=(1, 1, 1),
                 flop_target=0.5, flop_tolerance=0.05, flop_weight=flop_weight, tau_max=4.0, arch_lr=0.005, lr=0.05)
    trainer = cpu_trainer(max_steps=200, max_epochs=-1, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=64))
    return module


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    return search(2.0, tmp_path_factory.mktemp("tas"))


@pytest.mark.slow
def test_the_search_ends_near_the_flop_target_and_stays_wide_without_the_cost(searched, tmp_path):
    """Seed 0: with the cost the argmax shape ends at FLOP ratio 0.48 (it starts at 0.32 and passes 0.8); with
    flop_weight=0 it ends at 0.82: the cost flips the direction."""
    assert 0.45 <= searched.flop_ratio() <= 0.55, searched.flop_ratio()
    assert search(0.0, tmp_path).flop_ratio() > 0.7


def test_kd_student_follows_the_teacher_faster_than_cross_entropy_alone(tmp_path):
    """A full ResNet-8 teacher trained 1 epoch on digits; two students of a pruned shape train 15 steps from the
    same init, with KD (lambda 0.9, T 4) and with CE only (kd_weight=0): KL(teacher || student) on the test digits
    is lower with KD. Fails when the KD term is dropped (both runs are then the same)."""
    torch.set_num_threads(1)
    datamodule = DigitsDataModule(batch_size=64)
    L.seed_everything(0)
    teacher = ShapedResNet(10, 1, (8, 16, 32), ((8,), (16,), (32,)), (1, 1, 1))
    teacher_module = ImageClassifier(teacher, lr=0.05)
    cpu_trainer(max_epochs=1).fit(teacher_module, datamodule=datamodule)
    teacher_path = tmp_path / "teacher.ckpt"
    torch.save({"state_dict": teacher_module.state_dict()}, teacher_path)

    def distill(kd_weight: float) -> float:
        L.seed_everything(1)
        student = ShapedResNet(10, 1, (4, 8, 16), ((4,), (8,), (16,)), (1, 1, 1))
        module = TASDistillation(student, ShapedResNet(10, 1, (8, 16, 32), ((8,), (16,), (32,)), (1, 1, 1)),
                                 teacher_checkpoint=str(teacher_path), kd_weight=kd_weight, lr=0.05)
        cpu_trainer(max_steps=15, max_epochs=-1).fit(module, datamodule=datamodule)
        datamodule.setup("test")
        x = datamodule.to_inputs(datamodule.test_images)
        module.eval()
        with torch.no_grad():
            return float(F.kl_div(module(x).log_softmax(-1), module.teacher(x).softmax(-1), reduction="batchmean"))

    assert distill(0.9) < distill(0.0)


@pytest.mark.slow
def test_the_best_shape_is_written_for_retraining(searched):
    """``tas_shape.json`` holds the arguments of the ShapedResNet that TASDistillation trains."""
    written = json.loads((Path(searched.trainer.log_dir) / "tas_shape.json").read_text())
    net = ShapedResNet(10, 1, **written["shape"])
    assert net(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
