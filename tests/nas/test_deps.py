"""DεpS: the delayed epsilon-shrinking schedule, sub-network slicing and BN recalibration, and on digits the
once-for-all behaviour against no delay and against full-width-only training."""

from __future__ import annotations

import random

import lightning as L
import pytest
import torch

from lit_methods.datamodules import DigitsDataModule
from lit_methods.nas import DEpS, ElasticConvNet, SubnetConfig, SubnetScheduler
from tests.helpers import cpu_trainer


def scheduler(**overrides) -> SubnetScheduler:
    options = dict(width_choices=(0.25, 0.5, 0.75, 1.0), depth_choices=[[1, 2], [1, 2, 3]], shrink_start_step=50,
                   epsilon=0.25, epsilon_steps=10, lr_mult_start=0.1, num_random=2, seed=0)
    return SubnetScheduler(**(options | overrides))


def test_before_the_shrink_start_only_the_full_model_trains():
    schedule = scheduler()
    full = SubnetConfig((1.0, 1.0), (2, 3))
    assert all(schedule.configs(step) == [full] for step in range(50))
    assert len(schedule.configs(50)) == 4 and schedule.configs(50)[0] == full


def test_q_grows_in_steps_of_epsilon_and_the_loss_multiplier_is_monotone_and_capped():
    schedule = scheduler()
    progress = [schedule.progress(step) for step in range(50, 200)]
    qs = [q for _, q, _ in progress]
    multipliers = [m for _, _, m in progress]
    assert qs[0] == 0.25 and max(qs) == 1.0
    increments = {round(b - a, 9) for a, b in zip(qs, qs[1:])}
    assert increments == {0.0, 0.25}
    assert all(a <= b for a, b in zip(multipliers, multipliers[1:])) and max(multipliers) == 1.0
    assert multipliers[0] == pytest.approx(0.1 + 0.9 * 0.25)


def test_sampled_subnets_stay_inside_the_space_allowed_by_q():
    schedule = scheduler()
    for step in range(50, 120):
        _, q, _ = schedule.progress(step)
        floor = 1.0 - q * 0.75
        for config in schedule.configs(step):
            assert all(w >= floor - 1e-9 for w in config.widths), (step, config)
    smallest = schedule.configs(150)[1]
    assert smallest == SubnetConfig((0.25, 0.25), (1, 1))


def test_two_ranks_draw_identical_configs_whatever_their_global_random_state():
    """Simulated ranks: each seeds the global RNGs differently (as ranks may) and builds its own scheduler; the
    configs of every step agree because they are drawn from a generator seeded by (seed, step) alone."""
    draws = []
    for rank in range(2):
        torch.manual_seed(rank)
        random.seed(100 + rank)
        draws.append([scheduler().configs(step) for step in range(40, 140)])
    assert draws[0] == draws[1]
    assert len({c for step in draws[0] for c in step[2:]}) > 5  # the random ones do vary across steps


def test_a_subnet_uses_the_first_channels_of_the_full_weights():
    """Against a hand-built plain net holding the first 8 of 16 channels."""
    torch.manual_seed(0)
    net = ElasticConvNet(num_classes=3, in_channels=1, stage_widths=(16,), stage_depths=(1,)).eval()
    x = torch.randn(2, 1, 6, 6)
    conv, bn = net.convs[0][0], net.bns[0][0]
    plain_conv = torch.nn.Conv2d(1, 8, 3, padding=1, bias=False)
    plain_conv.weight.data = conv.weight[:8].clone()
    plain_bn = torch.nn.BatchNorm2d(8).eval()
    plain_bn.load_state_dict({k: v[:8] if v.dim() else v for k, v in bn.state_dict().items()})
    features = torch.nn.functional.avg_pool2d(torch.relu(plain_bn(plain_conv(x))), 2).mean(dim=(2, 3))
    expected = features @ net.fc.weight[:, :8].T + net.fc.bias
    torch.testing.assert_close(net(x, SubnetConfig((0.5,), (1,))), expected)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="epsilon must lie in"):
        scheduler(epsilon=0.0)
    with pytest.raises(ValueError, match=r"shrink_start must lie in \[0, 1\], got 1.5"):
        DEpS(num_classes=10, in_channels=1, stage_widths=(8,), stage_depths=(1,), shrink_start=1.5)
    with pytest.raises(ValueError, match=r"width_choices must be a non-empty list in \(0, 1\]"):
        DEpS(num_classes=10, in_channels=1, stage_widths=(8,), stage_depths=(1,), width_choices=(0.5, 1.5))


def train(shrink_start: float) -> dict[str, float]:
    """4 epochs (84 steps) of a 2-stage elastic CNN (32/64 channels) on digits; test accuracy of every width after
    BN recalibration on 4 training batches."""
    torch.set_num_threads(1)
    L.seed_everything(0)
    datamodule = DigitsDataModule(batch_size=64)
    module = DEpS(num_classes=10, in_channels=1, stage_widths=(32, 64), stage_depths=(1, 1), pooled_size=2,
                  shrink_start=shrink_start, epsilon=0.25, epsilon_steps=6, lr=0.05)
    cpu_trainer(max_epochs=4, limit_val_batches=0).fit(module, datamodule=datamodule)
    datamodule.setup("test")
    calibration = [datamodule.to_inputs(datamodule.train_images[i * 64 : (i + 1) * 64]) for i in range(4)]
    return module.subnet_accuracies(datamodule.to_inputs(datamodule.test_images), datamodule.test_labels,
                                    calibration)


@pytest.mark.slow
def test_delayed_shrinking_trains_every_width_and_keeps_the_full_model():
    """Seed 0 on digits: DεpS (shrink_start 0.5) gives 0.80/0.85/0.90/0.93 at widths 25/50/75/100%; no delay
    (shrink_start 0) 0.76/0.79/0.79/0.81; full-width-only training (shrink_start 1, the no-op) leaves the 25%
    sub-net at 0.31, which fails the 70% check."""
    delayed = train(0.5)
    names = ["w25-25_d1-1", "w50-50_d1-1", "w75-75_d1-1", "w100-100_d1-1"]
    assert all(delayed[name] > 0.70 for name in names), delayed
    assert all(a <= b + 0.02 for a, b in zip([delayed[n] for n in names], [delayed[n] for n in names[1:]]))
    no_delay = train(0.0)
    assert delayed["w100-100_d1-1"] >= no_delay["w100-100_d1-1"] - 0.01, (delayed, no_delay)
    full_only = train(1.0)
    assert full_only["w25-25_d1-1"] < 0.40, full_only
