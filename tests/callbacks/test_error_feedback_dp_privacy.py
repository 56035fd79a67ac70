"""ErrorFeedbackDP's privacy plumbing: fresh noise (OS-entropy seed, the same on every DDP rank, an explicit seed
warns), the sample rate and the per-step noise std with a short last batch, and DiceSGD's accountants against
their bounds computed here independently."""

from __future__ import annotations

import math
import os

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_methods import ImageClassifier
from lit_methods.callbacks.error_feedback_dp import ErrorFeedbackDP
from lit_methods.datamodules import DigitsDataModule
from lit_methods.nets import ConvNet
from tests.ddp_helpers import init_gloo, run_distributed
from tests.helpers import cpu_trainer

opacus = pytest.importorskip("opacus")


class VectorMean(L.LightningModule):
    """Per-sample loss 0.5 ||x - a_i||^2 over a vector parameter ``x``; batches are ``(a, a)``."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.x = nn.Parameter(torch.zeros(dim))

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        return self.x.expand(len(values), -1)

    def compute_loss(self, outputs: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return 0.5 * (outputs - values).pow(2).sum(1).mean()

    def training_step(self, batch, batch_idx):
        return self.compute_loss(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def vector_loader(num_samples: int, batch_size: int, dim: int = 32) -> DataLoader:
    values = torch.randn(num_samples, dim, generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(values, values), batch_size=batch_size, shuffle=False)


def fit_vector_mean(dp: ErrorFeedbackDP, loader: DataLoader, max_epochs: int = 1) -> L.Trainer:
    trainer = cpu_trainer(max_epochs=max_epochs, callbacks=[dp], num_sanity_val_steps=0)
    trainer.fit(VectorMean(), train_dataloaders=loader)
    return trainer


# -- 1. fresh noise ---------------------------------------------------------------------------------------------
def _noisy_direction(dp: ErrorFeedbackDP) -> torch.Tensor:
    values = torch.zeros(4, 64)  # zero gradients: the direction is the noise alone
    return dp.privatized_gradients(VectorMean(64), values, values)["x"]


def test_default_runs_add_different_noise_and_an_explicit_seed_warns_and_repeats_it():
    first = _noisy_direction(ErrorFeedbackDP(clip_norm=1.0, noise_multiplier=1.0))
    second = _noisy_direction(ErrorFeedbackDP(clip_norm=1.0, noise_multiplier=1.0))
    assert first.abs().min() > 0 and not torch.equal(first, second)
    with pytest.warns(UserWarning, match=r"seed=5.*voids the privacy guarantee"):
        seeded = [ErrorFeedbackDP(clip_norm=1.0, noise_multiplier=1.0, seed=5) for _ in range(2)]
    assert torch.equal(_noisy_direction(seeded[0]), _noisy_direction(seeded[1]))


def _rank_noise() -> dict[str, np.ndarray]:
    init_gloo()
    rank = int(os.environ["RANK"])
    directions = {}
    for run in ("first", "second"):  # two default callbacks: each draws its own seed on rank 0
        dp = ErrorFeedbackDP(clip_norm=1.0, noise_multiplier=1.0, error_feedback=False)
        values = torch.full((4, 64), float(rank))  # different data per rank; the clipped sums are all-reduced
        directions[run] = dp.privatized_gradients(VectorMean(64), values, values)["x"].numpy()
    return directions


@pytest.mark.ddp
def test_ddp_ranks_add_identical_noise_from_a_seed_drawn_on_rank_zero():
    ranks = run_distributed(_rank_noise)
    for run in ("first", "second"):
        np.testing.assert_array_equal(ranks[0][run], ranks[1][run], err_msg=run)
    assert not np.array_equal(ranks[0]["first"], ranks[0]["second"])


# -- 2. sample rate and partial batches ---------------------------------------------------------------------------
class RecordDirections(Callback):
    def __init__(self) -> None:
        self.directions: list[torch.Tensor] = []
        self.batch_sizes: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batch_sizes.append(len(batch["inputs"]))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.directions.append(torch.cat([p.grad.flatten() for p in pl_module.parameters()]))


def test_sample_rate_is_b_over_n_and_the_noise_std_is_the_same_on_every_step_with_a_short_last_batch():
    batch, sigma, clip = 64, 40.0, 0.01
    torch.manual_seed(0)
    model = ImageClassifier(ConvNet(num_classes=10, in_channels=1, depth=2, width=8, norm="groupnorm", image_size=8))
    with pytest.warns(UserWarning, match="voids"):
        dp = ErrorFeedbackDP(clip_norm=clip, noise_multiplier=sigma, error_feedback=False, seed=0)
    recorder = RecordDirections()
    trainer = cpu_trainer(callbacks=[dp, recorder], num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=batch, seed=1))
    num_samples = trainer.train_dataloader.sampler.num_samples
    assert num_samples % batch != 0 and recorder.batch_sizes[-1] == num_samples % batch  # a short last batch
    assert dp.expected_batch_size == batch
    assert dp.sample_rate == batch / num_samples >= 1 / trainer.num_training_batches
    # The clipped mean has norm <= clip, so each coordinate is noise of std sigma * clip / B plus at most
    # clip / sqrt(P) of signal: the per-coordinate RMS over P ~ 1.9k coordinates estimates the std to ~2%.
    expected_std = sigma * clip / batch
    stds = torch.stack([d.pow(2).mean().sqrt() for d in recorder.directions]) / expected_std
    assert len(stds) == trainer.num_training_batches
    assert ((stds - 1).abs() < 0.08).all(), stds  # the 3-sample tail used to get 64/3 = 21x the noise


def test_opacus_poisson_loader_gives_its_rate_and_expected_batch_size():
    from opacus.data_loader import DPDataLoader

    loader = DPDataLoader.from_data_loader(vector_loader(64, 16), generator=torch.Generator().manual_seed(0))
    dp = ErrorFeedbackDP(clip_norm=1.0, noise_multiplier=1.0, error_feedback=False)
    fit_vector_mean(dp, loader)
    assert dp.sample_rate == loader.sample_rate == 0.25 and dp.expected_batch_size == 16
    assert dp.history == [(1.0, 0.25, dp.steps)] and dp.steps == len(loader)


def test_a_loader_without_a_batch_size_is_refused_naming_it():
    values = torch.zeros(8, 4)
    loader = DataLoader(TensorDataset(values, values), batch_sampler=[[0, 1], [2, 3, 4]])
    dp = ErrorFeedbackDP(clip_norm=1.0, noise_multiplier=1.0, error_feedback=False)
    with pytest.raises(TypeError, match="fixed-size training batches.*batch_size=None from DataLoader"):
        fit_vector_mean(dp, loader)


# -- 3. DiceSGD's accountants ------------------------------------------------------------------------------------
def bound_by_hand(sigma, batch, c1, c2, steps, delta) -> float:
    """The feedback-sensitivity bound: Gaussian steps (no amplification by sampling), the first of L2 sensitivity
    C1/B and std sigma C1/B, the later ones of sensitivity C1/B + 2 C2 and std sigma sqrt(C1^2 + C2^2) / B; a
    Gaussian step's RDP at order alpha is alpha D^2 / (2 s^2)."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import get_privacy_spent

    orders = np.asarray(RDPAccountant.DEFAULT_ALPHAS, dtype=float)
    first = orders / (2 * sigma**2)
    sensitivity, std = c1 / batch + 2 * c2, sigma * math.sqrt(c1**2 + c2**2) / batch
    later = (steps - 1) * orders * sensitivity**2 / (2 * std**2)
    epsilon, _ = get_privacy_spent(orders=orders, rdp=first + later, delta=delta)
    return float(epsilon)


