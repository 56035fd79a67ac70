"""The analytic Gaussian diffusion model of the cards (PNDM §6, time shift §7): data x0 ~ N(mu, s^2 I).

Its exact noise predictor is eps*(x, t) = sqrt(1 - ab_t) (x - sqrt(ab_t) mu) / (ab_t s^2 + 1 - ab_t), and the
probability-flow ODE keeps (x - sqrt(ab) mu) / sqrt(ab s^2 + 1 - ab) constant, which gives the exact x_T -> x_0 map.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lit_methods.diffusion.schedules import make_alphas_cumprod


class GaussianModel:
    def __init__(self, dims: int = 64, scale: float = 0.3, seed: int = 0, eps_factor: float = 1.0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.mu = 0.5 * torch.randn(dims, generator=generator, dtype=torch.float64)
        self.scale = scale
        self.eps_factor = eps_factor
        self.alphas_cumprod = make_alphas_cumprod("linear", 1000)
        self.calls = 0

    def marginal_std(self, alpha: float | Tensor) -> float | Tensor:
        return (alpha * self.scale**2 + 1 - alpha) ** 0.5

    def eps(self, x: Tensor, t: Tensor) -> Tensor:
        self.calls += 1
        alpha = self.alphas_cumprod[t].view(-1, 1)
        exact = (1 - alpha) ** 0.5 * (x - alpha**0.5 * self.mu) / self.marginal_std(alpha) ** 2
        return self.eps_factor * exact

    def exact_x0(self, x_start: Tensor, t_start: int, final_alpha: float) -> Tensor:
        alpha = float(self.alphas_cumprod[t_start])
        y = (x_start - alpha**0.5 * self.mu) / self.marginal_std(alpha)
        return final_alpha**0.5 * self.mu + self.marginal_std(final_alpha) * y
