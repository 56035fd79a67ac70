"""NT-Xent and Barlow Twins: maths against naive references, and gathered DDP semantics in a 2-process run."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from lit_methods.losses import BarlowTwinsLoss, NTXentLoss
from tests.ddp_helpers import init_gloo, run_distributed


def naive_ntxent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> float:
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = len(z1)
    total = 0.0
    for i in range(2 * n):
        positive = (i + n) % (2 * n)
        scores = [math.exp(float(z[i] @ z[j]) / temperature) for j in range(2 * n) if j != i]
        total -= math.log(math.exp(float(z[i] @ z[positive]) / temperature) / sum(scores))
    return total / (2 * n)


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_ntxent_equals_a_naive_loop(temperature):
    torch.manual_seed(0)
    z1, z2 = torch.randn(6, 5), torch.randn(6, 5)
    assert NTXentLoss(temperature)(z1, z2).item() == pytest.approx(naive_ntxent(z1, z2, temperature), rel=1e-5)


def test_ntxent_is_symmetric_and_rewards_aligned_views():
    torch.manual_seed(1)
    z1, z2 = torch.randn(8, 16), torch.randn(8, 16)
    loss = NTXentLoss(0.5)
    torch.testing.assert_close(loss(z1, z2), loss(z2, z1))
    assert loss(z1, z1 + 0.01 * z2) < loss(z1, z2)


def naive_barlow(z1: torch.Tensor, z2: torch.Tensor, lam: float) -> float:
    a = (z1 - z1.mean(0)) / z1.std(0, unbiased=False)
    b = (z2 - z2.mean(0)) / z2.std(0, unbiased=False)
    c = a.T @ b / len(z1)
    d = len(c)
    return sum((1 - c[i, i]) ** 2 if i == j else lam * c[i, j] ** 2 for i in range(d) for j in range(d)).item()


def test_barlow_twins_equals_the_formula():
    torch.manual_seed(2)
    z1, z2 = torch.randn(10, 4), torch.randn(10, 4)
    assert BarlowTwinsLoss(0.3, eps=0.0)(z1, z2).item() == pytest.approx(naive_barlow(z1, z2, 0.3), rel=1e-5)


def test_barlow_twins_is_zero_on_identical_decorrelated_standardized_embeddings():
    # columns of a Hadamard matrix without its constant column: zero mean, unit variance, uncorrelated
    h = torch.tensor([[1.0]])
    for _ in range(3):
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    z = h[:, 1:]  # (8, 7)
    assert BarlowTwinsLoss(5e-3)(z, z).item() == pytest.approx(0.0, abs=1e-8)
    assert BarlowTwinsLoss(5e-3)(z, torch.roll(z, 1, dims=1)).item() > 1.0  # views correlated the wrong way


@pytest.mark.parametrize(
    "build,match", [(lambda: NTXentLoss(temperature=0.0), "temperature.*0.0"), (lambda: BarlowTwinsLoss(-1.0), "-1.0")]
)
def test_bad_arguments_are_rejected_with_their_value(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def _global_views() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g)


def _gathered_losses_on_my_slice() -> dict:
    init_gloo()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    z1, z2 = (v.chunk(world)[rank].clone().requires_grad_(True) for v in _global_views())
    out = {}
    losses = {"nt": NTXentLoss(0.5, gather_distributed=True), "bt": BarlowTwinsLoss(gather_distributed=True)}
    for name, loss_fn in losses.items():
        z1.grad = z2.grad = None
        loss = loss_fn(z1, z2)
        loss.backward()
        out[name] = (loss.item(), z1.grad.clone(), z2.grad.clone())
    return out


@pytest.mark.ddp
def test_gathered_losses_and_gradients_equal_the_single_process_ones():
    results = run_distributed(_gathered_losses_on_my_slice)
    world = len(results)
    for name, loss_fn in {"nt": NTXentLoss(0.5), "bt": BarlowTwinsLoss()}.items():
        z1, z2 = (v.clone().requires_grad_(True) for v in _global_views())
        single = loss_fn(z1, z2)
        single.backward()
        losses = [r[name][0] for r in results]
        # NT-Xent: each rank averages its own anchors; Barlow Twins: every rank computes the global loss
        if name == "nt":
            assert sum(losses) / world == pytest.approx(single.item(), rel=1e-5)
        else:
            assert losses == pytest.approx([single.item()] * world, rel=1e-5)
        # each rank's slice gets world_size x the single-process gradient, which DDP's averaging divides out
        for rank, r in enumerate(results):
            torch.testing.assert_close(r[name][1] / world, z1.grad.chunk(world)[rank], rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(r[name][2] / world, z2.grad.chunk(world)[rank], rtol=1e-4, atol=1e-6)


def test_without_a_process_group_gathering_is_a_no_op():
    z1, z2 = _global_views()
    torch.testing.assert_close(NTXentLoss(0.5, gather_distributed=True)(z1, z2), NTXentLoss(0.5)(z1, z2))
