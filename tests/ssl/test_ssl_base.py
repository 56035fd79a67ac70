"""The self-supervised base and its first methods: views, gradients, optimizer groups, monitors."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from timm.optim import Lars

from lit_methods.datamodules import DigitsDataModule
from lit_methods.losses import BarlowTwinsLoss, NTXentLoss
from lit_methods.nets import ConvNet
from lit_methods.ssl import BarlowTwins, SimCLR
from tests.helpers import cpu_trainer, frozen_knn_accuracy

EPOCHS = 30  # SimCLR epochs of the real-data check


def _net() -> ConvNet:
    return ConvNet(num_classes=10, in_channels=1, depth=2, width=8, norm="batchnorm", image_size=8)


def _views_batch(n: int = 6):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(n, 1, 8, 8, generator=g), torch.randn(n, 1, 8, 8, generator=g)], torch.randint(0, 10, (n,))


def test_datamodule_gives_differently_augmented_views_of_the_same_images():
    dm = DigitsDataModule(batch_size=16, fast_loader=False, ssl_views=2, num_workers=0, seed=0)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    (view1, view2), labels = batch["views"], batch["targets"]
    assert set(batch) == {"views", "targets"}
    assert view1.shape == view2.shape == (16, 1, 8, 8) and labels.shape == (16,)
    assert not torch.equal(view1, view2)
    images = next(iter(dm.val_dataloader()))["inputs"]
    assert isinstance(images, torch.Tensor) and images.shape[1:] == (1, 8, 8)  # validation stays single-view
    fast = DigitsDataModule(batch_size=16, ssl_views=2, seed=0)  # fast path: views built on the batch's device
    fast.setup("fit")
    images = next(iter(fast.train_dataloader()))["inputs"]
    fast_view1, fast_view2 = fast.augment(images)
    assert fast_view1.shape == fast_view2.shape == (16, 1, 8, 8) and not torch.equal(fast_view1, fast_view2)
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


def test_named_and_positional_batches_give_the_same_steps(tmp_path):
    """Training on {"views", "targets"} equals training on a ([views], targets) tuple; a plain (images, labels)
    DataLoader validates as the datamodule's named batches do."""
    model = SimCLR(_net(), projection_hidden_dim=16, projection_dim=8)
    views, labels = _views_batch()
    torch.testing.assert_close(
        model.training_step({"views": views, "targets": labels}, 0), model.training_step((views, labels), 0)
    )
    g = torch.Generator().manual_seed(1)
    images, labels = torch.randn(24, 1, 8, 8, generator=g), torch.randint(0, 10, (24,), generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=8)
    (metrics,) = cpu_trainer(default_root_dir=tmp_path).validate(model, dataloaders=loader, verbose=False)
    model.eval()
    with torch.no_grad():
        _, logits = model.probe(model(images), labels)
    assert metrics["val/probe_acc"] == pytest.approx((logits.argmax(1) == labels).float().mean().item())


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
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=64, ssl_views=2, num_workers=0))  # on-batch views
    metrics = trainer.callback_metrics
    assert 0.1 < metrics["val/knn_acc"] <= 1.0 and 0.0 <= metrics["val/probe_acc"] <= 1.0
    assert torch.isfinite(metrics["train/ssl_loss"])


