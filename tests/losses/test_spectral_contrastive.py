"""Spectral contrastive loss: the maths against a naive double loop, the norm bound of the official code, and the
gathered loss and gradients under a 2-process gloo group against the single-process loss on the whole batch."""

from __future__ import annotations

import math
import os

import pytest
import torch

from lit_methods.losses.spectral_contrastive import SpectralContrastiveLoss
from tests.ddp_helpers import init_gloo, run_distributed


def naive_spectral(z1: torch.Tensor, z2: torch.Tensor, mu: float | None) -> float:
    rows1, rows2 = z1.tolist(), z2.tolist()
    if mu is not None:
        radius = math.sqrt(mu)

        def bound(row: list[float]) -> list[float]:
            norm = math.sqrt(sum(v * v for v in row))
            return row if norm < radius else [v * radius / norm for v in row]

        rows1, rows2 = [bound(r) for r in rows1], [bound(r) for r in rows2]
    n = len(rows1)

    def dot(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b))

    positive = sum(dot(rows1[i], rows2[i]) for i in range(n)) / n
    negative = sum(dot(rows1[i], rows2[j]) ** 2 for i in range(n) for j in range(n) if j != i) / (n * (n - 1))
    loss = -2 * positive + negative
    return loss if mu is None else loss / mu


@pytest.mark.parametrize("mu", [None, 1.0, 3.0])
def test_spectral_loss_equals_a_naive_double_loop(mu):
    torch.manual_seed(0)
    # rows of norm ~0.4 to ~4: with mu = 1 or 3 some rows are inside the bound and some are rescaled
    z1 = torch.randn(7, 5) * torch.linspace(0.2, 2.0, 7).unsqueeze(1)
    z2 = torch.randn(7, 5) * torch.linspace(2.0, 0.2, 7).unsqueeze(1)
    assert SpectralContrastiveLoss(mu)(z1, z2).item() == pytest.approx(naive_spectral(z1, z2, mu), rel=1e-5)


def test_norm_bound_rescales_only_long_rows_and_the_plain_loss_is_not_bounded():
    torch.manual_seed(1)
    z1, z2 = torch.randn(6, 4), torch.randn(6, 4)
    short1, short2 = 0.1 * z1 / z1.norm(dim=1, keepdim=True), 0.1 * z2 / z2.norm(dim=1, keepdim=True)
    # every row inside the bound: the bounded loss is the plain one
    bounded, plain = SpectralContrastiveLoss(1.0), SpectralContrastiveLoss(None)
    torch.testing.assert_close(bounded(short1, short2), plain(short1, short2))
    # rows far outside the bound all land on the sphere of radius sqrt(mu): scaling them changes nothing
    wide = SpectralContrastiveLoss(2.0)
    torch.testing.assert_close(wide(10 * z1, 10 * z2), wide(50 * z1, 50 * z2))
    # the plain loss keeps rewarding longer aligned embeddings
    assert plain(3 * short1, 3 * short1) < plain(short1, short1)


def test_aligned_decorrelated_views_score_lower_than_unrelated_ones():
    torch.manual_seed(2)
    eye = torch.eye(8)[:, :6] * 0.9  # 8 samples on orthogonal-ish axes (two rows are zero)
    noise = 0.05 * torch.randn(8, 6)
    loss = SpectralContrastiveLoss(1.0)
    assert loss(eye, eye + noise) < loss(eye, eye[torch.randperm(8, generator=torch.Generator().manual_seed(3))])
    torch.testing.assert_close(loss(eye, eye + noise), loss(eye + noise, eye))  # symmetric in the two views


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: SpectralContrastiveLoss(mu=0.0), "mu must be > 0.*got 0.0"),
        (lambda: SpectralContrastiveLoss(mu=-2.0), "got -2.0"),
        (lambda: SpectralContrastiveLoss()(torch.zeros(3, 2), torch.zeros(3, 4)), r"\(3, 2\) and \(3, 4\)"),
        (lambda: SpectralContrastiveLoss()(torch.zeros(1, 2), torch.zeros(1, 2)), "at least 2 samples.*got 1"),
    ],
)
def test_bad_arguments_are_rejected_with_their_value(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def _global_views() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.randn(8, 6, generator=g) * 0.5, torch.randn(8, 6, generator=g) * 0.5


def _gathered_loss_on_my_slice() -> dict:
    init_gloo()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    out = {}
    for mu in (None, 1.0):
        z1, z2 = (v.chunk(world)[rank].clone().requires_grad_(True) for v in _global_views())
        loss = SpectralContrastiveLoss(mu, gather_distributed=True)(z1, z2)
        loss.backward()
        out[mu] = (loss.item(), z1.grad.clone(), z2.grad.clone())
    return out


@pytest.mark.ddp
def test_gathered_loss_and_gradients_equal_the_single_process_ones():
    results = run_distributed(_gathered_loss_on_my_slice)
    world = len(results)
    for mu in (None, 1.0):
        z1, z2 = (v.clone().requires_grad_(True) for v in _global_views())
        single = SpectralContrastiveLoss(mu)(z1, z2)
        single.backward()
        losses = [r[mu][0] for r in results]
        assert sum(losses) / world == pytest.approx(single.item(), rel=1e-5)
        assert losses[0] != pytest.approx(losses[1], rel=1e-3)  # each rank's own share, not a copy of the global loss
        # each rank's slice gets world_size x the single-process gradient, which DDP's averaging divides out
        for rank, r in enumerate(results):
            torch.testing.assert_close(r[mu][1] / world, z1.grad.chunk(world)[rank], rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(r[mu][2] / world, z2.grad.chunk(world)[rank], rtol=1e-4, atol=1e-6)


def test_without_a_process_group_gathering_is_a_no_op():
    z1, z2 = _global_views()
    loss = SpectralContrastiveLoss(1.0, gather_distributed=True)(z1, z2)
    torch.testing.assert_close(loss, SpectralContrastiveLoss(1.0)(z1, z2))
