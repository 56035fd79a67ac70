"""ActivatingWhilePruning: IMP + AP selection against a naive reference, the sparsity schedule, exact zeros, rewinding,
exact resume, identical masks under DDP, and AP's effect on real digits."""

from __future__ import annotations

import functools

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from lit_methods.callbacks.activating_while_pruning import ActivatingWhilePruning
from lit_methods.datamodules import DigitsDataModule
from lit_methods import ImageClassifier
from lit_methods.pruning import CyclicWarmupStepLR
from tests.ddp_helpers import run_distributed
from tests.helpers import cpu_trainer


def mlp(hidden: int = 32) -> nn.Sequential:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10)
    )


def trainer(tmp_path, **kwargs) -> L.Trainer:
    return cpu_trainer(**({"default_root_dir": tmp_path, "deterministic": True, "limit_val_batches": 0} | kwargs))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(prune_rate=1.0), "prune_rate must lie in \\(0, 1\\), got 1.0"),
        (dict(prune_rate=-0.1), "prune_rate must lie in \\(0, 1\\), got -0.1"),
        (dict(prune_rate=0.2, ap_rate=0.3), "ap_rate must lie in \\[0, prune_rate=0.2\\], got 0.3"),
        (dict(ap_rate=-0.01), "ap_rate .* got -0.01"),
        (dict(epochs_per_cycle=0), "epochs_per_cycle must be an int >= 1, got 0"),
        (dict(epochs_per_cycle=-2), "epochs_per_cycle .* got -2"),
        (dict(num_prunings=-1), "num_prunings must be None or an int >= 0, got -1"),
    ],
)
def test_bad_arguments_are_rejected_with_their_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ActivatingWhilePruning(**kwargs)


class _NoPrunable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(10))

    def forward(self, x):
        return x.flatten(1)[:, :10] * self.scale


@pytest.mark.parametrize(
    ("backbone", "exclude", "match"),
    [
        (_NoPrunable(), None, "ImageClassifier has no prunable conv/linear layer"),
        (mlp(), ["backbone.2"], "exclude names 'backbone.2', which is not a conv/linear module"),
    ],
)
def test_a_model_without_prunable_layers_or_a_bad_exclude_is_rejected(tmp_path, backbone, exclude, match):
    model = ImageClassifier(backbone, num_classes=10)
    callback = ActivatingWhilePruning(epochs_per_cycle=1, exclude=exclude, track_dead_neurons=False)
    with pytest.raises(ValueError, match=match):
        trainer(tmp_path, max_epochs=1, callbacks=[callback]).fit(model, datamodule=DigitsDataModule(batch_size=64))


class _Inspector(Callback):
    """Placed before the pruning callback: sees the weights right after each optimizer step, before re-masking."""

    def __init__(self, pruner: ActivatingWhilePruning) -> None:
        self.pruner = pruner
        self.alive_per_epoch: list[int] = []
        self.rewound: list[bool] = []
        self.nonzero_masked = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.alive_per_epoch.append(sum(int(m.sum()) for m in self.pruner.masks.values()))
            masks, initial = self.pruner.masks, self.pruner.initial_params
            rewound = [torch.equal(p, initial[n] * masks.get(n, 1)) for n, p in pl_module.named_parameters()]
            self.rewound.append(all(rewound))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        (optimizer,) = trainer.optimizers
        for name, weight in self.pruner.prunable.items():
            pruned = self.pruner.masks[name] == 0
            self.nonzero_masked += int((weight[pruned] != 0).sum())
            self.nonzero_masked += int((optimizer.state[weight]["momentum_buffer"][pruned] != 0).sum())