class RecordBeforeStep(Callback):
    """Parameters, gradients and learning rates just before the first optimizer step."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if not hasattr(self, "params"):
            named = [(n, p) for n, p in pl_module.named_parameters() if p.grad is not None]
            self.params = {n: p.detach().clone() for n, p in named}
            self.grads = {n: p.grad.detach().clone() for n, p in named}


def _naive_lars_step(model, name, p, g, lr, eta, weight_decay, clip) -> torch.Tensor:
    """One momentum-SGD step from zero momentum under the LARS rule written out by hand."""
    if name.startswith("probe."):
        return p - model.probe_lr * g  # the probe: plain SGD at its own rate, no decay, no adaptation
    owner = dict(model.named_modules())[name.rsplit(".", 1)[0]]
    if name.endswith("bias") or isinstance(owner, torch.nn.modules.batchnorm._BatchNorm):
        return p - lr * g  # biases and norm parameters: neither weight decay nor adaptation
    p_norm, g_norm = p.norm().item(), g.norm().item()
    trust = eta * p_norm / (g_norm + weight_decay * p_norm + 1e-8)
    if clip:
        trust = min(trust / lr, 1.0)
    return p - lr * trust * (g + weight_decay * p)


@pytest.mark.parametrize("weight_decay,clip", [(0.01, False), (0.01, True), (0.0, False)])
def test_lars_step_equals_a_naive_computation(tmp_path, weight_decay, clip):
    torch.manual_seed(0)
    model = SimCLR(
        _net(),
        projection_hidden_dim=16,
        projection_dim=8,
        # what `optimizer: {class_path: timm.optim.Lars, init_args: {...}}` builds from a config
        optimizer=lambda params: Lars(params, lr=0.4, momentum=0.9, trust_coeff=0.02, trust_clip=clip),
        probe_lr=0.05,
        weight_decay=weight_decay,
        warmup_steps=0,
    )
    record = RecordBeforeStep()
    trainer = cpu_trainer(max_steps=1, limit_val_batches=0, callbacks=[record], default_root_dir=tmp_path)
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=32, fast_loader=False, ssl_views=2, num_workers=0))
    after = dict(model.named_parameters())
    assert set(record.params) == {n for n, p in model.named_parameters() if p.requires_grad}
    for name, before in record.params.items():
        expected = _naive_lars_step(model, name, before, record.grads[name], 0.4, 0.02, weight_decay, clip)
        torch.testing.assert_close(after[name].detach(), expected, rtol=1e-5, atol=1e-7, msg=name)
    # the adaptation is real here: a weight's LARS step differs from the plain SGD step
    name = "backbone.features.0.weight"
    plain = record.params[name] - 0.4 * (record.grads[name] + weight_decay * record.params[name])
    assert not torch.allclose(after[name].detach(), plain)
    assert isinstance(trainer.optimizers[0], Lars)


def test_bad_optimizer_arguments_are_rejected():
    with pytest.raises(ValueError, match="optimizer must be a callable.*timm.optim.Lars.*got 'lars'"):
        SimCLR(_net(), optimizer="lars")
    with pytest.raises(ValueError, match="probe_lr must be > 0, got 0.0"):
        SimCLR(_net(), probe_lr=0.0)


@pytest.mark.slow
def test_simclr_features_beat_random_init_on_digits(tmp_path):
    """Real-data check: 30 SimCLR epochs on digits lift the kNN accuracy of a small ConvNet above its random init
    (seed 0; random init is already strong here, ~0.96, since kNN on raw 8x8 digits is ~0.98)."""

    def convnet():
        torch.manual_seed(0)
        return ConvNet(num_classes=10, in_channels=1, depth=2, width=32, norm="batchnorm", image_size=8)

    torch.set_num_threads(1)  # tiny tensors: extra threads only contend on a loaded machine
    dm = DigitsDataModule(batch_size=128, ssl_views=2, ssl_global_scale=(0.3, 1.0), num_workers=0, seed=0)
    dm.setup("fit")
    dm.setup("test")
    random_init = frozen_knn_accuracy(convnet(), dm)
    torch.manual_seed(0)
    model = SimCLR(convnet(), projection_hidden_dim=64, projection_dim=32, lr=0.3, temperature=0.2)
    trainer = cpu_trainer(max_epochs=EPOCHS, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    trained = frozen_knn_accuracy(model.backbone, dm)
    print(f"SimCLR digits kNN top-1 (k=20, T=0.1): random init {random_init:.3f}, after {EPOCHS} epochs {trained:.3f}")
    assert trained > random_init
