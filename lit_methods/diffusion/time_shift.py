"""Time-shift sampler (Li, Qu, Yao, Sun & Moens, ICLR 2024, arXiv:2305.15583): a training-free fix of exposure bias.

At each step after the first whose nominal next timestep lies above the ``cutoff``, the sample's own variance (over
all its pixels, per sample) picks, within ``window`` timesteps around the nominal next timestep, the one whose noise
level 1 - alpha_bar best matches it; the step then transfers to that timestep's alpha_bar instead of the nominal
one, and the next step starts from the nominal timestep again. This is what the official code does
(``PNMSolver.apply_time_shift`` in Mingxiao-Li/TS-DPM ``sampler/pnm_solver.py``: the model is called at the nominal
timestep; only the target alpha_bar moves), which produced the paper's numbers. No network call is added. Wraps our
:class:`~lit_methods.diffusion.samplers.DDIMSampler` and :class:`~lit_methods.diffusion.samplers.DDPMSampler`.

The window is the official one: ``[t_next - window // 2, t_next + window // 2]`` clipped to ``[0, T)`` only (the
official upper-edge branch reads a missing attribute; we clip), so with ``window // 2`` above the grid stride
``T // S`` it reaches above the step's own timestep ``t`` (the deterministic DDIM transfer then moves towards more
noise, as the official ``transfer`` does). A stochastic step (DDPM, DDIM with eta > 0) has no posterior for a target
above ``t`` (its variance ``1 - alpha_bar_t / alpha_bar_tau`` is negative; the official ``ddpm`` step takes its
square root and gives NaN), so such a window is refused at construction.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from lit_methods.diffusion.samplers import EpsFn, StepSampler

__all__ = ["TimeShiftSampler", "select_shifted_timesteps"]


def select_shifted_timesteps(x: Tensor, nominal: int, alphas_cumprod: Tensor, window: int) -> Tensor:
    """Per sample, the timestep tau with ``|tau - nominal| <= window // 2`` (clipped to ``[0, T)``, as the official
    code) minimizing ``|Var(x_i) - (1 - alpha_bar_tau)|`` (the first one on ties; the official code minimizes the
    square, which picks the same tau); ``(N,)`` int64 on ``x``'s device."""
    half = window // 2
    low, high = max(nominal - half, 0), min(nominal + half, len(alphas_cumprod) - 1)
    candidates = torch.arange(low, high + 1)
    noise_levels = (1 - alphas_cumprod[candidates]).to(x.device, x.dtype)
    variance = x.flatten(1).var(dim=1)
    best = (variance[:, None] - noise_levels[None, :]).abs().argmin(dim=1)
    return candidates.to(x.device)[best]


class TimeShiftSampler:
    """A DDIM or DDPM sampler whose step targets are shifted per sample to the timestep matching its variance.

    Args:
        base: the sampler whose grid, updates and noise it uses.
        window: width of the search window in training timesteps (``|tau - t_next| <= window // 2``); 1 gives the
            base sampler bitwise. With a stochastic base (DDPM, DDIM eta > 0) ``window // 2`` must not exceed the
            grid stride ``T // S`` (a larger window is a ``ValueError``, see the module doc).
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
        shifted = [target for target in base.targets[1:] if target > cutoff]
        stride = base.num_timesteps // base.steps
        if shifted and window > 1 and window // 2 > stride and base.draws_noise(base.timesteps[0]):
            raise ValueError(
                f"time-shift window={window} reaches {window // 2} timesteps above the nominal target, beyond the "
                f"step's own timestep (stride T // S = {stride}): a stochastic {base.name} step has no posterior "
                f"there; use window <= {2 * stride + 1}, fewer steps, or DDIM with eta=0")
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
            shifted = select_shifted_timesteps(x, target, alphas, self.window)
            self.last_shifts.append((target, shifted))
            alpha_prev = alphas.to(x.device, x.dtype)[shifted].view(-1, *([1] * (x.dim() - 1)))
            x = base.step(x, eps, t, alpha_prev, generator)
        return x

    def __repr__(self) -> str:
        return f"TimeShiftSampler({self.base!r}, window={self.window}, cutoff={self.cutoff})"