@pytest.mark.parametrize("reset_optimizer_state", [True, False])
def test_sparsity_follows_the_schedule_masked_weights_stay_zero_and_survivors_rewind(tmp_path, reset_optimizer_state):
    torch.manual_seed(0)
    model = ImageClassifier(mlp(), num_classes=10, lr=0.1, momentum=0.9, weight_decay=5e-3, lr_schedule="constant")
    pruner = ActivatingWhilePruning(
        prune_rate=0.3, ap_rate=0.05, epochs_per_cycle=2, num_prunings=2, reset_optimizer_state=reset_optimizer_state
    )
    inspector = _Inspector(pruner)
    t = trainer(tmp_path, max_epochs=7, limit_train_batches=5, callbacks=[inspector, pruner])
    t.fit(model, datamodule=DigitsDataModule(batch_size=64))
    total = 64 * 32 + 32 * 32 + 32 * 10
    after_one = total - round(0.3 * total)
    after_two = after_one - round(0.3 * after_one)
    # cycles of 2 epochs, 2 prunings: epochs 0-1 dense, 2-3 after one, 4-6 after two (no third pruning)
    assert inspector.alive_per_epoch == [total] * 2 + [after_one] * 2 + [after_two] * 3
    assert inspector.rewound == [True, False, True, False, True, False, False]
    assert inspector.nonzero_masked == 0
    assert pruner.sparsity() == pytest.approx(1 - after_two / total)
    assert t.callback_metrics["ap/sparsity"] == pytest.approx(1 - after_two / total)
    assert 0.0 < t.callback_metrics["ap/dead_neuron_rate"] < 1.0


def _fit(tmp_path, max_epochs: int, ckpt_path=None, callbacks=()) -> tuple[ImageClassifier, ActivatingWhilePruning]:
    torch.manual_seed(0)
    model = ImageClassifier(mlp(), num_classes=10, lr=0.05, lr_schedule="constant")
    pruner = ActivatingWhilePruning(prune_rate=0.3, ap_rate=0.05, epochs_per_cycle=1)
    data = DigitsDataModule(batch_size=64, seed=1, cutout_size=2)
    t = trainer(tmp_path, max_epochs=max_epochs, callbacks=[pruner, *callbacks], enable_checkpointing=bool(callbacks))
    t.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return model, pruner