@pytest.mark.parametrize("c1,c2", [(1.0, 1.0), (0.5, 2.0)])
def test_dicesgd_epsilon_equals_the_feedback_sensitivity_bound_computed_by_hand(c1, c2):
    sigma, delta = 30.0, 1e-5
    dp = ErrorFeedbackDP(clip_norm=c1, feedback_clip_norm=c2, noise_multiplier=sigma, delta=delta)
    fit_vector_mean(dp, vector_loader(64, 16))  # 4 steps, q = 16 / 64
    assert dp.steps == 4 and dp.sample_rate == 0.25
    assert dp.epsilon == pytest.approx(bound_by_hand(sigma, 16, c1, c2, 4, delta), rel=1e-9)
    # DiceSGD's bound grows with C2 at equal sigma, and always exceeds the DPSGD-GC bound of the same steps
    assert dp.epsilon > dp.epsilon_dpsgd


def test_target_epsilon_calibrates_dicesgd_noise_to_spend_the_budget():
    dp = ErrorFeedbackDP(clip_norm=1.0, target_epsilon=5.0, delta=1e-5)
    trainer = fit_vector_mean(dp, vector_loader(64, 16), max_epochs=2)
    assert trainer.global_step == dp.steps == 8
    assert 5.0 * 0.98 <= dp.epsilon <= 5.0
    assert dp.epsilon == pytest.approx(bound_by_hand(dp.noise_multiplier, 16, 1.0, 1.0, 8, 1e-5), rel=1e-9)


