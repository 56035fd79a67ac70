"""Ancestral DDPM (Ho et al. 2020, arXiv:2006.11239) and DDIM (Song et al. 2021, arXiv:2010.02502) samplers, and
classifier-free guidance (Ho & Salimans 2022, arXiv:2207.12598).

Samplers are plain objects: ``sampler.sample(eps_fn, x_T, generator)`` runs the reverse process with any noise
predictor ``eps_fn(x, t)`` (``t`` a ``(N,)`` int64 tensor of timesteps), ours or a diffusers pipeline's UNet. Their
timesteps follow diffusers' ``"leading"`` spacing (``t_i = i * (T // S)`` with ``steps_offset=0``) and their updates
are diffusers' ``DDPMScheduler`` (``variance_type="fixed_small"``, ``clip_sample=False``) and ``DDIMScheduler``
(``clip_sample=False``) steps, written for any pair (alpha_bar_t, alpha_bar_prev) so that the time-shift sampler can
change the target of a step per sample. ``tests/diffusion/test_samplers.py`` checks both against diffusers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import Tensor

__all__ = [
    "DDIMSampler",
    "DDPMSampler",
    "EpsFn",
    "StepSampler",
    "check_sampling_steps",
    "guided_eps_fn",
    "leading_timesteps",
]

#: a noise predictor: ``eps_fn(x, t)`` with ``t`` an ``(N,)`` int64 tensor of timesteps in ``[0, T)``
EpsFn = Callable[[Tensor, Tensor], Tensor]
Alpha = float | Tensor


def check_sampling_steps(steps: int, num_timesteps: int) -> None:
    """``ValueError`` naming ``steps`` unless ``1 <= steps <= num_timesteps``."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"sampling steps must lie in [1, T={num_timesteps}], got steps={steps}")


def leading_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """diffusers' ``"leading"`` grid, descending: ``(S-1) d, ..., d, 0`` with ``d = T // S``."""
    check_sampling_steps(steps, num_timesteps)
    stride = num_timesteps // steps
    return [i * stride for i in reversed(range(steps))]


def guided_eps_fn(model_fn: Callable[[Tensor, Tensor, Tensor], Tensor], labels: Tensor, null_label: int,
                  guidance: float) -> EpsFn:
    """Classifier-free guidance: eps_u + w (eps_c - eps_u), the conditional (``labels``) and unconditional
    (``null_label``) passes batched together; computed by ``torch.lerp``, which gives eps_c exactly at w = 1 and eps_u
    exactly at w = 0."""

    def eps_fn(x: Tensor, t: Tensor) -> Tensor:
        n = x.shape[0]
        both = model_fn(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, torch.full_like(labels, null_label)]))
        conditional, unconditional = both[:n], both[n:]
        return torch.lerp(unconditional, conditional, guidance)

    return eps_fn


