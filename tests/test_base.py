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


class _FeatureHeadClassifier(ImageClassifier):
    backbone_output = "features"


def test_a_feature_backbone_is_checked_in_eval_mode_against_num_features():
    """Methods with heads of their own check ``forward_features`` against ``num_features``; the check leaves batch
    norm statistics untouched (it runs in eval mode) and restores the training flag."""
    net = tiny_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    _FeatureHeadClassifier(net, in_channels=1, image_size=(8, 8))
    assert net.training
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    net.num_features = 3
    with pytest.raises(ValueError, match=r"forward_features maps 1x8x8 inputs to shape \(\d+,\).*num_features is 3"):
        _FeatureHeadClassifier(net, in_channels=1, image_size=(8, 8))


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


@pytest.mark.parametrize("schedule", ["onecycle", "cosine"])
def test_resuming_with_a_longer_run_continues_the_schedule_of_the_new_length(tmp_path, schedule):
    def run(max_steps, ckpt_path=None):
        record = RecordLR()
        torch.manual_seed(0)
        model = ImageClassifier(tiny_net(), lr=0.2, lr_schedule=schedule, warmup_steps=2)
        t = trainer(tmp_path, max_steps=max_steps, max_epochs=5, callbacks=[record], limit_val_batches=0)
        t.fit(model, datamodule=DigitsDataModule(batch_size=32, seed=0), ckpt_path=ckpt_path)
        return t, record.lrs

    short, _ = run(5)
    short.save_checkpoint(tmp_path / "short.ckpt")
    _, straight = run(10)
    with pytest.warns(UserWarning, match="rebuilt for this run's 10 steps and continues at step 5"):
        resumed_trainer, resumed = run(10, ckpt_path=tmp_path / "short.ckpt")
    assert resumed_trainer.global_step == 10
    assert resumed == pytest.approx(straight[5:])  # the 10-step schedule from step 5 on, never stuck at rate 0
    assert min(resumed) > 0
    resumed_trainer.save_checkpoint(tmp_path / "long.ckpt")
    assert torch.load(tmp_path / "long.ckpt", weights_only=True)["lr_schedule_steps"] == 10


@pytest.mark.parametrize(
    "trainer_args,match",
    [
        (dict(max_steps=0), "no optimizer step to size lr_schedule='onecycle'.*max_steps=0"),
        (dict(max_epochs=-1, max_steps=-1, max_time="00:00:00:05"), "set no end"),
    ],
)
def test_a_run_without_a_length_is_refused_before_training(tmp_path, trainer_args, match):
    model = ImageClassifier(tiny_net(), lr_schedule="onecycle")
    with pytest.raises(ValueError, match=match):
        trainer(tmp_path, **trainer_args).fit(model, datamodule=DigitsDataModule(batch_size=32))


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


# -- MethodBase: one optimizer/scheduler injection, parameter groups, key-mapped loading, model-owned normalization --
CLI_CPU = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.logger=false"]
CLI_DIGITS = ["--data=lit_methods.datamodules.DigitsDataModule", "--data.batch_size=32"]
CLI_CONVNET = ["--model.backbone=lit_methods.nets.ConvNet", "--model.backbone.width=8", "--model.backbone.depth=2"]
CLI_ADAMW_STEPLR = [
    "--model.optimizer=torch.optim.AdamW",
    "--model.optimizer.lr=0.001",
    "--model.lr_scheduler=torch.optim.lr_scheduler.StepLR",
    "--model.lr_scheduler.step_size=1",
    "--model.lr_scheduler.gamma=0.5",
]


def _is_bias_or_norm(model: nn.Module, name: str) -> bool:
    owner = dict(model.named_modules())[name.rsplit(".", 1)[0]]
    return name.endswith("bias") or isinstance(owner, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm))


