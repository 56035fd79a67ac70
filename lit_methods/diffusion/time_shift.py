"""Time-shift sampler (Li, Qu, Yao, Sun & Moens, ICLR 2024, arXiv:2305.15583): a training-free fix of exposure bias.

At each step after the first whose nominal next timestep lies above the ``cutoff``, the sample's own variance (over
all its pixels, per sample) picks, within ``window`` timesteps around the nominal next timestep, the one whose noise
level 1 - alpha_bar best matches it; the step then transfers to that timestep's alpha_bar instead of the nominal
one, and the next step starts from the nominal timestep again. This is what the official ``pnm_solver`` code does
(the model is called at the nominal timestep; only the target alpha_bar moves), which produced the paper's numbers.
No network call is added. Wraps our :class:`~lit_methods.diffusion.samplers.DDIMSampler` and
:class:`~lit_methods.diffusion.samplers.DDPMSampler`.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from lit_methods.diffusion.samplers import EpsFn, StepSampler

__all__ = ["TimeShiftSampler", "select_shifted_timesteps"]


def select_shifted_timesteps(x: Tensor, nominal: int, alphas_cumprod: Tensor, window: int,
                             current: int | None = None) -> Tensor:
    """Per sample, the timestep tau with ``|tau - nominal| <= window // 2`` (clipped to ``[0, T)`` and below the
    ``current`` timestep, so that a step always denoises) minimizing ``|Var(x_i) - (1 - alpha_bar_tau)|`` (the first
    one on ties); ``(N,)`` int64 on ``x``'s device."""
    half = window // 2
    top = len(alphas_cumprod) - 1 if current is None else current - 1
    low, high = max(nominal - half, 0), min(nominal + half, top)
    candidates = torch.arange(low, high + 1)
    noise_levels = (1 - alphas_cumprod[candidates]).to(x.device, x.dtype)
    variance = x.flatten(1).var(dim=1)
    best = (variance[:, None] - noise_levels[None, :]).abs().argmin(dim=1)
    return candidates.to(x.device)[best]


class TimeShiftSampler:
    """A DDIM or DDPM sampler whose step targets are shifted per sample to the timestep matching its variance.

    Args:
        base: the sampler whose grid, updates and noise it uses.
        window: width of the search window in training timesteps (``|tau - t_next| <= window // 2``, kept below
            the step's own timestep); 1 gives the base sampler bitwise.
        cutoff: only steps whose nominal next timestep is above it are shifted (the criterion ignores the data's
            variance, which dominates at low noise); ``cutoff >= T`` gives the base sampler bitwise.
    """

    name: ClassVar[str] = "time-shift"
    slug: ClassVar[str] = "time-shift"

    def __init__(self, base: StepSampler, window: int, cutoff: int) -> None:
        if not isinstance(base, StepSampler):
            raise ValueError(f"the time shift wraps a DDIMSampler or DDPMSampler, got {base!r}")
        if window < 1:
            raise ValueError(f"time-shift window must be >= 1, got window={window}")
        if cutoff < 0:
            raise ValueError(f"time-shift cutoff must be >= 0, got cutoff={cutoff}")
        self.base = base
        self.window = window
        self.cutoff = cutoff
        #: the shifted targets of the last :meth:`sample`, one ``(N,)`` tensor per shifted step (for inspection)
        self.last_shifts: list[tuple[int, Tensor]] = []

    @property
    def timesteps(self) -> list[int]:
        return self.base.timesteps

    def sample(self, eps_fn: EpsFn, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        base, alphas = self.base, self.base.alphas_cumprod
        self.last_shifts = []
        for i, (t, target) in enumerate(zip(base.timesteps, base.targets)):
            eps = eps_fn(x, torch.full((x.shape[0],), t, dtype=torch.long, device=x.device))
            if i == 0 or target <= self.cutoff or self.window == 1:
                x = base.step(x, eps, t, base.alpha_bar(target), generator)
                continue
            shifted = select_shifted_timesteps(x, target, alphas, self.window, current=t)
            self.last_shifts.append((target, shifted))
            alpha_prev = alphas.to(x.device, x.dtype)[shifted].view(-1, *([1] * (x.dim() - 1)))
            x = base.step(x, eps, t, alpha_prev, generator)
        return x

    def __repr__(self) -> str:
        return f"TimeShiftSampler({self.base!r}, window={self.window}, cutoff={self.cutoff})"
