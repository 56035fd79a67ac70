"""Eckhart-Young CCA/PLS losses: the official SSL-EY formula, the optimum's value, stochastic CCA recovering
scikit-learn's canonical correlations, and the gathered loss under a 2-process DDP run."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from sklearn.cross_decomposition import CCA

from lit_methods.losses.eckhart_young import CCAEYLoss, cca_ey_matrices
from tests.ddp_helpers import init_gloo, run_distributed


def official_ssl_ey(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The loss as the authors' SSL-EY code writes it (C = 2 x^T y / (n - 1))."""
    n = len(x)
    x, y = x - x.mean(0), y - y.mean(0)
    c = 2 * x.T @ y / (n - 1)
    v = x.T @ x / (n - 1) + y.T @ y / (n - 1)
    return -2 * torch.trace(c) + torch.trace(v @ v)


def test_two_view_loss_equals_the_official_ssl_ey_code():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 5, generator=g), torch.randn(12, 5, generator=g)
    torch.testing.assert_close(CCAEYLoss()([x, y]), official_ssl_ey(x, y))


def test_multiview_and_independent_batch_losses_equal_a_naive_computation():
    g = torch.Generator().manual_seed(1)
    views = [torch.randn(9, 4, generator=g) for _ in range(3)]
    others = [torch.randn(9, 4, generator=g) for _ in range(3)]

    def cov(a, b):
        return (a - a.mean(0)).T @ (b - b.mean(0)) / (len(a) - 1)

    c = sum(cov(views[i], views[j]) for i in range(3) for j in range(3) if i != j)
    v = sum(cov(z, z) for z in views)
    v_other = sum(cov(z, z) for z in others)
    torch.testing.assert_close(CCAEYLoss()(views), -2 * torch.trace(c) + torch.trace(v @ v))
    torch.testing.assert_close(
        CCAEYLoss()(views, independent_representations=others),
        -2 * torch.trace(c) + torch.trace(v @ v_other),
    )


def test_loss_is_invariant_to_a_rotation_of_the_embedding():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(20, 6, generator=g), torch.randn(20, 6, generator=g)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g))
    torch.testing.assert_close(CCAEYLoss()([x @ q, y @ q]), CCAEYLoss()([x, y]))


