"""AdaptivePrecision (AdaPT) callback: quantized weights on the logged formats' grids, fp32 masters updated with the
normalised straight-through gradient, switch timing, resume, bad arguments, and the digits accuracy check."""

from __future__ import annotations

import os

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lit_methods.callbacks.adaptive_precision import AdaptivePrecision
from lit_methods.datamodules import DigitsDataModule
from lit_methods import ImageClassifier
from tests.ddp_helpers import run_distributed
from tests.helpers import cpu_trainer


def mlp(hidden: int = 32) -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def make_trainer(tmp_path, **kwargs):
    defaults = {"default_root_dir": tmp_path, "deterministic": True, "num_sanity_val_steps": 0, "limit_val_batches": 0}
    return cpu_trainer(**(defaults | kwargs))


def classifier(hidden: int = 32, **kwargs) -> ImageClassifier:
    defaults = {"lr": 0.05, "momentum": 0.0, "nesterov": False, "weight_decay": 0.0, "lr_schedule": "constant"}
    return ImageClassifier(mlp(hidden), num_classes=10, **(defaults | kwargs))


class RecordSteps(Callback):
    """After AdaptivePrecision: the masters and their (normalised) gradients just before each step, and after it."""

    def __init__(self) -> None:
        self.before: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []
        self.after: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.before.append({n: (p.detach().clone(), p.grad.clone()) for n, p in pl_module.named_parameters()})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.after.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})


def test_masters_stay_fp32_get_the_normalised_gradient_and_layers_compute_on_the_logged_grid(tmp_path):
    torch.manual_seed(0)
    model = classifier()
    adapt = AdaptivePrecision(min_lookback=2, max_lookback=3, min_resolution=20, max_resolution=30)
    record = RecordSteps()
    make_trainer(tmp_path, limit_train_batches=8, callbacks=[adapt, record]).fit(
        model, datamodule=DigitsDataModule(batch_size=32, seed=1)
    )
    assert len(adapt.controller.switches) >= 4  # windows of 2-3 steps over 8 steps, two layers
    assert adapt.history[-1] == {name: adapt.controller.format(name) for name in adapt.layers}
    for before, after in zip(record.before, record.after):
        for name, (master, gradient) in before.items():
            assert master.dtype == torch.float32 and name.endswith("original")
            assert gradient.norm().item() == pytest.approx(1.0, abs=1e-5)
            torch.testing.assert_close(after[name], master - 0.05 * gradient, rtol=0, atol=1e-7)  # SGD on the master
    masters_on_grid = True
    for name, layer in adapt.layers.items():
        word_length, fraction_length = adapt.controller.format(name)
        master = layer.parametrizations.weight.original.detach()
        for training in (True, False):
            layer.train(training)
            integers = layer.weight.detach().double() * 2.0**fraction_length
            assert torch.equal(integers, integers.round()), name
            assert integers.abs().max() <= 2.0 ** (word_length - 1)
        masters_on_grid &= torch.equal(
            master.double() * 2**fraction_length, (master.double() * 2**fraction_length).round()
        )
    assert not masters_on_grid  # the fp32 masters keep their low-order bits


def test_inputs_and_outputs_are_quantized_to_the_layer_format(tmp_path):
    torch.manual_seed(0)
    model = classifier()
    adapt = AdaptivePrecision(initial_word_length=6, initial_fraction_length=2)
    make_trainer(tmp_path, max_steps=1, limit_train_batches=1, callbacks=[adapt]).fit(
        model, datamodule=DigitsDataModule(batch_size=16, seed=1)
    )
    seen = []
    layer = adapt.layers["backbone.1"]
    handle = layer.register_forward_hook(lambda m, i, o: seen.append((i[0], o)))
    model.eval()
    model(torch.randn(4, 1, 8, 8) * 3)
    handle.remove()
    word_length, fraction_length = adapt.controller.format("backbone.1")
    for tensor in seen[0]:
        integers = tensor.detach().double() * 2.0**fraction_length
        assert torch.equal(integers, integers.round()) and integers.abs().max() <= 2.0 ** (word_length - 1)


def test_epoch_mode_switches_only_at_epoch_ends(tmp_path):
    torch.manual_seed(0)
    adapt = AdaptivePrecision(min_lookback=1, max_lookback=2, switch_at="epoch")
    make_trainer(tmp_path, max_epochs=2, limit_train_batches=3, callbacks=[adapt]).fit(
        classifier(), datamodule=DigitsDataModule(batch_size=32, seed=1)
    )
    assert sorted({switch["step"] for switch in adapt.controller.switches}) == [3, 6]
    assert all(switch["window"] == 3 for switch in adapt.controller.switches)
    assert len(adapt.history) == 2


def _fit(tmp_path, max_epochs: int, ckpt_path=None, callbacks=()):
    torch.manual_seed(0)
    model = classifier(momentum=0.9, weight_decay=1e-4)
    adapt = AdaptivePrecision(min_lookback=2, max_lookback=3, min_resolution=20, max_resolution=30, seed=4)
    trainer = make_trainer(
        tmp_path, max_epochs=max_epochs, limit_train_batches=4, callbacks=[adapt, *callbacks], enable_checkpointing=True
    )
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=32, seed=1), ckpt_path=ckpt_path)
    return model, adapt


