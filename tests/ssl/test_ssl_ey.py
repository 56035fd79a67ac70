"""SSL-EY: the training loss is the official formula on the projections plus the detached probe, the projector's
shape, argument checks, and brief training on real digits improving kNN accuracy over the random init."""

from __future__ import annotations

import pytest
import torch

from lit_methods.datamodules import DigitsDataModule
from lit_methods.nets import ConvNet
from lit_methods.ssl.ssl_ey import SSLEY
from tests.helpers import cpu_trainer, frozen_knn_accuracy
from tests.losses.test_eckhart_young import official_ssl_ey

DIGITS_EPOCHS = 25


def _net(width: int = 8) -> ConvNet:
    return ConvNet(
        num_classes=10,
        in_channels=1,
        depth=2,
        width=width,
        norm="batchnorm",
        image_size=8,
    )


def test_training_loss_is_the_official_ssl_ey_loss_of_the_projections_plus_the_probe():
    torch.manual_seed(0)
    model = SSLEY(_net(), projection_hidden_dim=16, projection_dim=8)
    g = torch.Generator().manual_seed(0)
    views, labels = (
        [torch.randn(6, 1, 8, 8, generator=g) for _ in range(2)],
        torch.randint(0, 10, (6,)),
    )
    total = model.training_step((views, labels), 0)
    features = [model(v) for v in views]
    probe_loss, _ = model.probe(features[0], labels)
    expected = official_ssl_ey(model.projector(features[0]), model.projector(features[1])) + probe_loss
    torch.testing.assert_close(total, expected)


def test_projector_follows_the_official_expander():
    model = SSLEY(_net(), projection_hidden_dim=16, projection_dim=8)
    linears = [m for m in model.projector if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(32, 16), (16, 8)]
    assert linears[-1].bias is None and isinstance(model.projector[1], torch.nn.BatchNorm1d)
    deep = SSLEY(_net(), projection_hidden_dim=16, projection_dim=8, projection_layers=3)
    assert [m.out_features for m in deep.projector if isinstance(m, torch.nn.Linear)] == [16, 16, 8]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"projection_dim": 0}, "projection_dim=0"),
        ({"projection_layers": 0}, "projection_layers=0"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SSLEY(_net(), **kwargs)


def _projection_covariance_eigenvalues(model: SSLEY, datamodule: DigitsDataModule) -> torch.Tensor:
    """Eigenvalues (descending) of the covariance of the projections of the 450 test digits (evaluation mode)."""
    model.eval()
    datamodule.setup("test")
    with torch.no_grad():
        z = model.projector(model(datamodule.to_inputs(datamodule.test_images))).double()
    z = z - z.mean(0)
    return torch.linalg.eigvalsh(z.T @ z / (len(z) - 1)).flip(0)


@pytest.mark.slow
def test_training_on_digits_spreads_the_projections_over_many_directions_without_collapse(tmp_path):
    """The card's no-collapse check, made scale-aware. SSL-EY's loss fixes the scale of the projections: at its
    optimum the covariance's eigenvalues are the views' canonical correlations (at most 1). So count the directions
    whose variance is above 0.1: a collapsed embedding has none, whatever its normalized effective rank (a ratio of
    eigenvalues, which did not separate a trained model from an untrained one: 11.6 against 10.4 of D = 64).
    Measured (seed 0, 25 epochs): untrained, total variance 0.002 and no direction above 0.1; trained, total
    variance 3.8, top eigenvalues 0.65/0.57/0.53/0.42/0.39 and 8 directions above 0.1 (of 19 above 0.01). The
    untrained network fails the check (no direction above 0.1), and so does any loss that lets the projections
    shrink. The eval-mode kNN accuracy is printed: digits are easy enough that a random ConvNet already scores about
    0.96, so it is not asserted."""
    torch.set_num_threads(1)  # a tiny net: threads only contend on a loaded machine
    torch.manual_seed(0)
    model = SSLEY(_net(width=32), projection_hidden_dim=64, projection_dim=64, lr=0.05, knn_k=20)
    untrained = _projection_covariance_eigenvalues(model, DigitsDataModule(seed=0))
    model.eval()
    before = frozen_knn_accuracy(model, DigitsDataModule(seed=0))
    model.train()
    trainer = cpu_trainer(
        max_epochs=DIGITS_EPOCHS, gradient_clip_val=1.0, limit_val_batches=0, default_root_dir=tmp_path
    )
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=128, fast_loader=False, ssl_views=2, num_workers=0))
    trained = _projection_covariance_eigenvalues(model, DigitsDataModule(seed=0))
    model.eval()
    after = frozen_knn_accuracy(model, DigitsDataModule(seed=0))
    print(
        f"SSL-EY digits, seed 0: kNN {before:.3f} -> {after:.3f}; directions with variance > 0.1: "
        f"{int((untrained > 0.1).sum())} -> {int((trained > 0.1).sum())}; top eigenvalues {trained[:5].tolist()}"
    )
    assert int((untrained > 0.1).sum()) == 0
    assert int((trained > 0.1).sum()) >= 5
    assert trained[0] < 1.5  # the loss bounds the scale: eigenvalues near the canonical correlations (<= 1)
