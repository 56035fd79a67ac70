"""AP's per-cycle learning-rate schedule against a re-enactment of the official training loop's LR bookkeeping."""

from __future__ import annotations

import pickle

import pytest
import torch

from lit_methods.pruning import CyclicWarmupStepLR


def official_trace(
    peak: float, cycles: int, epochs_per_cycle: int, steps_per_epoch: int, warmup: int, drops: tuple[int, int]
) -> list[float]:
    """The rate of every optimizer step as AP's ``resnet_20.py`` sets it: at each cycle the rate restarts from the
    ``--lr`` default 0 and the iteration counter from 0; before each batch the counter is incremented, the rate
    grows by ``peak / warmup`` while the counter is at most ``warmup``, and from the first drop epoch of the cycle
    the rate is overwritten with ``peak / 10``, from the second with ``peak / 100``."""
    rates = []
    slope = peak / warmup
    for _ in range(cycles):
        rate, iteration = 0.0, 0
        for epoch in range(epochs_per_cycle):
            for _ in range(steps_per_epoch):
                iteration += 1
                if iteration <= warmup:
                    rate = rate + slope
                if epoch >= drops[0]:
                    rate = peak / 10
                if epoch >= drops[1]:
                    rate = peak / 100
                rates.append(rate)
    return rates


@pytest.mark.parametrize("warmup", [7, 40])  # the warm-up ends inside the first phase, or the first drop cuts it
def test_rates_reproduce_the_official_trace_step_for_step(warmup):
    """Three cycles of 6 epochs x 5 steps, drops at epochs 3 and 5. Checked to fail without the per-cycle restart
    (the warm-up and drops counted from the start of training) and with the warm-up's first step at rate 0
    (``s / warmup`` instead of ``(s + 1) / warmup``)."""
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=0.1, momentum=0.9)
    scheduler = CyclicWarmupStepLR(
        optimizer, steps_per_epoch=5, epochs_per_cycle=6, warmup_steps=warmup, drop_epochs=(3, 5)
    )
    rates = []
    for _ in range(3 * 6 * 5):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = official_trace(0.1, cycles=3, epochs_per_cycle=6, steps_per_epoch=5, warmup=warmup, drops=(3, 5))
    assert rates == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert max(rates) == pytest.approx(0.1 * min(warmup, 15) / warmup)


def test_the_schedule_resumes_from_its_state_dict():
    """A scheduler restored mid-cycle continues the same trace (its factor is a picklable object)."""

    def make():
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        schedule = dict(steps_per_epoch=4, epochs_per_cycle=5, warmup_steps=6, drop_epochs=(2, 4))
        return optimizer, CyclicWarmupStepLR(optimizer, **schedule)

    optimizer, scheduler = make()
    for _ in range(13):
        optimizer.step()
        scheduler.step()
    state = pickle.loads(pickle.dumps(scheduler.state_dict()))
    restored_optimizer, restored = make()
    restored.load_state_dict(state)
    restored_optimizer.load_state_dict(optimizer.state_dict())
    for _ in range(20):
        optimizer.step(), scheduler.step(), restored_optimizer.step(), restored.step()
        assert restored_optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(steps_per_epoch=0), "steps_per_epoch must be an int >= 1, got 0"),
        (dict(warmup_steps=0), "warmup_steps must be an int >= 1, got 0"),
        (dict(drop_epochs=(32, 25)), r"drop_epochs must increase .* got \(32, 25\)"),
        (dict(drop_epochs=(25, 50)), r"epochs_per_cycle=50\), got \(25, 50\)"),
        (dict(drop_factor=1.5), "drop_factor must lie in \\(0, 1\\], got 1.5"),
    ],
)
def test_bad_schedule_arguments_are_refused_naming_them(kwargs, match):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match=match):
        CyclicWarmupStepLR(optimizer, **(dict(steps_per_epoch=782, epochs_per_cycle=50) | kwargs))
