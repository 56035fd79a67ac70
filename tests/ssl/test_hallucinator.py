"""The Hallucinator: extrapolation and smoothing against direct computations, SimCLR off (bit-exact plain SimCLR) and
on (NT-Xent over the extra positives, gradients reaching the generator), and training on real digits (the paper's
gain over the plain method was not reproduced on CPU budgets: figures in the last test's docstring)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from lit_methods.datamodules import DigitsDataModule
from lit_methods.losses import NTXentLoss
from lit_methods.nets import ConvNet
from lit_methods.ssl.hallucinator import Hallucinator
from lit_methods.ssl.moco import MoCoV2
from lit_methods.ssl.simclr import SimCLR
from lit_methods.ssl.simsiam import SimSiam
from tests.helpers import cpu_trainer


def _net(width: int = 8) -> ConvNet:
    return ConvNet(num_classes=10, in_channels=1, depth=2, width=width, norm="batchnorm", image_size=8)


def _simclr(**kwargs) -> SimCLR:
    torch.manual_seed(0)
    return SimCLR(_net(), **({"projection_hidden_dim": 16, "projection_dim": 8} | kwargs))


def _views(n: int = 6) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(n, 1, 8, 8, generator=g), torch.randn(n, 1, 8, 8, generator=g)]


def _smoothing_by_hand(hallucinator: Hallucinator, inputs: torch.Tensor) -> torch.Tensor:
    first, second, third = (m for m in hallucinator.smoothing if isinstance(m, torch.nn.Linear))
    hidden = (inputs @ first.weight.T + first.bias).clamp_min(0)
    hidden = (hidden @ second.weight.T + second.bias).clamp_min(0)
    return hidden @ third.weight.T + third.bias


def test_extrapolation_and_smoothing_equal_a_direct_computation():
    torch.manual_seed(0)
    hallucinator = Hallucinator(4, hidden_dim=6)
    anchors, references = torch.randn(5, 4), torch.randn(5, 4)
    extrapolated = torch.tensor(
        [[(1 + 0.07) * float(a) - 0.07 * float(r) for a, r in zip(row_a, row_r)] for row_a, row_r in
         zip(anchors, references)]
    )
    torch.testing.assert_close(Hallucinator.extrapolate(anchors, references, 0.07), extrapolated)
    expected = _smoothing_by_hand(hallucinator, torch.cat([anchors, extrapolated], dim=1))
    torch.testing.assert_close(hallucinator(anchors, references, 0.07), expected)
    extended_anchors, extended_references = hallucinator.extend(anchors, references, 0.07)
    assert extended_anchors.shape == extended_references.shape == (10, 4)
    assert torch.equal(extended_anchors[:5], anchors)  # the anchors pass through unchanged
    torch.testing.assert_close(extended_anchors[5:], expected)
    assert torch.equal(extended_references, torch.cat([references, references]))
    assert len(list(hallucinator.parameters())) == 6 and hallucinator.smoothing[0].in_features == 8


@pytest.mark.parametrize("ratio", [0.01, 0.05, 0.1])
def test_extrapolation_moves_each_anchor_away_from_its_positive(ratio):
    g = torch.Generator().manual_seed(0)
    anchors = F.normalize(torch.randn(64, 16, generator=g), dim=1)
    references = F.normalize(anchors + 0.7 * torch.randn(64, 16, generator=g), dim=1)
    before = F.cosine_similarity(anchors, references)
    after = F.cosine_similarity(Hallucinator.extrapolate(anchors, references, ratio), references)
    assert (after < before).all()
    assert torch.equal(Hallucinator.extrapolate(anchors, references, 0.0), anchors)


def test_ratio_is_drawn_uniformly_below_max_ratio_from_the_seeded_generator():
    hallucinator = Hallucinator(4, max_ratio=0.2)
    torch.manual_seed(3)
    draws = torch.tensor([hallucinator.sample_ratio() for _ in range(4000)])
    assert draws.min() >= 0.0 and draws.max() < 0.2 and draws.max() > 0.19
    assert abs(draws.mean().item() - 0.1) < 0.005  # standard error 0.2 / sqrt(12 * 4000) = 0.0009
    torch.manual_seed(3)
    assert hallucinator.sample_ratio() == draws[0].item()


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="dim must be >= 1, got 0"):
        Hallucinator(0)
    with pytest.raises(ValueError, match="hidden_dim must be >= 1, got 0"):
        Hallucinator(4, hidden_dim=0)
    with pytest.raises(ValueError, match="max_ratio must be > 0, got -0.1"):
        Hallucinator(4, max_ratio=-0.1)
    with pytest.raises(ValueError, match=r"equal shape \(N, 4\), got \(3, 4\) and \(2, 4\)"):
        Hallucinator(4)(torch.randn(3, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match="hallucinator_max_ratio must be > 0, got 0.0"):
        _simclr(hallucinator=True, hallucinator_max_ratio=0.0)


def test_simclr_without_hallucinator_is_bit_exact_plain_simclr():
    default, off = _simclr(), _simclr(hallucinator=False)
    assert off.hallucinator is None and not any("hallucinator" in key for key in off.state_dict())
    assert default.state_dict().keys() == off.state_dict().keys()
    views = _views()
    rng_before = torch.get_rng_state()
    loss = off.ssl_loss(views, [off(v) for v in views])
    assert torch.equal(torch.get_rng_state(), rng_before)  # off, nothing is drawn
    reference = NTXentLoss(0.5)(default.projector(default(views[0])), default.projector(default(views[1])))
    assert torch.equal(loss, reference)
    grads = torch.autograd.grad(loss, list(off.parameters()), allow_unused=True)
    reference_grads = torch.autograd.grad(reference, list(default.parameters()), allow_unused=True)
    for ours, theirs in zip(grads, reference_grads):
        assert (ours is None and theirs is None) or torch.equal(ours, theirs)


def _naive_ntxent(left: torch.Tensor, right: torch.Tensor, temperature: float) -> torch.Tensor:
    """Row-by-row NT-Xent: row i of ``left`` and of ``right`` are positives; every other row is a negative."""
    rows = F.normalize(torch.cat([left, right]), dim=1)
    n = len(left)
    terms = []
    for i in range(2 * n):
        positive = i + n if i < n else i - n
        scores = [(rows[i] @ rows[j]) / temperature for j in range(2 * n) if j != i]
        log_denominator = torch.logsumexp(torch.stack(scores), dim=0)
        terms.append(log_denominator - (rows[i] @ rows[positive]) / temperature)
    return torch.stack(terms).mean()


def test_simclr_with_hallucinator_loss_and_gradients_equal_a_direct_computation(monkeypatch):
    model = _simclr(hallucinator=True)
    monkeypatch.setattr(model.hallucinator, "sample_ratio", lambda: 0.06)
    views = _views()
    features = [model(v) for v in views]
    loss = model.ssl_loss(views, features)

    z1, z2 = model.projector(features[0]), model.projector(features[1])
    extrapolated = 1.06 * z1 - 0.06 * z2
    hallucinated = _smoothing_by_hand(model.hallucinator, torch.cat([z1, extrapolated], dim=1))
    # [z1; h] against [z2; z2]: h's positive is z2, and each duplicated z2 is a negative of its copy (official code)
    expected = _naive_ntxent(torch.cat([z1, hallucinated]), torch.cat([z2, z2]), temperature=0.5)
    torch.testing.assert_close(loss, expected)
    assert not torch.allclose(loss, NTXentLoss(0.5)(z1, z2))

    params = list(model.hallucinator.parameters()) + list(model.projector.parameters())
    params += list(model.backbone.parameters())
    grads = torch.autograd.grad(loss, params, retain_graph=True)
    expected_grads = torch.autograd.grad(expected, params)
    for ours, theirs in zip(grads, expected_grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)
    assert all(g.abs().sum() > 0 for g in grads[: len(list(model.hallucinator.parameters()))])


def test_moco_with_hallucinator_adds_the_positives_and_enqueues_each_key_once(monkeypatch):
    """The queue receives ``[k1; k2]``, no duplicated rows; the former code (enqueueing the duplicated ``[k1; k1; k2;
    k2]``) fails both queue assertions (checked by running this test against it)."""
    torch.manual_seed(0)
    model = MoCoV2(_net(), projection_hidden_dim=16, projection_dim=8, queue_size=24, hallucinator=True)
    monkeypatch.setattr(model.hallucinator, "sample_ratio", lambda: 0.05)
    queue = model.queue.clone()
    views = _views()
    features = [model(v) for v in views]
    loss = model.ssl_loss(views, features)

    p1, p2 = model.projector(features[0]), model.projector(features[1])
    k1, k2 = model.keys(views[0]), model.keys(views[1])

    def info_nce(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        queries = F.normalize(queries, dim=1)
        logits = torch.cat([(queries * keys).sum(1, keepdim=True), queries @ queue.T], dim=1) / 0.2
        return F.cross_entropy(logits, torch.zeros(len(queries), dtype=torch.long))

    def hallucinate(anchor: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        return _smoothing_by_hand(model.hallucinator, torch.cat([anchor, 1.05 * anchor - 0.05 * reference], dim=1))

    expected = (
        info_nce(torch.cat([p1, hallucinate(p1, k2)]), torch.cat([k2, k2]))
        + info_nce(torch.cat([p2, hallucinate(p2, k1)]), torch.cat([k1, k1]))
    ) / 2
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(model.queue[:12], torch.cat([k1, k2]))
    torch.testing.assert_close(model.queue[12:], queue[12:])  # the older entries stay: 12 keys entered, not 24
    assert int(model.queue_pointer) == 12
    assert len(torch.unique(model.queue[:12], dim=0)) == 12  # no duplicated rows from the hallucinated views
    grads = torch.autograd.grad(loss, list(model.hallucinator.parameters()))
    assert all(g.abs().sum() > 0 for g in grads)


def test_simsiam_with_hallucinator_adds_the_positives_with_stop_gradient_targets(monkeypatch):
    torch.manual_seed(0)
    model = SimSiam(_net(), projection_hidden_dim=16, projection_dim=8, prediction_hidden_dim=4, hallucinator=True)
    monkeypatch.setattr(model.hallucinator, "sample_ratio", lambda: 0.05)
    views = _views()
    features = [model(v) for v in views]
    loss = model.ssl_loss(views, features)

    z1, z2 = model.projector(features[0]), model.projector(features[1])
    p1, p2 = model.predictor(z1), model.predictor(z2)

    def distance(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return -F.cosine_similarity(p, z.detach(), dim=1).mean()

    def hallucinate(anchor: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        return _smoothing_by_hand(model.hallucinator, torch.cat([anchor, 1.05 * anchor - 0.05 * reference], dim=1))

    expected = (
        distance(torch.cat([p1, hallucinate(p1, p2)]), torch.cat([z2, z2]))
        + distance(torch.cat([p2, hallucinate(p2, p1)]), torch.cat([z1, z1]))
    ) / 2
    torch.testing.assert_close(loss, expected)
    grads = torch.autograd.grad(loss, list(model.hallucinator.parameters()))
    assert all(g.abs().sum() > 0 for g in grads)


def test_hallucinator_is_trained_by_the_optimizer_and_unused_at_evaluation(tmp_path):
    model = _simclr(hallucinator=True, lr=0.1)
    start = [p.detach().clone() for p in model.hallucinator.parameters()]
    modes: list[bool] = []  # the module's training flag at each hallucinator call
    model.hallucinator.register_forward_hook(lambda module, *args: modes.append(module.training))
    trainer = cpu_trainer(max_steps=3, limit_val_batches=2, val_check_interval=2, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=32, fast_loader=False, ssl_views=2, num_workers=0))
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert all(id(p) in optimized for p in model.hallucinator.parameters())
    assert all(not torch.equal(a, b) for a, b in zip(start, model.hallucinator.parameters()))
    # called once per training step, never by the (sanity-check and step-2) validation passes
    assert modes == [True, True, True]
    assert "val/knn_acc" in trainer.callback_metrics


class RecordSSLLoss(Callback):
    """The logged SSL loss after every training batch."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(trainer.callback_metrics["train/ssl_loss"]))


