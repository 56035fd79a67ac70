"""ErrorFeedbackDP: DiceSGD and DPSGD-GC against plain gradients, opacus' clipping and accountant, the clipping-bias
check of the card, budget and resume, and DDP equality."""

from __future__ import annotations

import copy
import math
import os

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lit_methods.callbacks.error_feedback_dp import ErrorFeedbackDP
from lit_methods.datamodules import DigitsDataModule
from lit_methods import ImageClassifier
from lit_methods.nets import ConvNet
from tests.ddp_helpers import run_distributed
from tests.helpers import cpu_trainer

opacus = pytest.importorskip("opacus")


def tiny_net(norm: str = "groupnorm") -> ConvNet:
    return ConvNet(num_classes=10, in_channels=1, depth=2, width=8, norm=norm, image_size=8)


def make_trainer(tmp_path, **kwargs) -> L.Trainer:
    defaults = {"default_root_dir": tmp_path, "deterministic": True, "num_sanity_val_steps": 0, "limit_val_batches": 0}
    return cpu_trainer(**(defaults | kwargs))


class RecordGradients(Callback):
    """Records the batch each step and the gradients seen in ``on_before_optimizer_step``.

    With ``ordinary=True`` the gradients recorded are the ordinary (non-private) batch gradients of the step's
    parameters, computed afresh: in one process the book-keeping backward leaves ``p.grad`` unset. They are taken in
    eval mode (which the DP hooks ignore); the tiny GroupNorm ConvNet has no dropout, so eval and train agree.
    """

    def __init__(self, ordinary: bool = False) -> None:
        self.ordinary = ordinary
        self.batches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.gradients: list[dict[str, torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append((batch["inputs"].clone(), batch["targets"].clone()))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        names, params = zip(*pl_module.named_parameters())
        if self.ordinary:
            images, targets = self.batches[-1]
            pl_module.eval()
            with torch.enable_grad():
                gradients = torch.autograd.grad(pl_module.compute_loss(pl_module(images), targets), params)
            pl_module.train()
        else:
            gradients = [p.grad.clone() for p in params]
        self.gradients.append(dict(zip(names, gradients)))


def fit_recording(tmp_path, dp: ErrorFeedbackDP, steps: int, batch_size: int = 32):
    """Fit a GroupNorm ConvNet on digits for ``steps`` steps; returns (ordinary grads, privatized grads, model)."""
    torch.manual_seed(0)
    model = ImageClassifier(tiny_net(), lr=0.05, lr_schedule="constant")
    before, after = RecordGradients(ordinary=True), RecordGradients()
    data = DigitsDataModule(batch_size=batch_size, seed=1)
    make_trainer(tmp_path, limit_train_batches=steps, callbacks=[before, dp, after]).fit(model, datamodule=data)
    return before, after, model


def test_noise_zero_and_infinite_clip_give_the_ordinary_gradient_and_an_empty_buffer(
    tmp_path,
):
    dp = ErrorFeedbackDP(clip_norm=math.inf, noise_multiplier=0.0, error_feedback=True)
    before, after, _ = fit_recording(tmp_path, dp, steps=3)
    assert len(before.gradients) == len(after.gradients) == 3
    for ordinary, private in zip(before.gradients, after.gradients):
        for name in ordinary:
            torch.testing.assert_close(private[name], ordinary[name], rtol=1e-4, atol=1e-6, msg=name)
    assert dp.error and all(e.abs().max() < 1e-6 for e in dp.error.values())


def test_clipped_gradient_matches_opacus_dp_optimizer(tmp_path):
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    clip = 0.05
    torch.manual_seed(0)
    reference = copy.deepcopy(ImageClassifier(tiny_net()).backbone)  # same init as fit_recording's model
    dp = ErrorFeedbackDP(clip_norm=clip, noise_multiplier=0.0, error_feedback=False)
    before, after, _ = fit_recording(tmp_path, dp, steps=1)
    images, targets = before.batches[0]
    grad_sample_module = GradSampleModule(reference)
    optimizer = DPOptimizer(
        torch.optim.SGD(grad_sample_module.parameters(), lr=0.1),
        noise_multiplier=0.0,
        max_grad_norm=clip,
        expected_batch_size=len(images),
    )
    F.cross_entropy(grad_sample_module(images), targets).backward()
    optimizer.pre_step()
    per_sample_norms = torch.stack([p.grad_sample.flatten(1).norm(dim=1) for p in reference.parameters()]).norm(dim=0)
    assert (per_sample_norms > clip).all(), "the check needs every sample clipped"
    for name, param in reference.named_parameters():
        torch.testing.assert_close(after.gradients[0][f"backbone.{name}"], param.grad, rtol=1e-5, atol=1e-7)
    ordinary_norm = torch.cat([g.flatten() for g in before.gradients[0].values()]).norm()
    clipped_norm = torch.cat([g.flatten() for g in after.gradients[0].values()]).norm()
    assert clipped_norm <= clip < ordinary_norm


def test_epsilon_equals_opacus_rdp_accountant_and_calibration_spends_the_budget(tmp_path):
    from opacus.accountants import RDPAccountant
    from opacus.accountants.utils import get_noise_multiplier

    steps, delta = 6, 1e-5
    dp = ErrorFeedbackDP(clip_norm=1.0, noise_multiplier=1.1, delta=delta, error_feedback=False)
    trainer = make_trainer(tmp_path, limit_train_batches=steps, callbacks=[dp])
    trainer.fit(ImageClassifier(tiny_net()), datamodule=DigitsDataModule(batch_size=8, seed=1))
    rate = 8 / trainer.train_dataloader.sampler.num_samples  # q = B / N (the in-memory loader holds N samples)
    assert dp.sample_rate == rate
    accountant = RDPAccountant()
    for _ in range(steps):
        accountant.step(noise_multiplier=1.1, sample_rate=rate)
    assert dp.epsilon == pytest.approx(accountant.get_epsilon(delta), rel=1e-9)
    assert trainer.callback_metrics["dp/epsilon"].item() == pytest.approx(dp.epsilon, rel=1e-6)

    # DiceSGD's official-code heuristic over 8 planned epochs counts each step floor(ln 8) = 2 times and
    # calibrates the noise for the planned steps so that the budget is spent at the end.
    dice = ErrorFeedbackDP(
        clip_norm=1.0,
        target_epsilon=4.0,
        delta=delta,
        error_feedback=True,
        accountant="official_code_log_epochs_heuristic",
    )
    trainer = make_trainer(tmp_path, max_epochs=8, limit_train_batches=4, callbacks=[dice])
    trainer.fit(ImageClassifier(tiny_net()), datamodule=DigitsDataModule(batch_size=8, seed=1))
    expected_sigma = get_noise_multiplier(target_epsilon=4.0, target_delta=delta, sample_rate=rate, steps=32 * 2)
    assert dice.noise_multiplier == pytest.approx(expected_sigma)
    assert trainer.global_step == 32
    assert 4.0 - 0.05 <= dice.epsilon <= 4.0
    doubled, single = RDPAccountant(), RDPAccountant()
    doubled.history, single.history = (
        [(expected_sigma, rate, 64)],
        [(expected_sigma, rate, 32)],
    )
    assert dice.epsilon == pytest.approx(doubled.get_epsilon(delta), rel=1e-9)
    assert dice.epsilon_dpsgd == pytest.approx(single.get_epsilon(delta), rel=1e-9)
    assert trainer.callback_metrics["dp/epsilon_dpsgd"].item() == pytest.approx(dice.epsilon_dpsgd, rel=1e-6)


class MeanEstimator(L.LightningModule):
    """Per-sample loss 0.5 (x - a_i)^2: the optimum is the mean of the a_i."""

    def __init__(self) -> None:
        super().__init__()
        self.x = nn.Parameter(torch.zeros(1))

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        return self.x.expand(len(values))

    def compute_loss(self, outputs: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return 0.5 * (outputs - values).pow(2).mean()


@pytest.mark.parametrize("error_feedback", [False, True])
def test_skewed_mean_estimation_clipping_bias(error_feedback):
    # The card's check: 90 values at 0, 10 at 100 (optimum 10), full batch, no noise, C1 = C2 = 1, lr 0.1.
    values = torch.cat([torch.zeros(90), torch.full((10,), 100.0)])
    model = MeanEstimator()
    dp = ErrorFeedbackDP(clip_norm=1.0, noise_multiplier=0.0, error_feedback=error_feedback)
    for _ in range(2000):
        update = dp.privatized_gradients(model, values, values)
        with torch.no_grad():
            model.x -= 0.1 * update["x"]
    if error_feedback:
        assert model.x.item() == pytest.approx(10.0, abs=0.1)
    else:  # DPSGD-GC stops where the clipped gradients balance: 90 * min(x, 1) = 10 * 1
        assert model.x.item() == pytest.approx(1 / 9, abs=1e-3)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"clip_norm": 0.0, "noise_multiplier": 1.0}, "clip_norm.*0.0"),
        ({"clip_norm": -1.0, "noise_multiplier": 1.0}, "clip_norm.*-1.0"),
        (
            {"clip_norm": 1.0, "noise_multiplier": 1.0, "feedback_clip_norm": 0.0},
            "feedback_clip_norm.*0.0",
        ),
        ({"clip_norm": 1.0}, "exactly one.*noise_multiplier=None, target_epsilon=None"),
        (
            {"clip_norm": 1.0, "noise_multiplier": 1.0, "target_epsilon": 2.0},
            "exactly one.*noise_multiplier=1.0",
        ),
        ({"clip_norm": 1.0, "target_epsilon": 0.0}, "target_epsilon.*0.0"),
        ({"clip_norm": 1.0, "target_epsilon": -2.0}, "target_epsilon.*-2.0"),
        ({"clip_norm": 1.0, "noise_multiplier": -0.5}, "noise_multiplier.*-0.5"),
        (
            {"clip_norm": math.inf, "noise_multiplier": 1.0},
            "clip_norm=inf.*noise_multiplier=1.0",
        ),
        (
            {"clip_norm": 1.0, "feedback_clip_norm": math.inf, "target_epsilon": 1.0},
            "feedback_clip_norm=inf",
        ),
        ({"clip_norm": 1.0, "noise_multiplier": 1.0, "delta": 1.0}, "delta.*1.0"),
        ({"clip_norm": 1.0, "noise_multiplier": 1.0, "delta": 0.0}, "delta.*0.0"),
        (
            {"clip_norm": 1.0, "noise_multiplier": 1.0, "accountant_steps_per_step": 0},
            "accountant_steps_per_step.*0",
        ),
        (
            {"clip_norm": 1.0, "noise_multiplier": 1.0, "accountant_steps_per_step": 2},
            "accountant_steps_per_step=2 applies to.*official_code_log_epochs_heuristic",
        ),
        ({"clip_norm": 1.0, "noise_multiplier": 1.0, "accountant": "log"}, "accountant must be one of.*'log'"),
        (
            {"clip_norm": 1.0, "noise_multiplier": 1.0, "feedback_clip_norm": 0.5},
            r"feedback_clip_norm >= clip_norm.*feedback_clip_norm=0.5 < clip_norm=1.0",
        ),
    ],
)
def test_bad_arguments_are_rejected_naming_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ErrorFeedbackDP(**kwargs)