class StepSampler:
    """A sampler with one network call per step from timestep ``t`` to a target: the grid, the final alpha_bar and
    the loop; subclasses define :meth:`update` and whether a step draws noise.

    Args:
        alphas_cumprod: the training schedule's alpha_bar table (``T`` values; float64 for exact comparisons).
        steps: number of sampling steps ``S`` (``1 <= S <= T``), on the leading grid.
        set_alpha_to_one: the target of the last step is alpha_bar = 1 (diffusers' default), else alpha_bar_0.
    """

    name: ClassVar[str] = "step"

    def __init__(self, alphas_cumprod: Tensor, steps: int, set_alpha_to_one: bool = True) -> None:
        self.alphas_cumprod = alphas_cumprod.detach().to("cpu", torch.float64)
        self.num_timesteps = len(self.alphas_cumprod)
        self.steps = steps
        self.timesteps = leading_timesteps(self.num_timesteps, steps)
        self.targets = [*self.timesteps[1:], -1]
        self.final_alpha_cumprod = 1.0 if set_alpha_to_one else float(self.alphas_cumprod[0])
        self._alpha = self.alphas_cumprod.tolist()

    def alpha_bar(self, t: int) -> float:
        """alpha_bar at timestep ``t`` (the final value for ``t < 0``)."""
        return self.final_alpha_cumprod if t < 0 else self._alpha[t]

    def draws_noise(self, t: int) -> bool:
        """Whether the step from ``t`` adds fresh noise."""
        return False

    def update(self, x: Tensor, eps: Tensor, alpha_t: Alpha, alpha_prev: Alpha, noise: Tensor | None) -> Tensor:
        raise NotImplementedError

    def step(self, x: Tensor, eps: Tensor, t: int, alpha_prev: Alpha, generator: torch.Generator | None) -> Tensor:
        """One step from ``t`` (noise drawn from ``generator`` in diffusers' order when the step needs it)."""
        noise = None
        if self.draws_noise(t):
            noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        return self.update(x, eps, self._alpha[t], alpha_prev, noise)

    def sample(self, eps_fn: EpsFn, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Run the reverse process from ``x`` (x_T, e.g. ``torch.randn``) and return x_0."""
        for t, target in zip(self.timesteps, self.targets):
            eps = eps_fn(x, torch.full((x.shape[0],), t, dtype=torch.long, device=x.device))
            x = self.step(x, eps, t, self.alpha_bar(target), generator)
        return x

    def __repr__(self) -> str:
        return f"{type(self).__name__}(steps={self.steps}, T={self.num_timesteps})"


class DDPMSampler(StepSampler):
    """Ancestral DDPM sampling with the posterior variance beta_tilde ("fixed_small"); with ``S < T`` steps the
    step's beta is 1 - alpha_bar_t / alpha_bar_prev (as diffusers' DDPMScheduler). No noise at ``t = 0``."""

    name: ClassVar[str] = "ddpm"

    def draws_noise(self, t: int) -> bool:
        return t > 0

    def update(self, x: Tensor, eps: Tensor, alpha_t: Alpha, alpha_prev: Alpha, noise: Tensor | None) -> Tensor:
        beta_t = 1 - alpha_t / alpha_prev
        x0 = (x - (1 - alpha_t) ** 0.5 * eps) / alpha_t**0.5
        mean = (alpha_prev**0.5 * beta_t / (1 - alpha_t)) * x0 + ((1 - beta_t) ** 0.5 * (1 - alpha_prev) /
                                                                   (1 - alpha_t)) * x
        if noise is None:
            return mean
        variance = (1 - alpha_prev) / (1 - alpha_t) * beta_t
        variance = variance.clamp(min=1e-20) if isinstance(variance, Tensor) else max(variance, 1e-20)
        return mean + variance**0.5 * noise


class DDIMSampler(StepSampler):
    """DDIM: x_prev = sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev - sigma^2) eps + sigma z with
    sigma = eta sqrt((1 - ab_prev)/(1 - ab_t)) sqrt(1 - ab_t/ab_prev); ``eta=0`` is deterministic.

    Args:
        eta: the stochasticity (0: deterministic DDIM, 1: DDPM-like variance).
        **others: see :class:`StepSampler`.
    """

    name: ClassVar[str] = "ddim"

    def __init__(self, alphas_cumprod: Tensor, steps: int, eta: float = 0.0, set_alpha_to_one: bool = True) -> None:
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        super().__init__(alphas_cumprod, steps, set_alpha_to_one)
        self.eta = eta

    def draws_noise(self, t: int) -> bool:
        return self.eta > 0

    def update(self, x: Tensor, eps: Tensor, alpha_t: Alpha, alpha_prev: Alpha, noise: Tensor | None) -> Tensor:
        x0 = (x - (1 - alpha_t) ** 0.5 * eps) / alpha_t**0.5
        if self.eta == 0:  # deterministic; also defined for a target noisier than t (the time shift may pick one)
            return alpha_prev**0.5 * x0 + (1 - alpha_prev) ** 0.5 * eps
        variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)
        std = self.eta * variance**0.5
        x_prev = alpha_prev**0.5 * x0 + (1 - alpha_prev - std**2) ** 0.5 * eps
        return x_prev if noise is None else x_prev + std * noise

    def __repr__(self) -> str:
        return f"DDIMSampler(steps={self.steps}, eta={self.eta}, T={self.num_timesteps})"
