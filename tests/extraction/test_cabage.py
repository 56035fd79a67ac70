"""CaBaGe (arXiv:2409.10643): the balanced hard selection against a naive loop, the black-box contract (the query
counter equals the victim's forward passes, no gradient reaches the victim, its weights never change), the head
growing with the labels seen, bad input, and the card's check on digits against the DisGUIDE-lite baseline."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lit_methods.datamodules import DigitsDataModule
from lit_methods.extraction import CaBaGe, DataFreeDataModule, ImageGenerator, select_balanced_hard
from tests.helpers import cpu_trainer

CABAGE = {"num_generators": 3, "filter_ratio": 4.0, "hard_replay": True}


def naive_selection(hardness: list[float], probs: list[list[float]], count: int) -> list[int]:
    """Hardest first within each consensus class up to the quota, then round-robin top-ups by class probability."""
    num_classes = len(probs[0])
    quota = math.ceil(count / num_classes)
    consensus = [max(range(num_classes), key=lambda k: (p[k], -k)) for p in probs]
    order = sorted(range(len(hardness)), key=lambda i: (-hardness[i], i))
    taken, per_class = [], [0] * num_classes
    for i in order:
        if len(taken) < count and per_class[consensus[i]] < quota:
            taken.append(i)
            per_class[consensus[i]] += 1
    while len(taken) < count:
        short = [k for k in range(num_classes) if per_class[k] < quota] or list(range(num_classes))
        for k in short:
            if len(taken) < count:
                best = max((i for i in range(len(probs)) if i not in taken), key=lambda i: (probs[i][k], -i))
                taken.append(best)
                per_class[k] += 1
    return taken


@pytest.mark.parametrize(("count", "num_classes"), [(8, 3), (10, 10), (16, 2), (12, 5)])
def test_balanced_hard_selection_matches_a_naive_loop(count, num_classes):
    g = torch.Generator().manual_seed(count)
    hardness = torch.rand(40, generator=g)
    probs = (torch.randn(40, num_classes, generator=g) + torch.linspace(2, 0, num_classes)).softmax(dim=1)  # skewed
    chosen = select_balanced_hard(hardness, probs, count)
    assert len(set(chosen.tolist())) == count
    assert sorted(chosen.tolist()) == sorted(naive_selection(hardness.tolist(), probs.tolist(), count))


def mlp(outputs: int = 10) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, outputs))


@pytest.fixture(scope="module")
def victim() -> nn.Module:
    """An MLP on [0, 1] digit pixels (Adam, 20 epochs; about 97 % test accuracy)."""
    torch.set_num_threads(1)
    data = DigitsDataModule(normalize=False, crop_padding=0)
    data.setup("fit")
    x, y = data.train_images.float() / 255, data.train_labels
    torch.manual_seed(0)
    net = mlp()
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    order = torch.Generator().manual_seed(0)
    for _ in range(20):
        for idx in torch.randperm(len(y), generator=order).split(64):
            loss = F.cross_entropy(net(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return net.eval()


def build(victim: nn.Module, seed: int, rounds: int, **options) -> CaBaGe:
    torch.manual_seed(seed)
    settings = dict(
        num_classes=10, query_budget=64 * rounds, batch_size=64, lr=0.1, generator_lr=1e-3, replay_iters=3,
        mean=(0.0,), std=(1.0,), generator=ImageGenerator(16, 1, 8, kind="mlp", hidden=64),
    ) | options
    return CaBaGe(victim, None, mlp(), **settings)


def attack(victim: nn.Module, seed: int, rounds: int, **options) -> CaBaGe:
    model = build(victim, seed, rounds, **options)
    trainer = cpu_trainer(max_epochs=-1, max_steps=10 * rounds, limit_val_batches=0)
    trainer.fit(model, datamodule=DataFreeDataModule(DigitsDataModule(normalize=False, num_workers=0)))
    return model


@torch.no_grad()
def agreement(model: CaBaGe, victim: nn.Module) -> float:
    data = DigitsDataModule(normalize=False)
    data.setup("test")
    x = data.test_images.float() / 255
    return float((model(x).argmax(dim=1) == victim(x).argmax(dim=1)).float().mean())


def test_queries_are_counted_exactly_and_the_victim_is_never_touched(victim):
    passes = []
    hook = victim.register_forward_hook(lambda module, args, output: passes.append(len(args[0])))
    before = {k: v.clone() for k, v in victim.state_dict().items()}
    try:
        model = attack(victim, seed=0, rounds=3, query_budget=150, **CABAGE)  # the budget ends mid-round
    finally:
        hook.remove()
    assert int(model.queries) == sum(passes) == model.victim_api.forward_passes == 150
    queried = model.victim_api.model  # the victim behind the API (a copy: the caller's module is not shared)
    for net in (victim, queried):
        assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
        assert all(p.grad is None for p in net.parameters())
    assert not any(p.requires_grad for p in queried.parameters())
    assert victim not in list(model.modules())  # not a submodule: no optimizer or checkpoint reaches it


class SubsetVictim(nn.Module):
    """Answers only labels 1, 4 and 7 (whatever the input): a victim with an unknown, sparse label set."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.base(x)
        mask = torch.full_like(logits, -1e9)
        mask[:, [1, 4, 7]] = 0.0
        return logits + mask