def test_batchnorm_is_refused_with_the_layer_named_and_groupnorm_suggested(tmp_path):
    dp = ErrorFeedbackDP(clip_norm=1.0, noise_multiplier=1.0)
    trainer = make_trainer(tmp_path, limit_train_batches=1, callbacks=[dp])
    with pytest.raises(TypeError, match=r"backbone\.features\.1.*BatchNorm2d.*norm=\"groupnorm\""):
        trainer.fit(
            ImageClassifier(tiny_net("batchnorm")),
            datamodule=DigitsDataModule(batch_size=32, seed=1),
        )


def _fit_dice(tmp_path, max_epochs: int, ckpt_path=None, callbacks=(), **dp_kwargs):
    torch.manual_seed(0)
    model = ImageClassifier(tiny_net(), lr=0.05)
    dp = ErrorFeedbackDP(clip_norm=0.5, seed=3, **({"noise_multiplier": 0.8} | dp_kwargs))
    trainer = make_trainer(
        tmp_path,
        max_epochs=max_epochs,
        limit_train_batches=4,
        callbacks=[dp, *callbacks],
        enable_checkpointing=True,
    )
    trainer.fit(
        model,
        datamodule=DigitsDataModule(batch_size=32, seed=1, cutout_size=2),
        ckpt_path=ckpt_path,
    )
    return model, dp, trainer


