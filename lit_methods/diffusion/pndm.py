"""Pseudo numerical methods for diffusion models (Liu, Ren, Lin & Zhao, ICLR 2022, arXiv:2202.09778).

The DDIM step is kept as the *transfer* part phi(x, eps, t -> t') of every update, and only the noise estimate fed
to it is a classical combination: pseudo Runge-Kutta (4 calls) or pseudo improved Euler (2 calls) for the first
steps, then pseudo linear multistep (PLMS, 1 call). F-PNDM = 3 pseudo-RK steps + 4th-order PLMS (S + 9 network calls);
S-PNDM = 1 improved-Euler step + 2nd-order PLMS (S + 1 calls); order 1 = DDIM (S calls).

Conventions are diffusers' ``PNDMScheduler`` (checked in ``tests/diffusion/test_pndm.py``): leading grid
``t_i = i (T // S)``, midpoints ``t - (T // S) // 2``, alpha_bar indexed by the network's timestep, final target
alpha_bar_0 (``set_alpha_to_one=False``). The official code instead reads alpha_bar[t + 1] while feeding ``t`` to the
network (a one-step shift of the time embedding); diffusers' F-PNDM is identical to the paper's otherwise. S-PNDM
is not in diffusers (its ``skip_prk_steps`` ramps the PLMS order up instead) and is written from the paper.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import Tensor

from lit_methods.diffusion.samplers import Alpha, EpsFn, leading_timesteps

__all__ = ["PNDM_METHODS", "PNDMSampler", "transfer", "transfer_coefficients"]

PNDM_METHODS = ("f-pndm", "s-pndm", "ddim")
_PLMS_WEIGHTS = {1: (1.0,), 2: (3 / 2, -1 / 2), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def transfer_coefficients(alpha_t: Alpha, alpha_next: Alpha) -> tuple[Alpha, Alpha]:
    """(a, b) of the transfer phi(x, eps) = a x - b eps from noise level alpha_bar_t to alpha_bar_t' (eq. 9):
    a = sqrt(ab'/ab), b = (ab' - ab) / (ab sqrt(1 - ab') + sqrt(ab (1 - ab) ab'))."""
    denominator = alpha_t * (1 - alpha_next) ** 0.5 + (alpha_t * (1 - alpha_t) * alpha_next) ** 0.5
    return (alpha_next / alpha_t) ** 0.5, (alpha_next - alpha_t) / denominator


def transfer(x: Tensor, eps: Tensor, alpha_t: Alpha, alpha_next: Alpha) -> Tensor:
    """phi: the deterministic DDIM step from noise level alpha_bar_t to alpha_bar_t' (the paper's eq. 9):
    x' = sqrt(ab'/ab) x - (ab' - ab) eps / (ab sqrt(1 - ab') + sqrt(ab (1 - ab) ab'))."""
    scale, eps_weight = transfer_coefficients(alpha_t, alpha_next)
    return scale * x - eps_weight * eps


class PNDMSampler:
    """F-PNDM, S-PNDM or DDIM (order 1) through the transfer phi; the eps history is local to one :meth:`sample`.

    Args:
        alphas_cumprod: the training schedule's alpha_bar table (``T`` values).
        steps: sampling steps ``S`` on the leading grid (F-PNDM needs ``S >= 4``, S-PNDM ``S >= 2``).
        method: ``"f-pndm"`` (pseudo Runge-Kutta start, 4th-order PLMS), ``"s-pndm"`` (pseudo improved Euler start,
            2nd-order PLMS) or ``"ddim"``.
        set_alpha_to_one: the last target is alpha_bar = 1 instead of alpha_bar_0 (diffusers' PNDM default: False).
    """

    name: ClassVar[str] = "pndm"
    slug: ClassVar[str] = "pndm"

    def __init__(self, alphas_cumprod: Tensor, steps: int,
                 method: Literal["f-pndm", "s-pndm", "ddim"] = "f-pndm", set_alpha_to_one: bool = False) -> None:
        if method not in PNDM_METHODS:
            raise ValueError(f"unknown PNDM method {method!r}; choose one of {PNDM_METHODS}")
        self.alphas_cumprod = alphas_cumprod.detach().to("cpu", torch.float64)
        self.num_timesteps = len(self.alphas_cumprod)
        self.timesteps = leading_timesteps(self.num_timesteps, steps)
        starts = {"f-pndm": 3, "s-pndm": 1, "ddim": 0}[method]
        if method != "ddim" and steps < starts + 1:
            raise ValueError(f"{method} needs at least {starts + 1} sampling steps, got steps={steps}")
        self.steps = steps
        self.method = method
        self.start_steps = starts
        self.stride = self.num_timesteps // steps
        self.final_alpha_cumprod = 1.0 if set_alpha_to_one else float(self.alphas_cumprod[0])
        self._alpha = self.alphas_cumprod.tolist()

    def alpha_bar(self, t: int) -> float:
        return self.final_alpha_cumprod if t < 0 else self._alpha[t]

    @property
    def network_calls(self) -> int:
        """Network evaluations of one :meth:`sample`: S + 9 (F-PNDM), S + 1 (S-PNDM), S (DDIM)."""
        return self.steps + {"f-pndm": 9, "s-pndm": 1, "ddim": 0}[self.method]

    def sample(self, eps_fn: EpsFn, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Integrate from ``x`` at the first grid time to x_0 (deterministic; ``generator`` is unused)."""
        history: list[Tensor] = []
        order = {"f-pndm": 4, "s-pndm": 2, "ddim": 1}[self.method]
        for i, t in enumerate(self.timesteps):
            target = t - self.stride
            if i < self.start_steps:
                x = self._start_step(eps_fn, x, t, target, history)
            else:
                x = self._plms_step(eps_fn, x, t, target, history, order)
        return x

    def _eps(self, eps_fn: EpsFn, x: Tensor, t: int) -> Tensor:
        return eps_fn(x, torch.full((x.shape[0],), t, dtype=torch.long, device=x.device))

    def _phi(self, x: Tensor, eps: Tensor, t: int, target: int) -> Tensor:
        """:func:`transfer` with float coefficients, as one product and one fused in-place update."""
        scale, eps_weight = transfer_coefficients(self.alpha_bar(t), self.alpha_bar(target))
        return x.mul(scale).sub_(eps, alpha=eps_weight)

    def _start_step(self, eps_fn: EpsFn, x: Tensor, t: int, target: int, history: list[Tensor]) -> Tensor:
        """Pseudo Runge-Kutta (F-PNDM) or pseudo improved Euler (S-PNDM); only e1 enters the history."""
        e1 = self._eps(eps_fn, x, t)
        history.append(e1)
        if self.method == "s-pndm":
            e2 = self._eps(eps_fn, self._phi(x, e1, t, target), target)
            return self._phi(x, e1.add(e2).mul_(0.5), t, target)
        mid = t - self.stride // 2
        e2 = self._eps(eps_fn, self._phi(x, e1, t, mid), mid)
        e3 = self._eps(eps_fn, self._phi(x, e2, t, mid), mid)
        e4 = self._eps(eps_fn, self._phi(x, e3, t, target), target)
        eps = e1.mul(1 / 6).add_(e2, alpha=1 / 3).add_(e3, alpha=1 / 3).add_(e4, alpha=1 / 6)
        return self._phi(x, eps, t, target)

    def _plms_step(self, eps_fn: EpsFn, x: Tensor, t: int, target: int, history: list[Tensor],
                   order: int) -> Tensor:
        history.append(self._eps(eps_fn, x, t))
        del history[:-order]
        weights = _PLMS_WEIGHTS[order]
        eps = history[-1].mul(weights[0])
        for weight, past in zip(weights[1:], reversed(history[:-1])):
            eps.add_(past, alpha=weight)
        return self._phi(x, eps, t, target)

    def __repr__(self) -> str:
        return f"PNDMSampler(method={self.method!r}, steps={self.steps}, T={self.num_timesteps})"