@pytest.mark.slow
def test_simclr_with_hallucinator_trains_on_digits(tmp_path):
    """Seed 0, 3 epochs of SimCLR with the Hallucinator on the digits' training split (ConvNet-2 of width 16): the
    NT-Xent loss over the extended pairs falls: the mean of the last 3 steps is below 0.99x the first 3 (measured
    6.410 -> 6.236, 0.973x; with ``lr=1e-9``, checked by hand, 6.626 -> 6.630, 1.001x). Full batches only: the
    split's smaller last batch has fewer negatives and a lower loss by itself (0.967x at ``lr=1e-9`` with it). That
    the features improve over the random init is checked on Fashion-MNIST (``test_real_data_fashion_mnist.py``).

    The paper's claim, a gain over the plain method, is NOT asserted: it did not appear at the budgets a CPU test
    affords. Measured (this 2-core machine, 1 thread; digits split seed = torch seed = 0/1/2; ConvNet-2 width 16,
    projector 64 -> 32, batch 128, lr 0.3, SimCLR's crop scale (0.08, 1), 300 steps; weighted kNN of the frozen
    backbone features with 5 labelled images per class as the bank, mean of 20 banks; untrained 0.661):
    SimCLR 0.820/0.844/0.800, + Hallucinator 0.778/0.553/0.794, hallucinated views replaced by Gaussian noise
    0.839/0.844/0.806; MoCo v2 (queue 512) 0.825/0.826/0.759, + Hallucinator 0.808/0.801/0.766, noise
    0.845/0.845/0.800; MoCo v2 as the official recipe (asymmetric loss, constant momentum, here 0.99 for 600
    steps) 0.816/0.809/0.812, + Hallucinator 0.814/0.814/0.791. With the full training split as the bank (untrained
    0.949) every run lies in 0.90-0.97."""
    dm = DigitsDataModule(batch_size=128, fast_loader=False, ssl_views=2, num_workers=0, seed=0, drop_last=True)
    torch.manual_seed(0)
    model = SimCLR(_net(16), projection_hidden_dim=64, projection_dim=32, hallucinator=True, lr=0.3)
    record = RecordSSLLoss()
    torch.manual_seed(0)
    trainer = cpu_trainer(max_epochs=3, limit_val_batches=0, callbacks=[record], default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    first, last = sum(record.losses[:3]) / 3, sum(record.losses[-3:]) / 3
    print(f"SimCLR + Hallucinator on digits, NT-Xent {first:.3f} -> {last:.3f} over {len(record.losses)} steps")
    assert last < 0.99 * first