def test_resume_continues_exactly_and_keeps_the_spent_budget(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    straight, straight_dp, _ = _fit_dice(tmp_path, 2, callbacks=[checkpoint])
    resumed, resumed_dp, _ = _fit_dice(tmp_path, 2, ckpt_path=tmp_path / "ckpt" / "epoch=0-step=4.ckpt")
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    for name, error in straight_dp.error.items():
        assert torch.equal(error, resumed_dp.error[name]), name
    assert resumed_dp.steps == 8
    assert resumed_dp.epsilon == straight_dp.epsilon > 0


def test_training_stops_when_the_budget_is_spent_and_a_resume_does_not_reset_it(
    tmp_path,
):
    from opacus.accountants import RDPAccountant

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    _, spent, _ = _fit_dice(tmp_path, 1, callbacks=[checkpoint], noise_multiplier=None, target_epsilon=3.0)
    assert spent.steps == 4 and spent.epsilon <= 3.0
    # a longer resumed run must neither re-calibrate the noise nor restart the accountant
    _, dp, trainer = _fit_dice(
        tmp_path,
        5,
        ckpt_path=tmp_path / "ckpt" / "epoch=0-step=4.ckpt",
        noise_multiplier=None,
        target_epsilon=3.0,
    )
    assert dp.noise_multiplier == spent.noise_multiplier
    assert trainer.should_stop and trainer.global_step == dp.steps < 20
    assert dp.epsilon <= 3.0
    one_more = RDPAccountant()
    one_more.history = dp.history + [dp.next_step_entry()]
    assert one_more.get_epsilon(dp.delta) > 3.0


def _ddp_fit(world_size: int) -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    images, targets = torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,))
    dataset = TensorDataset(images, targets)
    # rank r holds samples r, r+2, ...: with 8 per rank the two ranks' batch k together hold samples 16k..16k+15,
    # which is the single process' batch k of 16
    rank = int(os.environ.get("RANK", "0"))
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False)
    loader = DataLoader(dataset, batch_size=16 // world_size, sampler=sampler)
    model = ImageClassifier(tiny_net(), lr=0.1, lr_schedule="constant")
    dp = ErrorFeedbackDP(clip_norm=0.05, noise_multiplier=1.0, seed=7)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=world_size,
        strategy="ddp" if world_size > 1 else "auto",
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[dp],
        use_distributed_sampler=False,
    )
    trainer.fit(model, train_dataloaders=loader)
    errors = {f"error.{n}": e.numpy() for n, e in dp.error.items()}  # numpy: tensors cannot leave a spawned process
    result = {n: p.detach().numpy().copy() for n, p in model.named_parameters()} | errors
    if world_size > 1:  # in the same group: ranks whose batches differ in size are refused, on every rank
        probe = ImageClassifier(tiny_net())
        unequal = ErrorFeedbackDP(clip_norm=1.0, noise_multiplier=0.0)
        unequal.attach_book_keeping(probe, parameter_gradients=True)
        size = 3 + rank
        probe.compute_loss(probe(images[:size]), targets[:size]).backward()
        try:
            unequal.privatized_gradients_from_backward(probe)
            result["unequal_batches_error"] = ""
        except RuntimeError as error:
            result["unequal_batches_error"] = str(error)
    return result


@pytest.mark.ddp
def test_ddp_update_equals_the_single_process_update_on_the_global_batch_and_unequal_batches_are_refused():
    single = _ddp_fit(1)
    ranks = run_distributed(_ddp_fit, 2)
    for rank in ranks:
        assert "batch sizes differ (total 7, sum of squares 25)" in rank.pop("unequal_batches_error")
    for name, value in single.items():
        np.testing.assert_allclose(ranks[0][name], value, rtol=1e-4, atol=1e-5, err_msg=name)
        np.testing.assert_array_equal(ranks[0][name], ranks[1][name], err_msg=name)
    assert any(np.abs(value).max() > 1e-3 for name, value in single.items() if name.startswith("error."))