def test_head_grows_to_the_labels_seen(victim):
    model = attack(SubsetVictim(victim), seed=0, rounds=3, unknown_num_classes=True, **CABAGE)
    seen = {int(label) for label in model.seen_labels[: model.num_seen]}
    assert seen == {label for label in range(10) if model.label_counts[label] > 0}
    assert seen <= {1, 4, 7} and model.num_seen == len(seen) >= 2
    assert model.clone_logits(torch.rand(5, 1, 8, 8)).shape == (2, 5, model.num_seen)


def test_bad_input_gets_a_clear_error(victim, tmp_path: Path):
    with pytest.raises(ValueError, match="query_budget must be >= 1"):
        CaBaGe(victim, None, mlp(), num_classes=10, query_budget=0, mean=(0.0,), std=(1.0,), generator=ImageGenerator(16, 1, 8))
    broken = tmp_path / "victim.ckpt"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="victim checkpoint .*victim.ckpt.* does not load"):
        CaBaGe(victim, str(broken), mlp(), num_classes=10, mean=(0.0,), std=(1.0,), generator=ImageGenerator(16, 1, 8))
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in mlp(5).state_dict().items()}}, other)
    with pytest.raises(ValueError, match="does not load into Sequential"):
        CaBaGe(victim, str(other), mlp(), num_classes=10, mean=(0.0,), std=(1.0,), generator=ImageGenerator(16, 1, 8))
    with pytest.raises(FileNotFoundError, match="victim checkpoint .*missing.ckpt.* does not load"):
        CaBaGe(victim, str(tmp_path / "missing.ckpt"), mlp(), num_classes=10, mean=(0.0,), std=(1.0,))


def test_the_filter_balances_the_queries_over_the_clones_classes():
    """Skewed candidates (most look like class 0 to the clones): the filtered queries spread over the classes, the
    unfiltered first ``count`` do not."""
    g = torch.Generator().manual_seed(0)
    probs = (torch.randn(256, 10, generator=g) + torch.tensor([3.0] + [0.0] * 9)).softmax(dim=1)
    chosen = select_balanced_hard(torch.rand(256, generator=g), probs, 64)

    def entropy(indices: torch.Tensor) -> float:
        p = torch.bincount(probs[indices].argmax(dim=1), minlength=10).double() / len(indices)
        return float(-(p * p.clamp_min(1e-12).log()).sum())

    assert entropy(chosen) > entropy(torch.arange(64)) + 0.5


BASELINE = {"num_generators": 1, "filter_ratio": 1.0, "hard_replay": False}


def test_cabage_clones_agree_more_than_the_disguide_lite_baseline(victim):
    """The card's check on digits, 3 seeds of 60 rounds of 64 label queries (3,840) each: the CaBaGe clones agree with
    the victim on real test digits more than DisGUIDE-lite's (one generator, no filter, uniform replay), and well
    above their untrained agreement. Fails for a no-op filter and ensemble (CaBaGe then is the baseline: equal
    agreement) and for a no-op clone step (agreement stays near chance). The card's other claim, a higher entropy of
    the queried labels, holds on average but not per seed at this budget (1.16, 1.65, 1.63 against 1.12, 1.33, 1.64
    nats; means 1.48 against 1.36), too close to assert."""
    untrained = agreement(build(victim, seed=0, rounds=60, **CABAGE), victim)
    cabage, baseline = [], []
    for seed in range(3):
        cabage.append(agreement(attack(victim, seed=seed, rounds=60, **CABAGE), victim))
        baseline.append(agreement(attack(victim, seed=seed, rounds=60, **BASELINE), victim))
    assert sum(cabage) / 3 >= sum(baseline) / 3 + 0.02, (cabage, baseline)
    assert min(cabage) > untrained + 0.05, (cabage, untrained)