# -- 4. pruning masks (AP) -----------------------------------------------------------------------------------------
def _conv_net() -> ConvNet:
    return ConvNet(num_classes=10, in_channels=1, depth=2, width=8, norm="groupnorm", image_size=8)


@pytest.mark.parametrize("per_sample_method", ["vmap", "book_keeping"])
def test_a_live_gradient_above_c1_is_clipped_to_c1_over_the_live_weights_only(per_sample_method):
    torch.manual_seed(0)
    model = ImageClassifier(_conv_net())
    images, targets = torch.randn(1, 1, 8, 8), torch.tensor([3])
    generator = torch.Generator().manual_seed(1)
    masks = {
        name: (torch.rand(p.shape, generator=generator) < 0.3).float()  # 70% pruned, the linear layer included
        for name, p in model.named_parameters()
        if p.ndim > 1
    }
    gradients = torch.autograd.grad(model.compute_loss(model(images), targets), list(model.parameters()))
    gradients = dict(zip(dict(model.named_parameters()), gradients))
    live_norm = torch.cat([(g * masks.get(n, 1.0)).flatten() for n, g in gradients.items()]).norm().item()
    full_norm = torch.cat([g.flatten() for g in gradients.values()]).norm().item()
    clip = live_norm / 2
    assert full_norm > 1.2 * live_norm  # clipping over all coordinates would leave the live ones short of C1
    dp = ErrorFeedbackDP(
        clip_norm=clip, noise_multiplier=0.0, error_feedback=False, per_sample_method=per_sample_method
    )
    dp.weight_masks = masks
    if per_sample_method == "vmap":
        update = dp.privatized_gradients(model, images, targets)
    else:
        dp.attach_book_keeping(model)
        model.compute_loss(model(images), targets).backward()
        update = dp.privatized_gradients_from_backward(model)
    assert all(torch.all(update[n][m == 0] == 0) for n, m in masks.items())
    assert torch.cat([u.flatten() for u in update.values()]).norm().item() == pytest.approx(clip, rel=1e-5)


class RecordBuffer(Callback):
    """Listed after EF-DP and AP: the error buffer at each batch start, after EF-DP has read the masks."""

    def __init__(self, dp: ErrorFeedbackDP) -> None:
        self.dp = dp
        self.at_epoch_start: list[dict[str, torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:
            self.at_epoch_start.append({n: e.clone() for n, e in self.dp.error.items()})


def test_the_error_buffer_is_zero_on_pruned_weights_and_after_each_rewind():
    from lit_methods.callbacks import ActivatingWhilePruning

    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="voids"):
        dp = ErrorFeedbackDP(clip_norm=0.05, noise_multiplier=0.5, seed=3)
    pruning = ActivatingWhilePruning(prune_rate=0.5, ap_rate=0.05, epochs_per_cycle=1, track_dead_neurons=False)
    recorder = RecordBuffer(dp)
    trainer = cpu_trainer(
        max_epochs=3,
        limit_train_batches=3,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[dp, pruning, recorder],
    )
    trainer.fit(ImageClassifier(_conv_net(), lr=0.05), datamodule=DigitsDataModule(batch_size=32, seed=1))
    # epochs 1 and 2 start with a prune and rewind: the buffer starts empty (zero) after each
    assert [bool(buffer) for buffer in recorder.at_epoch_start] == [False, False, False]
    assert pruning.masks and dp.weight_masks.keys() == pruning.masks.keys()
    for name, mask in pruning.masks.items():
        assert torch.equal(dp.weight_masks[name], mask)
        assert torch.all(dp.error[name][mask == 0] == 0), name
        assert dp.error[name][mask == 1].abs().max() > 0, name


def test_a_checkpoint_of_another_accounting_is_refused():
    heuristic = ErrorFeedbackDP(clip_norm=1.0, noise_multiplier=1.0, accountant="official_code_log_epochs_heuristic")
    state = heuristic.state_dict()
    with pytest.raises(ValueError, match="accountant='official_code_log_epochs_heuristic'.*mix two analyses"):
        ErrorFeedbackDP(clip_norm=1.0, noise_multiplier=1.0).load_state_dict(state)
    old = {key: value for key, value in state.items() if key not in ("accountant", "dpsgd_history")}
    with pytest.raises(ValueError, match="predates the sample rate q = B / N"):
        ErrorFeedbackDP(clip_norm=1.0, noise_multiplier=1.0).load_state_dict(old)
