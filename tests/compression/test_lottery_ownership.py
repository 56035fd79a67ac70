"""Lottery-ticket ownership (https://arxiv.org/abs/2111.00162): the card's CPU checks on digits."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lit_methods.compression import LotteryOwnership
from lit_methods.datamodules import DigitsDataModule
from lit_methods.nets import ConvNet
from lit_methods.pruning.ownership import (
    bit_match,
    connectivity,
    deterministic_signature,
    embed_signature,
    extract_signature,
    extreme_path_prune,
    qr_signature,
)
from lit_methods.pruning.rate_distortion import magnitude_mask
from tests.helpers import cpu_trainer


def random_mask(shape: tuple[int, ...], sparsity: float, seed: int) -> torch.Tensor:
    return magnitude_mask(torch.rand(shape, generator=torch.Generator().manual_seed(seed)), sparsity)


def test_embedding_keeps_the_count_and_writes_every_bit() -> None:
    """Card checks (a) and (b); a stub that leaves the mask alone matches about half the bits."""
    mask, weight = random_mask((32, 32, 3, 3), 0.7, 1), torch.randn(32, 32, 3, 3)
    code = deterministic_signature(16, seed=3)
    embedded, offset = embed_signature(mask, weight, code, torch.Generator().manual_seed(0))
    assert int(embedded.sum()) == int(mask.sum())
    assert bit_match(extract_signature(embedded, offset, 16), code) == 1.0
    assert torch.all((embedded == 0) | (embedded == 1))


@pytest.fixture(scope="module")
def owned() -> LotteryOwnership:
    """A 70%-sparse random ticket with a 16x16 code in its 32x32-channel conv, fine-tuned 2 epochs with masks."""
    L.seed_everything(0)
    net = ConvNet(num_classes=10, in_channels=1, depth=2, width=32, norm="batchnorm", image_size=8)
    model = LotteryOwnership(
        net, signature_layer="features.4", signature_size=16, sparsity=0.7, initial_mask="random", seed=0,
        in_channels=1, image_size=(8, 8), lr=0.05,
    )
    cpu_trainer(max_epochs=2, limit_val_batches=0).fit(model, datamodule=DigitsDataModule(batch_size=64))
    return model


@pytest.mark.slow
def test_signature_survives_masked_fine_tuning(owned) -> None:
    """Card check (c): the weights themselves (nonzero = kept) still carry every bit."""
    assert owned.verify() == 1.0
    weight = owned.weights()["features.4"]
    assert int((weight != 0).sum()) == int(owned.mask_dict()["features.4"].sum())


@pytest.mark.slow
def test_signature_survives_20_percent_more_magnitude_pruning(owned) -> None:
    """Card check (d): a removal attack pruning 20% of the remaining weights globally by magnitude."""
    weights = owned.weights()
    flat = torch.cat([w.detach().abs().flatten() for w in weights.values()])
    alive = flat[flat > 0]
    threshold = torch.kthvalue(alive, round(0.2 * len(alive))).values
    attacked = weights["features.4"].detach() * (weights["features.4"].detach().abs() > threshold)
    assert owned.verify(attacked) >= 0.9


@pytest.mark.slow
def test_an_unrelated_mask_matches_about_half(owned) -> None:
    """Card check (e): the same window of an independently drawn 70%-sparse mask."""
    other = random_mask((32, 32, 3, 3), 0.7, seed=123)
    assert 0.35 <= owned.verify(other) <= 0.65


def test_path_pruning_removes_at_most_one_kernel_per_layer_per_path() -> None:
    weights = [torch.randn(8, 3, 3, 3), torch.randn(8, 8, 3, 3), torch.randn(4, 8, 3, 3)]
    masks = [random_mask(tuple(w.shape), 0.3, seed) for seed, w in enumerate(weights)]
    pruned = extreme_path_prune(weights, masks, num_paths=5, generator=torch.Generator().manual_seed(0))
    for before, after in zip(masks, pruned):
        assert torch.all(after <= before)  # never re-enables
        removed = connectivity(before) & ~connectivity(after)
        assert 1 <= int(removed.sum()) <= 5
        assert torch.equal(after[removed[:, :, None, None].expand_as(after)].sum(), torch.tensor(0.0))


def test_qr_signature_embeds_when_qrcode_is_installed() -> None:
    pytest.importorskip("qrcode")
    code, payload = qr_signature("signature")
    assert code.shape == (29, 29) and not payload[:7, :7].any()
    mask, weight = random_mask((32, 32, 3, 3), 0.7, 2), torch.randn(32, 32, 3, 3)
    embedded, offset = embed_signature(mask, weight, code, torch.Generator().manual_seed(0), payload)
    assert int(embedded.sum()) == int(mask.sum())
    assert bit_match(extract_signature(embedded, offset, 29), code, payload) == 1.0


def test_bad_settings_are_refused() -> None:
    net = ConvNet(num_classes=10, in_channels=1, depth=2, width=8, norm="batchnorm", image_size=8)
    with pytest.raises(ValueError, match="'features.9' is not a conv layer"):
        LotteryOwnership(net, signature_layer="features.9")
    with pytest.raises(ValueError, match="fewer than the 16x16 code"):
        LotteryOwnership(net, signature_layer="features.4")
    with pytest.raises(ValueError, match="sparsity must lie in \\(0, 1\\), got 1.0"):
        LotteryOwnership(net, signature_layer="features.4", sparsity=1.0, signature_size=4)