@pytest.mark.parametrize(
    "model_args",
    [
        ["--model=lit_methods.ImageClassifier", "--model.exclude_norm_and_bias_from_weight_decay=true"],
        ["--model=lit_methods.ssl.SimCLR", "--model.projection_hidden_dim=16", "--model.projection_dim=8"],
        ["--model=lit_methods.ssl.LinearEvaluation", "--model.ssl_checkpoint=read_at_setup.ckpt"],
    ],
    ids=["ImageClassifier", "SimCLR", "LinearEvaluation"],
)
def test_the_same_optimizer_and_scheduler_class_paths_configure_every_method(model_args, in_tmp_dir):
    from lit_methods.cli import LitMethodsCLI

    cli = LitMethodsCLI(args=[*model_args, *CLI_CONVNET, *CLI_DIGITS, *CLI_CPU, *CLI_ADAMW_STEPLR], run=False)
    model = cli.model
    model.trainer = cli.trainer
    configured = model.configure_optimizers()
    optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]
    assert isinstance(optimizer, torch.optim.AdamW)
    assert isinstance(scheduler["scheduler"], torch.optim.lr_scheduler.StepLR) and scheduler["interval"] == "step"
    # every trainable parameter in exactly one group; the frozen ones (LinearEvaluation's backbone) in none
    grouped = [id(p) for group in optimizer.param_groups for p in group["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert sorted(grouped) == sorted(trainable) and len(grouped) == len(set(grouped))
    probe = {id(p) for p in getattr(model, "probe", nn.Identity()).parameters()}
    for group in optimizer.param_groups:
        is_probe = {id(p) for p in group["params"]} <= probe
        assert group["lr"] == (model.probe_lr if probe and is_probe else 0.001)  # the optimizer's lr, the probe's own
        named = [n for n, p in model.named_parameters() if any(p is q for q in group["params"])]
        if group["weight_decay"] == 0.0 and model.weight_decay > 0 and not is_probe:
            assert named and all(_is_bias_or_norm(model, n) for n in named), named  # the no-decay group
        elif not is_probe:
            assert not any(_is_bias_or_norm(model, n) for n in named) or model.weight_decay == 0.0, named
    scheduler["scheduler"].step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0005)


def test_no_decay_groups_and_modules_with_options_of_their_own():
    from lit_methods.ssl import SimSiam

    model = SimSiam(tiny_net(), projection_hidden_dim=8, projection_dim=8, prediction_hidden_dim=4, weight_decay=1e-3)
    groups = model.optimizer_parameters()
    names = {id(p): n for n, p in model.named_parameters()}
    by_names = [(sorted(names[id(p)] for p in g["params"]), g) for g in groups]
    # the rest of the method: weights decayed and LARS-adapted; biases and norm parameters neither
    rest_decay, rest_no_decay = by_names[0][1], by_names[1][1]
    assert (rest_decay["weight_decay"], rest_decay["always_adapt"]) == (1e-3, True)
    assert (rest_no_decay["weight_decay"], rest_no_decay["always_adapt"]) == (0.0, False)
    assert all(_is_bias_or_norm(model, name) for name in by_names[1][0])
    assert not any(_is_bias_or_norm(model, name) for name in by_names[0][0])
    assert all(not n.startswith(("predictor.", "probe.")) for n in by_names[0][0] + by_names[1][0])
    # the predictor: the same split, at a constant rate
    predictor = [g for names_, g in by_names if names_[0].startswith("predictor.")]
    assert [(g["weight_decay"], g["scheduled"]) for g in predictor] == [(1e-3, False), (0.0, False)]
    # the probe, last: one group at probe_lr, no decay, never adapted
    probe_names, probe = by_names[-1]
    assert probe_names == sorted(n for n, _ in model.probe.named_parameters(prefix="probe"))
    assert (probe["lr"], probe["weight_decay"], probe["always_adapt"]) == (model.probe_lr, 0.0, False)

    class Misnamed(ImageClassifier):
        def param_group_options(self):
            return {"head": {"lr": 0.1}}

    with pytest.raises(ValueError, match=r"param_group_options names \['head'\].*Misnamed"):
        Misnamed(tiny_net()).optimizer_parameters()

    class ConstantBackbone(ImageClassifier):
        def param_group_options(self):
            return {"backbone": {"scheduled": False}}

    model = ConstantBackbone(tiny_net(), lr_schedule="onecycle")
    with pytest.raises(ValueError, match="onecycle.*constant-rate groups"):
        model.make_lr_scheduler(model.make_default_optimizer(model.optimizer_parameters()))


class _Pair(nn.Module):
    """A backbone and a head, as the state dict of a method names them."""

    def __init__(self, head_name: str, head_out: int = 3) -> None:
        super().__init__()
        self.backbone = tiny_net()
        self.add_module(head_name, nn.Linear(4, head_out))


def test_key_mapped_loading_renames_prefixes_from_a_checkpoint_or_a_state_dict(tmp_path):
    from lit_methods.base import load_pretrained_weights

    torch.manual_seed(0)
    source = _Pair("projector")
    source.add_module("probe", nn.Linear(4, 10))  # not under any mapped prefix: not read
    torch.save({"state_dict": source.state_dict(), "epoch": 3}, tmp_path / "ssl.ckpt")
    torch.save(source.state_dict(), tmp_path / "plain.pt")
    key_map = {"backbone.": "backbone.", "projector.": "feature_head."}
    for given in (tmp_path / "ssl.ckpt", str(tmp_path / "plain.pt"), source.state_dict()):
        torch.manual_seed(1)
        target = _Pair("feature_head")
        target.add_module("cluster_head", nn.Linear(4, 3))
        untouched = target.cluster_head.weight.clone()
        load_pretrained_weights(target, given, key_map, strict=True)
        for key, value in source.backbone.state_dict().items():
            assert torch.equal(target.backbone.state_dict()[key], value), key
        assert torch.equal(target.feature_head.weight, source.projector.weight)
        assert torch.equal(target.cluster_head.weight, untouched)
    # a whole state dict into a submodule, keeping a fresh classifier
    torch.manual_seed(2)
    backbone = tiny_net()
    fresh_fc = backbone.fc.weight.clone()
    plain = {k: v for k, v in source.backbone.state_dict().items() if not k.startswith("fc.")}
    load_pretrained_weights(backbone, plain, {"": ""}, fresh_prefixes=("fc.",))
    assert torch.equal(backbone.features[0].weight, source.backbone.features[0].weight)
    assert torch.equal(backbone.fc.weight, fresh_fc)


def test_key_mapped_loading_names_missing_unexpected_and_misshaped_keys_and_the_file(tmp_path):
    from lit_methods.base import load_pretrained_weights

    key_map = {"backbone.": "backbone.", "projector.": "feature_head."}
    state = _Pair("projector").state_dict()
    path = tmp_path / "ssl.ckpt"
    torch.save({"state_dict": {k: v for k, v in state.items() if k != "projector.bias"}}, path)
    with pytest.raises(ValueError, match=r"_Pair does not match the weights in .*ssl.ckpt: missing \['feature_head.bias"):
        load_pretrained_weights(_Pair("feature_head"), path, key_map)
    with pytest.warns(UserWarning, match=r"missing \['feature_head.bias'\]"):
        load_pretrained_weights(_Pair("feature_head"), path, key_map, strict=False)
    extra = state | {"projector.scale": torch.ones(1)}
    with pytest.raises(ValueError, match=r"unexpected \['feature_head.scale'\]"):
        load_pretrained_weights(_Pair("feature_head"), extra, key_map, source_name="extra.pt")
    wide = _Pair("projector", head_out=5).state_dict()
    with pytest.raises(ValueError, match=r"shapes.*'feature_head.weight': \(\(3, 4\), \(5, 4\)\)"):
        load_pretrained_weights(_Pair("feature_head"), wide, key_map, strict=False)
    with pytest.raises(ValueError, match=r"holds no 'encoder.\*' weights"):
        load_pretrained_weights(_Pair("feature_head"), path, {"encoder.": "backbone."})
    with pytest.raises(FileNotFoundError, match="absent.ckpt"):
        load_pretrained_weights(_Pair("feature_head"), tmp_path / "absent.ckpt", key_map)
    model = ImageClassifier(tiny_net())
    with pytest.raises(FileNotFoundError, match="absent.ckpt"):
        model.load_pretrained_weights(tmp_path / "absent.ckpt", {"backbone.": "backbone."})


DIGITS_MEAN, DIGITS_STD = (0.3,), (0.4,)


@pytest.mark.parametrize("method", ["ImageClassifier", "SimCLR"])
def test_pixel_inputs_normalized_by_the_model_give_the_outputs_of_normalized_inputs(method):
    from lit_methods.ssl import SimCLR

    def build(**kwargs):
        torch.manual_seed(0)
        if method == "ImageClassifier":
            return ImageClassifier(tiny_net(), **kwargs)
        return SimCLR(tiny_net(), projection_hidden_dim=16, projection_dim=8, **kwargs)

    default = build(mean=DIGITS_MEAN, std=DIGITS_STD).eval()
    owning = build(mean=DIGITS_MEAN, std=DIGITS_STD, inputs_normalized=False).eval()
    assert default.normalize is None
    assert owning.state_dict().keys() == default.state_dict().keys()  # mean and std are not weights
    owning.load_state_dict(default.state_dict())
    pixels = torch.rand(5, 1, 8, 8)
    normalized = (pixels - 0.3) / 0.4
    with torch.no_grad():
        torch.testing.assert_close(owning(pixels), default(normalized))
        assert not torch.allclose(owning(pixels), default(pixels))
    with pytest.raises(ValueError, match="inputs_normalized=False needs the data's mean and std.*mean=None"):
        build(inputs_normalized=False)


def test_a_pixel_space_method_refuses_normalized_inputs():
    class PixelMethod(ImageClassifier):
        requires_pixel_inputs = True

    with pytest.raises(ValueError, match="PixelMethod works on \\[0, 1\\] pixels.*normalize=False"):
        PixelMethod(tiny_net())
    model = PixelMethod(tiny_net(), inputs_normalized=False, mean=DIGITS_MEAN, std=DIGITS_STD)
    assert isinstance(model.normalize, nn.Module)