def test_resume_continues_exactly(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    straight, straight_pruner = _fit(tmp_path, 2, callbacks=[checkpoint])
    (first,) = sorted((tmp_path / "ckpt").glob("epoch=0-*.ckpt"))
    state = torch.load(first, weights_only=True)  # the callback's state is plain tensors and ints
    assert state["callbacks"]["ActivatingWhilePruning"]["prunings_done"] == 0
    resumed, resumed_pruner = _fit(tmp_path, 2, ckpt_path=first)
    assert straight_pruner.prunings_done == resumed_pruner.prunings_done == 1
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    for name, mask in straight_pruner.masks.items():
        assert torch.equal(mask, resumed_pruner.masks[name]), name


def _ddp_masks() -> dict[str, list]:
    torch.manual_seed(0)
    model = ImageClassifier(mlp(), num_classes=10, lr=0.05, lr_schedule="constant")
    pruner = ActivatingWhilePruning(prune_rate=0.3, ap_rate=0.05, epochs_per_cycle=1)
    t = cpu_trainer(
        devices=2, strategy="ddp", max_epochs=3, limit_train_batches=4, limit_val_batches=0, callbacks=[pruner]
    )
    t.fit(model, datamodule=DigitsDataModule(batch_size=32))
    return {
        "masks": {name: mask.tolist() for name, mask in pruner.masks.items()},
        "weights": {name: w.tolist() for name, w in pruner.prunable.items()},
        "alive": sum(int(m.sum()) for m in pruner.masks.values()),
        "dead_neuron_rate": float(t.callback_metrics["ap/dead_neuron_rate"]),
    }


@pytest.mark.ddp
def test_all_ranks_hold_identical_masks_under_ddp():
    rank0, rank1 = run_distributed(_ddp_masks)
    total = 64 * 32 + 32 * 32 + 32 * 10
    after_one = total - round(0.3 * total)
    assert rank0["alive"] == after_one - round(0.3 * after_one)
    assert rank0["masks"] == rank1["masks"]
    assert rank0["weights"] == rank1["weights"]
    assert rank0["dead_neuron_rate"] == rank1["dead_neuron_rate"]  # synced over both ranks' batches


def _prune_on_digits(seed: int, ap_rate: float) -> tuple[float, float, float]:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    model = ImageClassifier(net, num_classes=10, lr=0.1, nesterov=False, lr_schedule="constant")
    pruner = ActivatingWhilePruning(prune_rate=0.2, ap_rate=ap_rate, epochs_per_cycle=8)
    t = trainer(None, max_epochs=8 * 8, callbacks=[pruner])
    data = DigitsDataModule(batch_size=128, seed=seed)
    t.fit(model, datamodule=data)
    dead_neuron_rate = float(t.callback_metrics["ap/dead_neuron_rate"])
    (metrics,) = t.test(model, datamodule=data, verbose=False)
    return pruner.sparsity(), dead_neuron_rate, metrics["test/acc"]


@pytest.mark.slow
def test_ap_lowers_the_dead_neuron_rate_without_losing_accuracy_on_digits(in_tmp_dir):
    """MLP 64-256-256-10 on the 8x8 digits, 7 prunings of 20% (AP share 2%) every 8 epochs, 8 epochs at the final
    79% sparsity; seeds 0, 1, 2; DNR of the last epoch, test accuracy on the 450 held-out digits."""
    torch.set_num_threads(1)
    imp = [_prune_on_digits(seed, 0.0) for seed in range(3)]
    ap = [_prune_on_digits(seed, 0.02) for seed in range(3)]
    sparsity = 1 - 0.8**7
    assert all(abs(s - sparsity) < 1e-3 for s, _, _ in imp + ap)
    imp_dead, ap_dead = (sum(r[1] for r in runs) / 3 for runs in (imp, ap))
    imp_acc, ap_acc = (sum(r[2] for r in runs) / 3 for runs in (imp, ap))
    assert ap_dead < imp_dead, (imp, ap)
    assert ap_acc >= imp_acc - 0.01, (imp, ap)  # tolerance: 1 point, about 4 of the 450 test digits


def bn_mlp() -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))


class _CycleStart(Callback):
    """Placed before the pruning callback: the BN statistics at the end of epoch 0, the parameters at epoch 1's
    first batch (after the pruning step)."""

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == 0:
            self.running_mean = pl_module.backbone[2].running_mean.clone()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == 1 and batch_idx == 0:
            self.params = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
            self.running_mean_after = pl_module.backbone[2].running_mean.clone()


def test_reinit_gives_the_survivors_freshly_drawn_values_and_keeps_the_bn_statistics(tmp_path):
    """``rewind="reinit"`` (the official ``prune_type=reinit``): after the pruning step every parameter is a new draw
    (neither its value at the start of fit nor the trained one), masked where pruned, the new draw becomes the
    callback's initial parameters, and the BN running statistics are those of the end of the cycle. Checked to fail
    with ``rewind="init"`` (survivors back at their start-of-fit values)."""
    torch.manual_seed(0)
    model = ImageClassifier(bn_mlp(), num_classes=10, lr=0.05, lr_schedule="constant")
    at_start = {n: p.detach().clone() for n, p in model.named_parameters()}
    pruner = ActivatingWhilePruning(
        prune_rate=0.3, ap_rate=0.05, epochs_per_cycle=1, num_prunings=1, rewind="reinit", track_dead_neurons=False
    )
    probe = _CycleStart()
    trainer(tmp_path, max_epochs=2, limit_train_batches=3, callbacks=[probe, pruner]).fit(
        model, datamodule=DigitsDataModule(batch_size=64)
    )
    masks = pruner.masks
    for name, value in probe.params.items():
        torch.testing.assert_close(value, pruner.initial_params[name] * masks.get(name, 1), rtol=0, atol=0)
        if name.endswith("2.weight") or name.endswith("2.bias"):  # BN: reset to ones and zeros, its start values
            continue
        changed = (pruner.initial_params[name] != at_start[name]).float().mean()
        assert changed > 0.9, name
    torch.testing.assert_close(probe.running_mean_after, probe.running_mean, rtol=0, atol=0)
    assert not torch.equal(probe.running_mean, torch.zeros(32))


