"""The RDP accountant against opacus' RDPAccountant, noise calibration, the budget search and DiceSGD's entries."""

from __future__ import annotations

import math
import sys

import pytest

from lit_methods.privacy import (
    calibrate_by_bisection,
    calibrate_noise_multiplier,
    dicesgd_step_entry,
    feedback_noise_multiplier,
    rdp_epsilon,
    require_opacus,
    steps_within_budget,
)

opacus = pytest.importorskip("opacus")


def test_epsilon_of_a_mixed_history_equals_opacus_rdp_accountant():
    from opacus.accountants import RDPAccountant

    history = [(1.1, 0.01, 30), (0.8, 0.02, 7)]
    accountant = RDPAccountant()
    for sigma, q, steps in history:
        for _ in range(steps):
            accountant.step(noise_multiplier=sigma, sample_rate=q)
    assert rdp_epsilon(history, 1e-5) == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
    assert rdp_epsilon([], 1e-5) == 0.0


def test_calibrated_noise_spends_the_target_budget():
    sigma = calibrate_noise_multiplier(target_epsilon=3.0, delta=1e-5, sample_rate=0.05, steps=200)
    spent = rdp_epsilon([(sigma, 0.05, 200)], 1e-5)
    assert spent <= 3.0 and spent == pytest.approx(3.0, rel=0.02)


@pytest.mark.parametrize("counted", [1, 3])
def test_steps_within_budget_is_the_largest_count_that_stays_within_it(counted):
    history = [(1.0, 0.1, 12)]
    allowed = steps_within_budget(history, (1.2, 0.1, counted), 1e-5, target_epsilon=4.0)
    assert allowed > 0
    assert rdp_epsilon([*history, (1.2, 0.1, allowed * counted)], 1e-5) <= 4.0
    assert rdp_epsilon([*history, (1.2, 0.1, (allowed + 1) * counted)], 1e-5) > 4.0
    spent = rdp_epsilon(history, 1e-5)
    assert steps_within_budget(history, (1.2, 0.1, counted), 1e-5, target_epsilon=spent) == 0


def test_require_opacus_names_the_user_when_opacus_is_missing(monkeypatch):
    require_opacus("MyCallback")  # installed: no error
    monkeypatch.setitem(sys.modules, "opacus", None)  # an import of opacus now raises ImportError
    with pytest.raises(ImportError, match=r"MyCallback needs opacus: pip install 'lit-methods\[privacy\]'"):
        require_opacus("MyCallback")


@pytest.mark.parametrize("c1,c2,batch", [(1.0, 1.0, 64), (0.1, 0.4, 256)])
def test_feedback_noise_multiplier_is_the_noise_std_over_the_feedback_sensitivity(c1, c2, batch):
    sigma = 3.0
    std = math.hypot(sigma * c1 / batch, sigma * c2 / batch)  # the two independent noise terms
    assert feedback_noise_multiplier(sigma, c1, c2, batch) == pytest.approx(std / (c1 / batch + 2 * c2), rel=1e-12)
    assert feedback_noise_multiplier(0.0, math.inf, math.inf, batch) == 0.0


def test_dicesgd_step_entries_of_both_accountants_and_an_unknown_one():
    common = {"clip_norm": 1.0, "feedback_clip_norm": 2.0, "batch_size": 32, "log_epochs_count": 3}
    bound = "feedback_sensitivity_bound"
    assert dicesgd_step_entry(bound, 2.0, 0.1, first_step=True, **common) == (2.0, 1.0, 1)  # not amplified
    assert dicesgd_step_entry(bound, 2.0, 0.1, first_step=False, **common) == (
        feedback_noise_multiplier(2.0, 1.0, 2.0, 32),
        1.0,
        1,
    )
    heuristic = "official_code_log_epochs_heuristic"
    assert dicesgd_step_entry(heuristic, 2.0, 0.1, first_step=False, **common) == (2.0, 0.1, 3)
    with pytest.raises(ValueError, match="accountant must be one of.*'exact'"):
        dicesgd_step_entry("exact", 2.0, 0.1, first_step=True, **common)


def test_calibrate_by_bisection_finds_the_smallest_noise_within_the_target():
    def epsilon_of(sigma: float) -> float:
        return rdp_epsilon([(sigma, 0.05, 300)], 1e-5)

    sigma = calibrate_by_bisection(epsilon_of, 2.0)
    assert epsilon_of(sigma) <= 2.0 < epsilon_of(sigma * (1 - 2e-3))
