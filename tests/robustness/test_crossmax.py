"""CrossMax multi-resolution self-ensembles (arXiv:2408.05446): the aggregation's invariances and its resistance to
an outlier, the multi-resolution stack, and on digits the ensemble's robustness to attacks crafted on the head."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lit_methods.datamodules import DigitsDataModule
from lit_methods.nets import ConvNet
from lit_methods.robustness import CrossMax, MultiResolutionInput, crossmax, make_attack, robust_accuracy
from tests.helpers import cpu_trainer

PROBES = ("features.2", "features.6", "features.10")  # the ReLU outputs of the three ConvNet blocks


@pytest.fixture(autouse=True)
def one_thread() -> None:
    """Tiny nets on a shared CPU: one intra-op thread is faster than several (the conftest restores the count)."""
    torch.set_num_threads(1)


def test_crossmax_ignores_a_per_predictor_offset_and_follows_class_permutations() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 5, 7)
    out = crossmax(logits, k=3)
    torch.testing.assert_close(crossmax(logits + torch.randn(4, 5, 1) * 10, k=3), out)
    permutation = torch.randperm(7)
    torch.testing.assert_close(crossmax(logits[:, :, permutation], k=3), out[:, permutation])


def test_crossmax_resists_one_outlier_that_flips_the_mean() -> None:
    honest = torch.tensor([2.0, 0.0]).expand(4, 2)  # four predictors favour class 0
    outlier = torch.tensor([[0.0, 100.0]])  # one predictor shouts class 1
    logits = torch.cat([honest, outlier])[None]
    assert int(logits.mean(dim=1).argmax()) == 1
    assert int(crossmax(logits, k=3).argmax()) == 0


def high_frequency_energy(images: torch.Tensor, cutoff: int) -> float:
    spectrum = torch.fft.fftshift(torch.fft.fft2(images - images.mean(dim=(-2, -1), keepdim=True)), dim=(-2, -1))
    side = images.shape[-1]
    frequency = torch.arange(side) - side // 2
    far = (frequency[:, None].abs() > cutoff) | (frequency[None, :].abs() > cutoff)
    return float(spectrum.abs().pow(2)[..., far].sum())


def test_multi_resolution_stack_channels_range_frequency_and_randomness() -> None:
    torch.manual_seed(0)
    pixels = torch.rand(8, 3, 32, 32)
    stack = MultiResolutionInput()(pixels)
    assert stack.shape == (8, 12, 32, 32) and stack.min() >= 0 and stack.max() <= 1
    assert not torch.equal(stack, MultiResolutionInput()(pixels))
    torch.manual_seed(1)
    first = MultiResolutionInput()(pixels)
    torch.manual_seed(1)
    assert torch.equal(first, MultiResolutionInput()(pixels))
    clean = MultiResolutionInput(jitter=0, noise=0.0)(pixels)
    full, coarsest = clean[:, :3], clean[:, 9:]
    torch.testing.assert_close(full, pixels * 0 + full)  # shape check of the group split
    assert high_frequency_energy(coarsest, cutoff=4) < 0.05 * high_frequency_energy(full, cutoff=4)


def test_bad_arguments_raise_clear_errors() -> None:
    model = torch.nn.Linear(1, 1)
    with pytest.raises(ValueError, match="'PGDX'.*'PGD'"):
        make_attack("PGDX", model, eps=0.1)
    with pytest.raises(ValueError, match="eps.*1.5"):
        make_attack("PGD", model, eps=1.5)
    backbone = ConvNet(num_classes=10, in_channels=1, depth=3, width=8, image_size=8)
    kwargs = dict(num_classes=10, in_channels=1, image_size=(8, 8), resolutions=(8, 4, 2), mean=(0.3,), std=(0.4,))
    with pytest.raises(ValueError, match="'features.99'"):
        CrossMax(backbone, probe_layers=("features.99",), **kwargs)
    with pytest.raises(ValueError, match="'FGSMX'"):
        CrossMax(backbone, probe_layers=PROBES, eval_attacks=("FGSMX",), **kwargs)
    with pytest.raises(ValueError, match="eps.*-0.1"):
        CrossMax(backbone, probe_layers=PROBES, eps=-0.1, **kwargs)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[CrossMax, DigitsDataModule, Path]:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    datamodule = DigitsDataModule(batch_size=64, normalize=False, num_workers=0, crop_padding=0)
    model = CrossMax(
        ConvNet(num_classes=10, in_channels=1, depth=3, width=16, norm="batchnorm", image_size=8),
        num_classes=10, in_channels=1, image_size=(8, 8), mean=datamodule.mean, std=datamodule.std,
        probe_layers=PROBES, resolutions=(8, 4, 2), jitter=1, noise=0.1, crossmax_k=2, lr=0.05,
        eps=0.1, alpha=0.025, attack_steps=5, eval_attacks=("PGD", "EOTPGD"),
    )  # fmt: skip
    root = tmp_path_factory.mktemp("crossmax")
    cpu_trainer(max_epochs=8, default_root_dir=root, limit_val_batches=0).fit(model, datamodule=datamodule)
    return model.eval(), datamodule, root


class FinalHead(torch.nn.Module):
    """The backbone's own head of a CrossMax model (through the same stochastic stack), as an attack target."""

    def __init__(self, model: CrossMax) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.final_head(pixels)


@pytest.mark.slow
def test_ensemble_beats_the_final_head_under_pgd_crafted_on_the_head(trained) -> None:
    """PGD (eps 0.1, 10 steps) against the backbone's head alone; the CrossMax ensemble of the probes and the head
    keeps more accuracy. With the probes replaced by copies of the head (a no-op ensemble) both are equal, and an
    untrained model fails the clean-accuracy floor."""
    model, datamodule, _ = trained
    datamodule.setup("test")
    pixels, targets = datamodule.to_inputs(datamodule.test_images), datamodule.test_labels
    torch.manual_seed(0)
    with torch.no_grad():
        clean = float((model(pixels).argmax(1) == targets).float().mean())
    assert clean > 0.85, clean
    head_only = FinalHead(model)
    attack = make_attack("PGD", head_only, eps=0.1, alpha=0.025, steps=10)
    head_accuracy, adversarial = robust_accuracy(head_only, attack, pixels, targets)
    with torch.no_grad():
        ensemble_accuracy = float((model(adversarial).argmax(1) == targets).float().mean())
    assert ensemble_accuracy > head_accuracy + 0.02, (ensemble_accuracy, head_accuracy)


@pytest.mark.slow
def test_test_loop_writes_the_per_attack_table(trained) -> None:
    model, datamodule, root = trained
    trainer = cpu_trainer(default_root_dir=root, limit_test_batches=1)
    (metrics,) = trainer.test(model, datamodule=datamodule, verbose=False)
    table = (root / "robust_accuracy.md").read_text()
    assert "| PGD |" in table and "| EOTPGD |" in table
    for name in ("PGD", "EOTPGD"):
        assert 0.0 <= metrics[f"test/robust_acc/{name}"] < metrics["test/acc"]