def test_resume_continues_exactly(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    straight, straight_adapt = _fit(tmp_path, 2, callbacks=[checkpoint])
    resumed, resumed_adapt = _fit(tmp_path, 2, ckpt_path=tmp_path / "ckpt" / "epoch=0-step=4.ckpt")
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert straight_adapt.controller.switches == resumed_adapt.controller.switches
    assert len(straight_adapt.controller.switches) >= 4
    assert straight_adapt.history == resumed_adapt.history
    for name in straight_adapt.layers:
        assert straight_adapt.controller.format(name) == resumed_adapt.controller.format(name)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"switch_at": "batch"}, "switch_at.*'batch'"),
        ({"push_up_strategy": "median"}, "push_up_strategy.*'median'"),
        ({"min_lookback": 50, "max_lookback": 10}, "50 and 10"),
        ({"initial_word_length": 40}, "word_length.*40"),
        ({"seed": -1}, "seed.*-1"),
        ({"lookback_momentum": 0.0}, "lookback_momentum.*0.0"),
    ],
)
def test_bad_arguments_are_rejected_naming_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdaptivePrecision(**kwargs)


def test_a_module_without_linear_or_conv_layers_is_refused(tmp_path):
    model = ImageClassifier(
        nn.Sequential(nn.Flatten(), nn.Unflatten(1, (64,)), nn.AdaptiveAvgPool1d(10)), num_classes=10
    )
    with pytest.raises(ValueError, match="no nn.Linear or nn.Conv"):
        make_trainer(tmp_path, max_steps=1, callbacks=[AdaptivePrecision()]).fit(
            model, datamodule=DigitsDataModule(batch_size=32, seed=1)
        )


def _ddp_fit(world_size: int) -> dict:
    torch.manual_seed(0)
    images, targets = torch.randn(128, 1, 8, 8), torch.randint(0, 10, (128,))
    dataset = TensorDataset(images, targets)
    # rank r holds samples r, r+2, ...: the two ranks' batch k together are the single process' batch k
    rank = int(os.environ.get("RANK", "0"))
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False)
    loader = DataLoader(dataset, batch_size=16 // world_size, sampler=sampler)
    model = classifier()
    # activations unquantized: their rounding noise is drawn per process, so only then the single process' loss is
    # the mean of the ranks' losses
    adapt = AdaptivePrecision(
        min_lookback=2,
        max_lookback=3,
        min_resolution=20,
        max_resolution=30,
        seed=1,
        quantize_inputs=False,
        quantize_outputs=False,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=world_size,
        strategy="ddp" if world_size > 1 else "auto",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[adapt],
        use_distributed_sampler=False,
    )
    trainer.fit(model, train_dataloaders=loader)
    model.eval()
    weights = {name: layer.weight.detach().numpy().copy() for name, layer in adapt.layers.items()}
    masters = {n: p.detach().numpy().copy() for n, p in model.named_parameters()}
    switches = [(s["step"], s["name"], s["after"], s["strategy"]) for s in adapt.controller.switches]
    return {"weights": weights, "masters": masters, "switches": switches, "losses": adapt.controller.loss_history}


@pytest.mark.ddp
def test_ddp_ranks_keep_identical_formats_and_weights_and_see_the_global_loss():
    single = _ddp_fit(1)
    ranks = run_distributed(_ddp_fit, 2)
    assert ranks[0]["switches"] == ranks[1]["switches"] and len(ranks[0]["switches"]) >= 4
    assert ranks[0]["losses"] == ranks[1]["losses"]
    # the first step's loss (identical weights everywhere) is the mean over the two ranks' half batches
    assert ranks[0]["losses"][0] == pytest.approx(single["losses"][0], rel=1e-5)
    for key in ("weights", "masters"):
        for name, value in ranks[0][key].items():
            np.testing.assert_array_equal(value, ranks[1][key][name], err_msg=name)


@pytest.mark.slow
def test_digits_accuracy_close_to_fp32_with_fewer_bits(tmp_path):
    """Card check (d, e): an MLP trained with AdaPT on digits (seed 0) reaches the fp32 accuracy within 3 points with
    mean word length < 32 and layers in different formats; forcing one fractional bit ruins it."""
    data = DigitsDataModule(batch_size=64, seed=0)
    accuracies = {}
    for name, callbacks in (("fp32", []), ("adapt", [AdaptivePrecision(min_lookback=5, max_lookback=20, seed=0)])):
        torch.manual_seed(0)
        model = classifier(hidden=64, lr=0.05, momentum=0.9, weight_decay=1e-4, lr_schedule="cosine")
        trainer = make_trainer(tmp_path, max_epochs=5, callbacks=callbacks)
        trainer.fit(model, datamodule=data)
        accuracies[name] = trainer.test(model, datamodule=data, verbose=False)[0]["test/acc"]
    adapt = callbacks[0]
    formats = [adapt.controller.format(name) for name in adapt.layers]
    print(f"fp32 {accuracies['fp32']:.4f} adapt {accuracies['adapt']:.4f} formats {adapt.history[-1]}")
    assert accuracies["adapt"] >= accuracies["fp32"] - 0.03
    assert adapt.mean_word_length() < 32 and len(set(formats)) >= 2
    for layer in adapt.layers.values():
        for quantizer in adapt._quantizers(layer):
            quantizer.set_format(quantizer.word_length, 1)
    ruined = trainer.test(model, datamodule=data, verbose=False)[0]["test/acc"]
    print(f"one fractional bit: {ruined:.4f}")
    assert ruined < accuracies["adapt"] - 0.2
