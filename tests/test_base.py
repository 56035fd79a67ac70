"""ImageClassifier: loss, metrics, optimizer groups, schedules, checkpoints and exact resume."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from lit_methods.datamodules import DigitsDataModule
from lit_methods import ImageClassifier
from lit_methods.base import parameter_groups
from lit_methods.nets import ConvNet
from tests.downstream_project.focal import FocalLossClassifier
from tests.helpers import cpu_trainer


def tiny_net(**kwargs) -> ConvNet:
    return ConvNet(num_classes=10, in_channels=1, depth=2, width=8, norm="batchnorm", image_size=8, **kwargs)


def trainer(tmp_path, **kwargs) -> L.Trainer:
    return cpu_trainer(default_root_dir=tmp_path, deterministic=True, **kwargs)


def test_loss_is_cross_entropy_with_label_smoothing():
    model = ImageClassifier(tiny_net(), label_smoothing=0.1)
    logits, targets = torch.randn(6, 10), torch.randint(0, 10, (6,))
    torch.testing.assert_close(model.compute_loss(logits, targets), F.cross_entropy(logits, targets, label_smoothing=0.1))
    soft = torch.softmax(torch.randn(6, 10), 1)
    torch.testing.assert_close(model.compute_loss(logits, soft), F.cross_entropy(logits, soft, label_smoothing=0.1))


def test_num_classes_is_read_from_the_backbone_and_checked_against_it():
    assert ImageClassifier(tiny_net()).num_classes == 10
    with pytest.raises(ValueError, match=r"\(10,\).*\(7,\)"):
        ImageClassifier(tiny_net(), num_classes=7, in_channels=1, image_size=(8, 8))
    with pytest.raises(ValueError, match="num_classes"):
        ImageClassifier(nn.Flatten())


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(label_smoothing=1.0), "label_smoothing.*1.0"),
        (dict(lr=0.0), "lr.*0.0"),
        (dict(weight_decay=-1.0), "weight_decay.*-1.0"),
        (dict(warmup_steps=1.5), "warmup_steps.*1.5"),
        (dict(warmup_steps=-3), "warmup_steps.*-3"),
    ],
)
def test_bad_arguments_are_rejected_with_their_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ImageClassifier(tiny_net(), **kwargs)


def test_norm_and_bias_parameters_can_skip_weight_decay():
    net = tiny_net()
    decay, no_decay = parameter_groups(net, 5e-4, exclude_norm_and_bias=True)
    assert all(p.ndim > 1 for p in decay["params"])
    norm_params = [p for m in net.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()]
    biases = [p for n, p in net.named_parameters() if n.endswith("bias")]
    assert {id(p) for p in no_decay["params"]} == {id(p) for p in norm_params + biases}
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 5e-4
    (everything,) = parameter_groups(net, 5e-4, exclude_norm_and_bias=False)
    assert len(everything["params"]) == len(list(net.parameters()))


def test_predict_step_returns_class_probabilities():
    torch.manual_seed(0)
    model = ImageClassifier(tiny_net()).eval()
    x = torch.randn(5, 1, 8, 8)
    probabilities = model.predict_step((x, torch.zeros(5, dtype=torch.long)), 0)
    torch.testing.assert_close(probabilities, model(x).softmax(1))
    torch.testing.assert_close(probabilities.sum(1), torch.ones(5))


def test_channels_last_gives_the_same_outputs():
    torch.manual_seed(0)
    net = tiny_net().eval()
    x = torch.randn(3, 1, 8, 8)
    expected = net(x)
    model = ImageClassifier(net, channels_last=True).eval()
    torch.testing.assert_close(model(x), expected)


class RecordLR(Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


@pytest.mark.parametrize("warmup", [0, 3])
def test_cosine_schedule_is_sized_from_the_trainer(tmp_path, warmup):
    record = RecordLR()
    data = DigitsDataModule(batch_size=64, seed=0)
    model = ImageClassifier(tiny_net(), lr=0.2, warmup_steps=warmup)
    trainer(tmp_path, max_epochs=2, callbacks=[record], limit_val_batches=0).fit(model, datamodule=data)
    total = len(record.lrs)
    assert total == 2 * math.ceil(len(data.train_labels) / 64)
    for step, lr in enumerate(record.lrs):
        if step < warmup:
            expected = 0.2 * (step + 1) / warmup
        else:
            expected = 0.2 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
        assert lr == pytest.approx(expected)


def test_onecycle_schedule_peaks_at_lr(tmp_path):
    record = RecordLR()
    model = ImageClassifier(tiny_net(), lr=0.3, lr_schedule="onecycle")
    trainer(tmp_path, max_epochs=2, callbacks=[record], limit_val_batches=0).fit(
        model, datamodule=DigitsDataModule(batch_size=64)
    )
    assert max(record.lrs) == pytest.approx(0.3, rel=0.05)
    assert record.lrs[0] < 0.3 / 10 and record.lrs[-1] < 0.3 / 100


def test_injected_optimizer_and_scheduler_are_used(tmp_path):
    record = RecordLR()
    model = ImageClassifier(
        tiny_net(),
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),
    )
    t = trainer(tmp_path, max_steps=3, callbacks=[record], limit_val_batches=0)
    t.fit(model, datamodule=DigitsDataModule(batch_size=64))
    assert isinstance(t.optimizers[0], torch.optim.AdamW)
    assert record.lrs == pytest.approx([1e-3, 5e-4, 2.5e-4])


def test_validation_metrics_equal_a_direct_computation(tmp_path):
    torch.manual_seed(0)
    data = DigitsDataModule(batch_size=50, val_split=200, seed=0)
    model = ImageClassifier(tiny_net())
    (metrics,) = trainer(tmp_path).validate(model, datamodule=data, verbose=False)
    data.setup("validate")
    model.eval()
    logits, labels = [], []
    with torch.no_grad():
        for batch in data.val_dataloader():
            batch = data.on_after_batch_transfer(batch, 0)
            images, y = batch["inputs"], batch["targets"]
            logits.append(model(images))
            labels.append(y)
    logits, labels = torch.cat(logits), torch.cat(labels)
    assert len(labels) == 200
    assert metrics["val/acc"] == pytest.approx((logits.argmax(1) == labels).float().mean().item())
    top5 = (logits.topk(5, dim=1).indices == labels[:, None]).any(1).float().mean().item()
    assert metrics["val/acc_top5"] == pytest.approx(top5)
    assert metrics["val/loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)


def test_plain_tuple_dataloaders_train_validate_and_predict(tmp_path):
    """A torchvision-style loader of (images, labels) tuples (no datamodule) works as the named batches do."""
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(40, 1, 8, 8, generator=g), torch.randint(0, 10, (40,), generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=16)
    model = ImageClassifier(tiny_net(), lr=0.05)
    before = [p.detach().clone() for p in model.parameters()]
    trainer(tmp_path, max_steps=2, limit_val_batches=0).fit(model, train_dataloaders=loader)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    (metrics,) = trainer(tmp_path).validate(model, dataloaders=loader, verbose=False)
    model.eval()
    with torch.no_grad():
        logits = model(images)
        named = model.shared_step({"inputs": images, "targets": labels}, "val")
        positional = model.shared_step((images, labels), "val")
    assert metrics["val/acc"] == pytest.approx((logits.argmax(1) == labels).float().mean().item())
    torch.testing.assert_close(named[0], positional[0])
    inputs_only = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images), batch_size=16)
    predictions = torch.cat(trainer(tmp_path).predict(model, dataloaders=inputs_only))
    torch.testing.assert_close(predictions, logits.softmax(1))


def test_training_on_real_digits_learns(tmp_path):
    torch.manual_seed(0)
    data = DigitsDataModule(batch_size=32, seed=0)
    model = ImageClassifier(tiny_net(), lr=0.05)
    t = trainer(tmp_path, max_epochs=4)
    t.fit(model, datamodule=data)
    (metrics,) = t.test(model, datamodule=data, verbose=False)
    assert metrics["test/acc"] > 0.85  # chance is 0.1


def _fit(tmp_path, max_epochs: int, ckpt_path=None, callbacks=()) -> ImageClassifier:
    torch.manual_seed(0)
    model = ImageClassifier(tiny_net(), lr=0.05)
    data = DigitsDataModule(batch_size=32, seed=1, cutout_size=2)
    t = trainer(tmp_path, max_epochs=max_epochs, callbacks=list(callbacks), enable_checkpointing=bool(callbacks))
    t.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return model


def test_resume_continues_exactly(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    straight = _fit(tmp_path, 2, callbacks=[checkpoint])
    resumed = _fit(tmp_path, 2, ckpt_path=tmp_path / "ckpt" / "epoch=0-step=43.ckpt")
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_load_from_checkpoint_restores_a_python_built_subclass(tmp_path):
    torch.manual_seed(0)
    model = FocalLossClassifier(tiny_net(), gamma=1.5, lr=0.07)
    t = trainer(tmp_path, max_steps=2, limit_val_batches=0, enable_checkpointing=True)
    t.fit(model, datamodule=DigitsDataModule(batch_size=32))
    t.save_checkpoint(tmp_path / "model.ckpt")
    restored = FocalLossClassifier.load_from_checkpoint(tmp_path / "model.ckpt", backbone=tiny_net())
    assert restored.gamma == 1.5 and restored.lr == 0.07
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(restored.eval()(x), model.eval()(x))
