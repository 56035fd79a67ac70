"""OTOv2 (https://arxiv.org/abs/2303.06862): the card's CPU check on digits with residual adds and a concatenation."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lit_methods import ImageClassifier
from lit_methods.compression import OTOv2
from lit_methods.datamodules import DigitsDataModule
from lit_methods.pruning.structured import channel_groups, count_parameters
from tests.compression.nets import TinyResNet
from tests.helpers import cpu_trainer

STEPS_PER_EPOCH = 22  # 1347 training digits in batches of 64


def accuracy(net: torch.nn.Module, datamodule: DigitsDataModule) -> float:
    with torch.no_grad():
        logits = net(datamodule.to_inputs(datamodule.test_images))
    return float((logits.argmax(1) == datamodule.test_labels).float().mean())


@pytest.fixture(scope="module")
def trained() -> tuple[OTOv2, DigitsDataModule]:
    """DHSPG at target 0.5: partition after 2 epochs, projection after 3, 10 epochs, constant lr."""
    L.seed_everything(0)
    datamodule = DigitsDataModule(batch_size=64)
    model = OTOv2(
        TinyResNet(width=16, blocks=2, concat=True),
        in_channels=1,
        image_size=(8, 8),
        lr=0.05,
        weight_decay=1e-4,
        lr_schedule="constant",
        partition_step=2 * STEPS_PER_EPOCH,
        projection_step=3 * STEPS_PER_EPOCH,
        lmbda=0.5,
        epsilon=0.95,
    )
    cpu_trainer(max_epochs=10, limit_val_batches=0).fit(model, datamodule=datamodule)
    datamodule.setup("test")
    return model.eval(), datamodule


@pytest.mark.slow
def test_dhspg_reaches_the_target_with_exact_zero_groups(trained) -> None:
    """Card checks 1, 2 and 5; a no-op optimizer (plain SGD, test below) gives no zero group."""
    model, datamodule = trained
    assert model.group_sparsity() >= 0.45
    params = dict(model.backbone.named_parameters())
    for group, zero in zip(model.groups, model.zero_masks().values()):
        for name, idxs in group.out_slices:
            assert torch.all(params[name][idxs[zero]] == 0.0)  # exactly, every slice of every zero ZIG
    assert accuracy(model, datamodule) > 0.80


@pytest.mark.slow
def test_slim_model_computes_the_dense_logits_with_fewer_parameters(trained) -> None:
    """Card check 3: built automatically from the dependency graph."""
    model, datamodule = trained
    slim = model.export_compressed()
    images = datamodule.to_inputs(datamodule.test_images)
    with torch.no_grad():
        assert (slim(images) - model(images)).abs().max() < 1e-5
    assert count_parameters(slim) < 0.6 * count_parameters(model.backbone)


def test_groups_couple_both_sides_of_a_residual_add() -> None:
    """Card check 4: the torch-pruning group of the stem holds every producer of the residual stream, which we write
    down by hand for this net (stem conv and BN, and the first block's second conv and BN feeding the add)."""
    net = TinyResNet(width=8, blocks=2, concat=True)
    groups = {g.root: g for g in channel_groups(net, torch.zeros(1, 1, 8, 8), ["fc"])}
    residual = next(g for g in groups.values() if "stem.0" in g.layers)
    producers = {name.rsplit(".", 1)[0] for name, _ in residual.out_slices}
    assert producers == {"stem.0", "stem.1", "blocks.0.conv2", "blocks.0.bn2"}
    assert residual.norms == ["stem.1", "blocks.0.bn2"] or set(residual.norms) == {"stem.1", "blocks.0.bn2"}
    assert {"blocks.0.conv1", "blocks.1.conv1", "blocks.1.shortcut.0"} <= set(residual.layers)  # the consumers
    strided = next(g for g in groups.values() if "blocks.1.shortcut.0" in {n.rsplit(".", 1)[0] for n, _ in g.out_slices})
    assert {n.rsplit(".", 1)[0] for n, _ in strided.out_slices} == {
        "blocks.1.conv2", "blocks.1.bn2", "blocks.1.shortcut.0", "blocks.1.shortcut.1"
    }
    assert all(len(g.out_slices) > 0 for g in groups.values())
    assert sum(g.num_channels for g in groups.values()) == 8 + 8 + 16 + 16 + 8  # stem, conv1 x2, add, side


@pytest.mark.slow
def test_plain_sgd_gives_no_exact_zero_group() -> None:
    """The control: the same net and data, SGD with weight decay for 3 epochs (the DHSPG run has zeros from its
    fourth epoch on)."""
    L.seed_everything(0)
    net = TinyResNet(width=16, blocks=2, concat=True)
    model = ImageClassifier(net, lr=0.05, weight_decay=1e-4, lr_schedule="constant")
    cpu_trainer(max_epochs=3, limit_val_batches=0).fit(model, datamodule=DigitsDataModule(batch_size=64))
    params = dict(net.named_parameters())
    for group in channel_groups(net, torch.zeros(1, 1, 8, 8), ["fc"]):
        assert (group.channel_norms(params) > 0).all()


def test_bad_settings_are_refused_at_construction() -> None:
    net = TinyResNet(width=4, blocks=2)
    for bad, match in (
        (dict(target_group_sparsity=1.0), "target_group_sparsity must lie in \\(0, 1\\), got 1.0"),
        (dict(projection_step=1, partition_step=5), "projection_step must be an int >= partition_step=5, got 1"),
        (dict(ignored_layers=["classifier"]), "'classifier'"),
        (dict(epsilon=1.0), "epsilon must lie in \\[0, 1\\), got 1.0"),
    ):
        with pytest.raises(ValueError, match=match):
            OTOv2(net, in_channels=1, image_size=(8, 8), **bad)
