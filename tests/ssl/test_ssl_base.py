"""The self-supervised base and its first methods: views, gradients, optimizer groups, monitors."""

from __future__ import annotations

import pytest
import torch

from datamodules import DigitsDataModule
from lit_methods.losses import BarlowTwinsLoss, NTXentLoss
from lit_methods.nets import ConvNet
from lit_methods.ssl import BarlowTwins, SimCLR
from tests.helpers import cpu_trainer


def _net() -> ConvNet:
    return ConvNet(num_classes=10, in_channels=1, depth=2, width=8, norm="batchnorm", image_size=8)


def _views_batch(n: int = 6):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(n, 1, 8, 8, generator=g), torch.randn(n, 1, 8, 8, generator=g)], torch.randint(0, 10, (n,))


def test_datamodule_gives_differently_augmented_views_of_the_same_images():
    dm = DigitsDataModule(batch_size=16, fast_loader=False, ssl_views=2, num_workers=0, seed=0)
    dm.setup("fit")
    (view1, view2), labels = next(iter(dm.train_dataloader()))
    assert view1.shape == view2.shape == (16, 1, 8, 8) and labels.shape == (16,)
    assert not torch.equal(view1, view2)
    images, _ = next(iter(dm.val_dataloader()))
    assert isinstance(images, torch.Tensor) and images.shape[1:] == (1, 8, 8)  # validation stays single-view
    with pytest.raises(ValueError, match="ssl_views=2.*fast_loader=False"):
        DigitsDataModule(ssl_views=2)
    with pytest.raises(ValueError, match="ssl_views must be 0.*got 1"):
        DigitsDataModule(fast_loader=False, ssl_views=1)


@pytest.mark.parametrize("method,loss_fn", [(SimCLR, NTXentLoss(0.5)), (BarlowTwins, BarlowTwinsLoss())])
def test_training_loss_is_the_method_loss_plus_a_detached_probe(method, loss_fn):
    torch.manual_seed(0)
    model = method(_net(), projection_hidden_dim=16, projection_dim=8)
    views, labels = _views_batch()
    total = model.training_step((views, labels), 0)
    features = [model(v) for v in views]
    ssl = loss_fn(model.projector(features[0]), model.projector(features[1]))
    probe_loss, _ = model.probe(features[0], labels)
    torch.testing.assert_close(total, ssl + probe_loss)
    # the backbone learns from the method's loss only: the probe's loss sends it nothing
    backbone_grads = torch.autograd.grad(total, list(model.backbone.parameters()), retain_graph=True)
    ssl_grads = torch.autograd.grad(ssl, list(model.backbone.parameters()))
    for with_probe, without in zip(backbone_grads, ssl_grads):
        torch.testing.assert_close(with_probe, without)


def test_backbone_classifier_is_removed_and_a_single_view_batch_is_refused():
    model = SimCLR(_net(), projection_hidden_dim=16, projection_dim=8)
    assert isinstance(model.backbone.fc, torch.nn.Identity)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, model.num_features) == (2, 8 * 2 * 2)
    with pytest.raises(ValueError, match="ssl_views=2"):
        model.training_step((torch.randn(4, 1, 8, 8), torch.zeros(4, dtype=torch.long)), 0)


def test_optimizer_groups_and_schedule(tmp_path):
    model = SimCLR(_net(), projection_hidden_dim=16, projection_dim=8, lr=0.4, probe_lr=0.05, warmup_steps=2)
    trainer = cpu_trainer(max_steps=6, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=64, fast_loader=False, ssl_views=2, num_workers=0))
    groups = trainer.optimizers[0].param_groups
    probe = {id(p) for p in model.probe.parameters()}
    assert [id(p) for p in groups[-1]["params"]] == [id(p) for p in model.probe.parameters()]
    assert groups[-1]["initial_lr"] == 0.05 and groups[0]["initial_lr"] == 0.4
    assert all(id(p) not in probe for g in groups[:-1] for p in g["params"])
    assert {g["weight_decay"] for g in groups} == {model.weight_decay, 0.0}
    # warmup then cosine over the trainer's 6 steps: the rate has decayed to 0 at the end, for the probe too
    assert trainer.estimated_stepping_batches == 6 and all(g["lr"] == pytest.approx(0.0, abs=1e-12) for g in groups)


def test_fit_reports_the_online_monitors(tmp_path):
    torch.manual_seed(0)
    model = SimCLR(_net(), projection_hidden_dim=16, projection_dim=8, lr=0.1)
    trainer = cpu_trainer(max_epochs=2, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=64, fast_loader=False, ssl_views=2, num_workers=0))
    metrics = trainer.callback_metrics
    assert 0.1 < metrics["val/knn_acc"] <= 1.0 and 0.0 <= metrics["val/probe_acc"] <= 1.0
    assert torch.isfinite(metrics["train/ssl_loss"])
