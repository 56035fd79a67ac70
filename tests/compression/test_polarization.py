"""Polarization (https://arxiv.org/abs/2302.10798): the card's CPU check on digits with a residual net."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn

from lit_methods.compression import Polarization
from lit_methods.datamodules import DigitsDataModule
from lit_methods.pruning.structured import count_parameters
from tests.compression.nets import TinyResNet
from tests.helpers import cpu_trainer

EPOCHS = 6
TARGET = 0.5


def train(regularize: bool) -> tuple[Polarization, DigitsDataModule]:
    L.seed_everything(0)
    datamodule = DigitsDataModule(batch_size=64)
    weight = 1.0 if regularize else 0.0
    model = Polarization(
        TinyResNet(width=16, blocks=2),
        target_keep_ratio=TARGET,
        polarization_weight=2.0 * weight,
        sparsity_weight=10.0 * weight,
        gate_lr=1.0,
        in_channels=1,
        image_size=(8, 8),
        lr=0.05,
    )
    cpu_trainer(max_epochs=EPOCHS, limit_val_batches=0).fit(model, datamodule=datamodule)
    datamodule.setup("test")
    return model.eval(), datamodule


@pytest.fixture(scope="module")
def regularized() -> tuple[Polarization, DigitsDataModule]:
    return train(regularize=True)


def accuracy(net: nn.Module, datamodule: DigitsDataModule) -> float:
    with torch.no_grad():
        logits = net(datamodule.to_inputs(datamodule.test_images))
    return float((logits.argmax(1) == datamodule.test_labels).float().mean())


@pytest.mark.slow
def test_gates_polarise_to_the_target_keep_ratio(regularized) -> None:
    """Card checks 1, 2 and 5. Without the regulariser the same run fails 1 and 2 (test below)."""
    model, datamodule = regularized
    assert model.undecided_share() < 0.05
    assert abs(model.keep_ratio() - TARGET) <= 0.07
    assert accuracy(model, datamodule) >= 0.80


@pytest.mark.slow
def test_export_matches_the_gated_supernet(regularized) -> None:
    """Card check 4: the physical sub-network computes the gated net's logits and has about half the channels. A
    wrong export (dropping the kept instead of the gated-off channels, or leaving gates on) fails it."""
    model, datamodule = regularized
    slim = model.export_subnetwork()
    images = datamodule.to_inputs(datamodule.test_images)
    with torch.no_grad():
        assert (slim(images) - model(images)).abs().max() < 1e-5
    gated = {name for group in model.groups for name in group.norms}
    dense_modules, slim_modules = dict(model.backbone.named_modules()), dict(slim.named_modules())
    kept = sum(slim_modules[name].num_features for name in gated)
    total = sum(dense_modules[name].num_features for name in gated)
    assert abs(kept / total - TARGET) <= 0.1
    assert count_parameters(slim) < 0.6 * count_parameters(model.backbone)
    assert not any(module._forward_hooks for module in slim.modules())


@pytest.mark.slow
def test_without_the_regulariser_gates_neither_polarise_nor_prune() -> None:
    model, _ = train(regularize=False)
    assert model.undecided_share() >= 0.05
    assert abs(model.keep_ratio() - TARGET) > 0.07


def make(**overrides) -> Polarization:
    arguments = dict(backbone=TinyResNet(width=4, blocks=2), in_channels=1, image_size=(8, 8), lr=0.1) | overrides
    return Polarization(**arguments)


@pytest.mark.parametrize("ratio", [0.0, 1.0, 1.5, -0.2])
def test_target_outside_the_open_unit_interval_is_refused(ratio: float) -> None:
    with pytest.raises(ValueError, match=f"target_keep_ratio must lie in \\(0, 1\\), got {ratio}"):
        make(target_keep_ratio=ratio)


def test_unknown_layer_name_is_refused() -> None:
    with pytest.raises(ValueError, match="'head'"):
        make(ignored_layers=["head"])


def test_model_torch_pruning_cannot_trace_is_refused() -> None:
    class GradientFree(nn.Module):
        """Runs without autograd, which torch-pruning traces through."""

        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn, self.fc = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return self.fc(self.bn(self.conv(x)).mean((2, 3)))

    with pytest.raises(ValueError, match="torch-pruning cannot trace GradientFree"):
        make(backbone=GradientFree(), num_classes=10)


def test_missing_image_shape_is_refused() -> None:
    with pytest.raises(ValueError, match="image_size"):
        make(image_size=None)


def test_gates_are_in_the_checkpoint_state() -> None:
    model = make()
    with torch.no_grad():
        model.gates.logits[0][0] = -3.0
    restored = make()
    restored.load_state_dict(model.state_dict())
    assert torch.equal(restored.gates.logits[0], model.gates.logits[0])
    assert restored.keep_masks()[model.groups[0].root][0].item() is False
