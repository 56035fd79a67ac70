"""Noise schedules of discrete-time diffusion (Ho et al. 2020, arXiv:2006.11239; Nichol & Dhariwal 2021,
arXiv:2102.09672): the betas and the cumulative products alpha_bar_t = prod_{s<=t} (1 - beta_s), in float64.

The names follow diffusers' ``beta_schedule`` (``"linear"``, ``"scaled_linear"``) with ``"cosine"`` for its
``"squaredcos_cap_v2"``; ``tests/diffusion`` checks the tables against diffusers' schedulers.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["BETA_SCHEDULES", "make_alphas_cumprod", "make_betas"]

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")


def make_betas(schedule: str, num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """The ``num_timesteps`` betas of ``schedule`` (float64).

    ``"linear"``: evenly spaced from ``beta_start`` to ``beta_end`` (DDPM); ``"scaled_linear"``: evenly spaced in
    sqrt(beta) (latent diffusion); ``"cosine"``: alpha_bar(t) = cos^2((t/T + 0.008)/1.008 * pi/2), each beta capped at
    0.999 (improved DDPM; ``beta_start``/``beta_end`` unused).
    """
    if schedule not in BETA_SCHEDULES:
        raise ValueError(f"unknown beta schedule {schedule!r}; choose one of {BETA_SCHEDULES}")
    if num_timesteps < 2:
        raise ValueError(f"num_timesteps must be >= 2, got {num_timesteps}")
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
    if schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), 0.999)
             for i in range(num_timesteps)]
    return torch.tensor(betas, dtype=torch.float64)


def make_alphas_cumprod(schedule: str, num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s) for t = 0..T-1 (float64)."""
    return torch.cumprod(1.0 - make_betas(schedule, num_timesteps, beta_start, beta_end), dim=0)