def test_batchnorm_weights_join_the_global_ranking_when_asked(tmp_path):
    """With ``prune_batchnorm_weights`` the BN scales are prunable like the official code's (every ``weight``):
    set to 1e-3, they are the smallest magnitudes and the first to go; without it they are never masked. Checked to
    fail when the option is ignored."""
    results = {}
    for flag in (False, True):
        torch.manual_seed(0)
        model = ImageClassifier(bn_mlp(), num_classes=10, lr=1e-4, lr_schedule="constant")
        with torch.no_grad():
            model.backbone[2].weight.fill_(1e-3)
        pruner = ActivatingWhilePruning(
            prune_rate=0.3, ap_rate=0.0, epochs_per_cycle=1, num_prunings=1, prune_batchnorm_weights=flag,
            track_dead_neurons=False,
        )
        trainer(tmp_path, max_epochs=2, limit_train_batches=2, callbacks=[pruner]).fit(
            model, datamodule=DigitsDataModule(batch_size=64)
        )
        results[flag] = (set(pruner.masks), model.backbone[2].weight.detach().clone(), pruner.masks)
    names, bn_weight, _ = results[False]
    assert "backbone.2.weight" not in names and (bn_weight != 0).all()
    names, bn_weight, masks = results[True]
    assert "backbone.2.weight" in names and (masks["backbone.2.weight"] == 0).all() and (bn_weight == 0).all()
    total = 64 * 32 + 32 + 32 * 10
    assert sum(int(m.sum()) for m in masks.values()) == total - round(0.3 * total)


def test_new_options_are_checked():
    with pytest.raises(ValueError, match="rewind must be one of \\('init', 'reinit'\\), got 'random'"):
        ActivatingWhilePruning(rewind="random")
    model = ImageClassifier(bn_mlp(), num_classes=10)
    callback = ActivatingWhilePruning(exclude=["backbone.2"], track_dead_neurons=False)
    with pytest.raises(ValueError, match="'backbone.2', which is not a conv/linear module"):
        callback.setup(None, model, "fit")
    ActivatingWhilePruning(exclude=["backbone.2"], prune_batchnorm_weights=True).setup(None, model, "fit")


class _RecordLR(Callback):
    def __init__(self) -> None:
        self.rates: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.rates.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_the_official_schedule_restarts_with_every_pruning_cycle(tmp_path):
    """Wired as the module's ``lr_scheduler`` next to the callback, the official schedule steps once per optimizer
    step and restarts its warm-up at each cycle: cycles of 2 epochs x 3 batches, warm-up over 4 steps, a drop at the
    cycle's second epoch."""
    torch.manual_seed(0)
    schedule = functools.partial(
        CyclicWarmupStepLR, steps_per_epoch=3, epochs_per_cycle=2, warmup_steps=4, drop_epochs=(1,), drop_factor=0.1
    )
    model = ImageClassifier(mlp(), num_classes=10, lr=0.1, lr_scheduler=schedule)
    pruner = ActivatingWhilePruning(prune_rate=0.2, ap_rate=0.02, epochs_per_cycle=2, track_dead_neurons=False)
    recorder = _RecordLR()
    trainer(tmp_path, max_epochs=6, limit_train_batches=3, callbacks=[recorder, pruner]).fit(
        model, datamodule=DigitsDataModule(batch_size=64)
    )
    one_cycle = [0.025, 0.05, 0.075, 0.01, 0.01, 0.01]
    assert recorder.rates == pytest.approx(one_cycle * 3)
    assert pruner.prunings_done == 2
