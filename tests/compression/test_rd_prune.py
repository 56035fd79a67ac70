"""RD pruning (https://arxiv.org/abs/2308.10438): the card's CPU checks on a CNN trained on digits."""

from __future__ import annotations

import itertools

import lightning as L
import pytest
import torch
from torch import nn

from lit_methods.compression import RDPrune
from lit_methods.datamodules import DigitsDataModule
from lit_methods.pruning.rate_distortion import dp_allocate, magnitude_mask, output_distortion, rd_curves
from tests.helpers import cpu_trainer


def cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 4, 10),
    )


@pytest.fixture(scope="module")
def trained() -> tuple[RDPrune, DigitsDataModule]:
    """3 dense epochs (pruning scheduled after the run), 128 calibration images collected on the way."""
    L.seed_everything(0)
    datamodule = DigitsDataModule(batch_size=64)
    model = RDPrune(
        cnn(), num_classes=10, in_channels=1, image_size=(8, 8), pretrain_epochs=10, calibration_size=128,
        grid_size=20, worst_case=False, lr=0.05,
    )
    cpu_trainer(max_epochs=3, limit_val_batches=0).fit(model, datamodule=datamodule)
    datamodule.setup("test")
    return model.eval(), datamodule


def distortion_with(model: RDPrune, masks: dict[str, torch.Tensor], inputs: torch.Tensor) -> float:
    weights = model.weights()
    saved = {n: w.detach().clone() for n, w in weights.items()}
    with torch.no_grad():
        reference = model(inputs)
        for name, mask in masks.items():
            weights[name].mul_(mask)
        distortion = output_distortion(reference, model(inputs), worst_case=False)
        for name, weight in weights.items():
            weight.copy_(saved[name])
    return distortion


def accuracy_with(model: RDPrune, masks: dict[str, torch.Tensor], datamodule: DigitsDataModule) -> float:
    weights = model.weights()
    saved = {n: w.detach().clone() for n, w in weights.items()}
    with torch.no_grad():
        for name, mask in masks.items():
            weights[name].mul_(mask)
        logits = model(datamodule.to_inputs(datamodule.test_images))
        for name, weight in weights.items():
            weight.copy_(saved[name])
    return float((logits.argmax(1) == datamodule.test_labels).float().mean())


@pytest.mark.slow
def test_distortions_are_nearly_additive(trained) -> None:
    """Card check (a): pruning two layers at 30% distorts about as much as the sum of the two alone."""
    model, _ = trained
    inputs = model.calibration_inputs
    weights = model.weights()
    first, second = list(weights)[1:3]
    single = [distortion_with(model, {n: magnitude_mask(weights[n], 0.3)}, inputs) for n in (first, second)]
    joint = distortion_with(model, {n: magnitude_mask(weights[n], 0.3) for n in (first, second)}, inputs)
    assert single[0] > 0 and single[1] > 0
    assert abs(joint - sum(single)) <= 0.25 * sum(single)


@pytest.mark.slow
def test_dynamic_program_equals_brute_force(trained) -> None:
    """Card check (b): 3 layers, grid of 6 levels, all 6^3 allocations enumerated."""
    model, _ = trained
    weights = dict(list(model.weights().items())[:3])
    amounts = [k / 5 for k in range(6)]
    with torch.no_grad():
        curves = rd_curves(model, weights, model.calibration_inputs, amounts, worst_case=False)
    sizes = [w.numel() for w in weights.values()]
    budget = int(0.4 * sum(sizes))
    picked = dp_allocate(sizes, curves, amounts, budget)

    def kept(choice: tuple[int, ...]) -> int:
        return sum(round(n * (1 - amounts[k])) for n, k in zip(sizes, choice))

    feasible = [c for c in itertools.product(range(6), repeat=3) if kept(c) <= budget]
    best = min(float(sum(curves[l, k] for l, k in enumerate(c))) for c in feasible)
    assert kept(tuple(picked)) <= budget
    assert float(sum(curves[l, k] for l, k in enumerate(picked))) == pytest.approx(best, rel=1e-9, abs=1e-12)


@pytest.mark.slow
def test_rd_allocation_meets_the_budget_and_beats_uniform_at_80_percent(trained) -> None:
    """Card checks (c) and (d), no retraining. A no-op allocator (uniform) is the comparison; an allocator ignoring
    the curves would not reach a lower distortion."""
    model, datamodule = trained
    masks = model.allocate(0.8)
    total = sum(m.numel() for m in masks.values())
    sparsity = 1.0 - sum(float(m.sum()) for m in masks.values()) / total
    assert abs(sparsity - 0.8) <= 1.0 / total
    uniform = {n: magnitude_mask(w, 0.8) for n, w in model.weights().items()}
    inputs = model.calibration_inputs
    assert distortion_with(model, masks, inputs) < distortion_with(model, uniform, inputs)
    assert accuracy_with(model, masks, datamodule) >= accuracy_with(model, uniform, datamodule)


@pytest.mark.slow
def test_a_second_round_never_lowers_a_layer_sparsity(trained) -> None:
    """Card check (e), through the module's own rounds: 50% then 80%."""
    model, _ = trained
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        first = model.allocate(0.5)
        for i, name in enumerate(model.layer_names):
            getattr(model.masks, f"layer{i}").copy_(first[name])
        second = model.allocate(0.8)
        for name in model.layer_names:
            assert torch.all(second[name] <= first[name])  # nothing pruned comes back
    finally:
        model.load_state_dict(state)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="amount_per_iteration must lie in \\(0, 1\\), got 1.2"):
        RDPrune(cnn(), num_classes=10, in_channels=1, image_size=(8, 8), amount_per_iteration=1.2)
    with pytest.raises(ValueError, match="'fc'"):
        RDPrune(cnn(), num_classes=10, in_channels=1, image_size=(8, 8), exclude=["fc"])