def _two_views(n: int = 3000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two standardized views sharing a 3-dimensional latent (canonical correlations ~0.95, 0.88, 0.74)."""
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((n, 3))
    x = latent @ rng.standard_normal((3, 8)) + rng.standard_normal((n, 8))
    y = latent @ rng.standard_normal((3, 6)) + rng.standard_normal((n, 6))
    return (x - x.mean(0)) / x.std(0), (y - y.mean(0)) / y.std(0)


def _inverse_sqrt(cov: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(cov)
    return vectors @ np.diag(values**-0.5) @ vectors.T


def _closed_form_cca(x: np.ndarray, y: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k canonical correlations and the Eckhart-Young minimiser W = U_k diag(rho)^(1/2) (whitening + SVD)."""
    p = x.shape[1]
    joint = np.cov(x.T, y.T)
    wx, wy = _inverse_sqrt(joint[:p, :p]), _inverse_sqrt(joint[p:, p:])
    u, rho, vt = np.linalg.svd(wx @ joint[:p, p:] @ wy)
    # B-orthonormal eigenvectors of the CCA GEP: (wx u, wy v) / sqrt(2) (V = sum of both views' variances)
    scale = np.sqrt(rho[:k] / 2)
    return rho[:k], wx @ u[:, :k] * scale, wy @ vt.T[:, :k] * scale


def _subspace_correlations(zx: np.ndarray, zy: np.ndarray, k: int = 3) -> np.ndarray:
    """Canonical correlations scikit-learn's CCA finds between two views (its NIPALS, not our SVD)."""
    cca = CCA(n_components=k, scale=False, max_iter=5000, tol=1e-12).fit(zx, zy)
    sx, sy = cca.transform(zx, zy)
    return np.array([np.corrcoef(sx[:, i], sy[:, i])[0, 1] for i in range(k)])


def test_loss_at_the_closed_form_optimum_is_minus_the_sum_of_squared_correlations_and_is_a_minimum():
    x, y = _two_views()
    rho, wx, wy = _closed_form_cca(x, y, 3)
    sklearn_rho = _subspace_correlations(x, y)
    np.testing.assert_allclose(rho, sklearn_rho, atol=1e-6)  # our whitening/SVD agrees with scikit-learn's CCA
    xt, yt = torch.tensor(x), torch.tensor(y)
    weights = [
        torch.tensor(wx, requires_grad=True),
        torch.tensor(wy, requires_grad=True),
    ]
    loss = CCAEYLoss()([xt @ weights[0], yt @ weights[1]])
    assert loss.item() == pytest.approx(-np.sum(rho**2), abs=1e-9)
    for grad in torch.autograd.grad(loss, weights):  # a stationary point ...
        assert grad.abs().max() < 1e-9
    g = torch.Generator().manual_seed(0)
    for _ in range(5):  # ... and a minimum: perturbations only raise the loss
        moved = [w.detach() + 1e-2 * torch.randn(w.shape, generator=g, dtype=w.dtype) for w in weights]
        assert CCAEYLoss()([xt @ moved[0], yt @ moved[1]]) > loss


def test_pls_ey_optimum_is_minus_the_sum_of_squared_singular_values_of_the_cross_covariance():
    x, y = _two_views(n=500, seed=1)
    u, sigma, vt = np.linalg.svd(np.cov(x.T, y.T)[:8, 8:])
    k = 2
    # B = I: B-orthonormal eigenvectors (u, v)/sqrt(2) with eigenvalues sigma
    wx, wy = u[:, :k] * np.sqrt(sigma[:k] / 2), vt.T[:, :k] * np.sqrt(sigma[:k] / 2)
    weights = [torch.tensor(wx), torch.tensor(wy)]
    loss = CCAEYLoss(ridge=1.0)([torch.tensor(x) @ weights[0], torch.tensor(y) @ weights[1]], weights=weights)
    assert loss.item() == pytest.approx(-np.sum(sigma[:k] ** 2), abs=1e-9)


def test_stochastic_cca_ey_recovers_scikit_learns_canonical_correlations():
    """Minibatch SGD on the unbiased two-batch loss (seed 0); the learned subspace's canonical correlations sum to
    scikit-learn's top-3 within 1e-2, and its full-data loss approaches the optimum -sum rho_k^2."""
    torch.set_num_threads(1)  # a few hundred tiny steps: threads only contend on a loaded machine
    x, y = _two_views()
    rho, _, _ = _closed_form_cca(x, y, 3)
    torch.manual_seed(0)
    xt, yt = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)
    wx, wy = (
        (0.1 * torch.randn(8, 3)).requires_grad_(),
        (0.1 * torch.randn(6, 3)).requires_grad_(),
    )
    loss_fn = CCAEYLoss()
    batch, epochs = 250, 60
    steps = epochs * (len(x) // (2 * batch))
    optimizer = torch.optim.SGD([wx, wy], lr=0.05, momentum=0.9)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for i in range(len(x) // (2 * batch)):
            a, b = (
                order[2 * i * batch : (2 * i + 1) * batch],
                order[(2 * i + 1) * batch : (2 * i + 2) * batch],
            )
            loss = loss_fn(
                [xt[a] @ wx, yt[a] @ wy],
                independent_representations=[xt[b] @ wx, yt[b] @ wy],
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    with torch.no_grad():
        zx, zy = xt @ wx, yt @ wy
        full_loss = loss_fn([zx, zy]).item()
        _, variance = cca_ey_matrices([zx, zy])
    learned = _subspace_correlations(zx.numpy().astype(np.float64), zy.numpy().astype(np.float64))
    assert learned.sum() == pytest.approx(rho.sum(), abs=1e-2)
    assert full_loss == pytest.approx(-np.sum(rho**2), abs=1e-2)
    assert full_loss >= -np.sum(rho**2) - 1e-4  # never below the minimum
    # the eigenvalues of V = Var(Zx) + Var(Zy) are the canonical correlations at the optimum
    np.testing.assert_allclose(np.sort(torch.linalg.eigvalsh(variance).numpy())[::-1], rho, atol=3e-2)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: CCAEYLoss(ridge=1.5), "ridge.*1.5"),
        (
            lambda: CCAEYLoss(ridge=0.5)([torch.randn(4, 2), torch.randn(4, 2)]),
            "ridge=0.5.*got 0",
        ),
        (lambda: CCAEYLoss()([torch.randn(4, 2)]), "at least 2 views, got 1"),
        (
            lambda: CCAEYLoss()([torch.randn(4, 2), torch.randn(4, 3)]),
            r"\(4, 2\), \(4, 3\)",
        ),
        (lambda: CCAEYLoss()([torch.randn(1, 2), torch.randn(1, 2)]), "batch of 1"),
    ],
)
def test_bad_inputs_are_rejected_with_their_value(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def _global_views() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.randn(10, 4, generator=g), torch.randn(10, 4, generator=g)


def _gathered_loss_on_my_slice() -> tuple[float, torch.Tensor, torch.Tensor]:
    init_gloo()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    z1, z2 = (v.chunk(world)[rank].clone().requires_grad_(True) for v in _global_views())
    loss = CCAEYLoss(gather_distributed=True)([z1, z2])
    loss.backward()
    return loss.item(), z1.grad.clone(), z2.grad.clone()


@pytest.mark.ddp
def test_gathered_loss_and_gradients_equal_the_single_process_ones_on_the_concatenated_batch():
    results = run_distributed(_gathered_loss_on_my_slice)
    world = len(results)
    z1, z2 = (v.clone().requires_grad_(True) for v in _global_views())
    single = CCAEYLoss()([z1, z2])
    single.backward()
    assert [r[0] for r in results] == pytest.approx([single.item()] * world, rel=1e-5)
    # each rank's slice gets world_size x the single-process gradient, which DDP's averaging divides out
    for rank, (_, grad1, grad2) in enumerate(results):
        torch.testing.assert_close(grad1 / world, z1.grad.chunk(world)[rank], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(grad2 / world, z2.grad.chunk(world)[rank], rtol=1e-4, atol=1e-6)
    # without a process group the flag changes nothing
    torch.testing.assert_close(CCAEYLoss(gather_distributed=True)(list(_global_views())), single.detach())
