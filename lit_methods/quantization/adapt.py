"""AdaPT's precision-switching rules: gradient diversity, KL push-down, diversity push-up, adaptive lookback.

Kummer, Sidak, Reichmann, Gansterer, "AdaPT: Adaptive Precision Training" (https://arxiv.org/abs/2107.13490).
The rules follow the official code (lorenz0890/AdaPT, ``optimizers/msgd_fp.py``); where it differs from the paper or
from our card this module says so:

- A tensor's precision switches whenever its lookback window of gradients is complete (the code), not only between
  epochs (the paper); :class:`~lit_methods.callbacks.adaptive_precision.AdaptivePrecision` offers both.
- Push-up adds ``s = 1`` fractional bit by default and computes the diversity-driven ``s`` only when
  ``log(GD) - 1 > 0`` (the code), so even identical gradients (GD = 1) raise the precision found by push-down by
  one bit; the card's "no increase at GD = 1" does not match the code.
- The KL criterion compares histograms of the whole fp32 tensor and of its quantized copy (the code uses only the
  first slice ``w[0]``), over the fp32 tensor's range; quantized values that round past the ends of that range are
  counted in the end bins (the code's ``histc`` drops them, so rounding the extreme weight counted as loss).
  KL is computed properly, ``sum p log(p / q)`` over non-empty bins of ``p`` (infinite when ``q`` is empty there);
  the code feeds probabilities to ``KLDivLoss(log_target=True)``. Both are zero exactly when the histograms agree.
- The fractional-length bisection evaluates the midpoint (the code re-evaluates its lower end, so it may stop
  early); the result is the smallest length whose neighbour below loses information.
- Initial lookback and resolution (not in the config files) are the maxima.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor

from .codecs import MAX_WORD_LENGTH, check_fixed_point_format, fixed_point_quantize

__all__ = [
    "PUSH_UP_STRATEGIES",
    "AdaptivePrecisionController",
    "gradient_diversity",
    "next_lookback",
    "next_resolution",
    "push_down",
    "push_up",
    "push_up_increment",
    "quantization_kl",
]

PushUpStrategy = Literal["min", "mean", "max"]
PUSH_UP_STRATEGIES: tuple[str, ...] = ("min", "mean", "max")
_ESCALATION: dict[str, PushUpStrategy] = {"min": "mean", "mean": "max", "max": "max"}


def gradient_diversity(count: int, gradient_sum: Tensor) -> float:
    """``count / ||sum of the count normalised gradients||``: 1 for identical directions, larger when they disagree
    (``sqrt(count)`` for orthogonal ones); infinite when the sum is zero."""
    norm = float(gradient_sum.double().norm())
    return math.inf if norm == 0.0 else count / norm


def next_lookback(diversity: float, lookback: int, min_lookback: int, max_lookback: int, momentum: float) -> int:
    """Window length: ``ceil(clip(max_lookback / GD, min, max))`` blended with the old one by ``momentum``."""
    target = (
        math.ceil(min(max(max_lookback / diversity, min_lookback), max_lookback)) if diversity > 0 else max_lookback
    )
    return math.ceil(target * momentum + lookback * (1.0 - momentum))


def next_resolution(
    lookback: int, resolution: int, min_lookback: int, max_lookback: int, min_resolution: int, max_resolution: int
) -> int:
    """Histogram bins: one more when the lookback sits at its maximum, one fewer at its minimum (kept in range)."""
    if lookback == max_lookback:
        resolution += 1
    if lookback == min_lookback:
        resolution -= 1
    return min(max(resolution, min_resolution), max_resolution)


def quantization_kl(
    weights: Tensor, word_length: int, fraction_length: int, resolution: int, generator: torch.Generator | None = None
) -> float:
    """KL divergence between the ``resolution``-bin histograms of ``weights`` and of their stochastic fixed-point
    quantization, both over the range of ``weights`` (0 exactly when no bin count changes)."""
    values = weights.detach().flatten().float()
    quantized = fixed_point_quantize(values, word_length, fraction_length, stochastic=True, generator=generator)
    low, high = float(values.min()), float(values.max())
    if low == high:
        return 0.0 if torch.equal(quantized, values) else math.inf
    p = torch.histc(values, resolution, low, high).double()
    q = torch.histc(quantized.clamp(low, high), resolution, low, high).double()
    p, q = p / p.sum(), q / q.sum()
    support = p > 0
    if bool((q[support] == 0).any()):
        return math.inf
    return float((p[support] * (p[support] / q[support]).log()).sum().clamp_min(0.0))


def _smallest_lossless(low: int, high: int, loses_information: Any) -> int:
    """Bisection for the smallest ``n`` in ``[low, high]`` with ``not loses_information(n)``, assuming ``high``
    qualifies; returns ``high`` when only it does."""
    if high <= low:
        return high
    if not loses_information(low):
        return low
    while high - low > 1:
        middle = (low + high) // 2
        if loses_information(middle):
            low = middle
        else:
            high = middle
    return high


def push_down(
    weights: Tensor, word_length: int, fraction_length: int, min_fraction_length: int, resolution: int, seed: int
) -> tuple[int, int]:
    """The smallest fractional length in ``[min_fraction_length, fraction_length]``, then the smallest word length
    in ``[that, word_length]``, at which quantizing ``weights`` leaves the histogram unchanged (KL = 0).

    Every evaluation rounds with a generator seeded by ``seed`` on the device of ``weights``, so the criterion is a
    deterministic function of its arguments (and identical on every DDP rank).
    """

    def kl(word: int, fraction: int) -> float:
        generator = torch.Generator(device=weights.device).manual_seed(seed)
        return quantization_kl(weights, word, fraction, resolution, generator)

    fraction = _smallest_lossless(min_fraction_length, fraction_length, lambda f: kl(word_length, f) > 0)
    word = _smallest_lossless(max(fraction, 1), word_length, lambda w: kl(w, fraction) > 0)
    return word, fraction


def push_up_increment(diversity: float, fraction_length: int, strategy: PushUpStrategy) -> int:
    """Fractional bits to add: 1, or with ``L = log(GD) - 1 > 0`` the ``min``/``mean``/``max`` of
    ``s1 = max(ceil(1 / L^2), 1)`` and ``s2 = max(min(ceil(32 L^2), 32) - FL, 0)``."""
    if not 0 < diversity < math.inf:
        return 1
    excess = math.log(diversity) - 1.0
    if excess <= 0:
        return 1
    s1 = max(math.ceil(1.0 / excess**2), 1)
    s2 = max(min(math.ceil(32.0 * excess**2), MAX_WORD_LENGTH) - fraction_length, 0)
    if strategy == "min":
        return min(s1, s2)
    if strategy == "mean":
        return math.ceil(0.5 * (s1 + s2))
    return max(s1, s2)


def push_up(
    diversity: float, word_length: int, fraction_length: int, strategy: PushUpStrategy, results_buffer: int
) -> tuple[int, int]:
    """Raise the fractional length by :func:`push_up_increment`, the word length to one bit above it, then keep
    ``results_buffer`` integer bits: ``FL <= 32 - buffer`` and ``WL >= FL + buffer``."""
    fraction = min(fraction_length + push_up_increment(diversity, fraction_length, strategy), MAX_WORD_LENGTH)
    word = min(max(word_length, fraction) + 1, MAX_WORD_LENGTH)
    fraction = min(fraction, MAX_WORD_LENGTH - results_buffer)
    word = max(min(fraction + results_buffer, MAX_WORD_LENGTH), word)
    return word, fraction


class AdaptivePrecisionController:
    """Per-tensor fixed-point formats and the statistics that switch them (no model, no Lightning).

    Feed it each step's normalised gradients (:meth:`observe_gradient`) and loss (:meth:`observe_loss`); when
    :meth:`window_complete` says so, :meth:`switch` pushes the tensor's precision down (KL) and up (gradient
    diversity) and starts a new window.

    Args:
        names: one name per weight tensor.
        initial_word_length: starting word length of every tensor.
        initial_fraction_length: starting fractional length.
        min_fraction_length: push-down never goes below it (4 in the code).
        min_lookback: shortest gradient window.
        max_lookback: longest gradient window (also the first window).
        min_resolution: fewest histogram bins.
        max_resolution: most histogram bins (also the starting resolution).
        lookback_momentum: weight of the new window length against the old one.
        results_buffer: integer bits always kept: ``WL >= FL + buffer``.
        push_up_strategy: how push-up combines its two step sizes; adapted to the loss when
            ``adapt_push_up_strategy``.
        adapt_push_up_strategy: escalate ``min -> mean -> max`` while the loss is not below its recent average and
            fall back to ``min`` when it is (the code's behaviour).
    """

    def __init__(
        self,
        names: list[str],
        initial_word_length: int = 8,
        initial_fraction_length: int = 4,
        min_fraction_length: int = 4,
        min_lookback: int = 25,
        max_lookback: int = 100,
        min_resolution: int = 50,
        max_resolution: int = 150,
        lookback_momentum: float = 1.0,
        results_buffer: int = 8,
        push_up_strategy: PushUpStrategy = "min",
        adapt_push_up_strategy: bool = True,
    ) -> None:
        if not names or len(set(names)) != len(names):
            raise ValueError(f"names must be non-empty and unique, got {names!r}")
        check_fixed_point_format(initial_word_length, initial_fraction_length)
        check_fixed_point_format(initial_word_length, min_fraction_length)
        if not 1 <= min_lookback <= max_lookback:
            raise ValueError(f"need 1 <= min_lookback <= max_lookback, got {min_lookback} and {max_lookback}")
        if not 1 <= min_resolution <= max_resolution:
            raise ValueError(f"need 1 <= min_resolution <= max_resolution, got {min_resolution} and {max_resolution}")
        if not 0.0 < lookback_momentum <= 1.0:
            raise ValueError(f"lookback_momentum must lie in (0, 1], got {lookback_momentum}")
        if not 0 <= results_buffer < MAX_WORD_LENGTH:
            raise ValueError(f"results_buffer must lie in [0, {MAX_WORD_LENGTH}), got {results_buffer}")
        if push_up_strategy not in PUSH_UP_STRATEGIES:
            raise ValueError(f"push_up_strategy must be one of {PUSH_UP_STRATEGIES}, got {push_up_strategy!r}")
        self.names = list(names)
        self.min_fraction_length = min_fraction_length
        self.min_lookback, self.max_lookback = min_lookback, max_lookback
        self.min_resolution, self.max_resolution = min_resolution, max_resolution
        self.lookback_momentum = lookback_momentum
        self.results_buffer = results_buffer
        self.adapt_push_up_strategy = adapt_push_up_strategy
        self.push_up_strategy: PushUpStrategy = push_up_strategy
        self.word_length = dict.fromkeys(names, initial_word_length)
        self.fraction_length = dict.fromkeys(names, initial_fraction_length)
        self.lookback = dict.fromkeys(names, max_lookback)
        self.resolution = dict.fromkeys(names, max_resolution)
        self.window_count = dict.fromkeys(names, 0)
        self.window_sum: dict[str, Tensor | None] = dict.fromkeys(names)
        self.loss_history: list[float] = []
        self.switches: list[dict[str, Any]] = []

    def format(self, name: str) -> tuple[int, int]:
        return self.word_length[name], self.fraction_length[name]

    def observe_loss(self, loss: float) -> None:
        """Adapt the push-up strategy to whether ``loss`` is below the recent losses' level.

        As coded, the level is ``|sum of the last window + 1 losses| / window`` with ``window`` the mean lookback.
        """
        if not self.adapt_push_up_strategy:
            return
        window = int(sum(self.lookback.values()) / len(self.lookback))
        if len(self.loss_history) > window:
            recent = abs(sum(self.loss_history) / window)
            if recent <= abs(loss):
                self.push_up_strategy = _ESCALATION[self.push_up_strategy]
            else:
                self.push_up_strategy = "min"
            self.loss_history = self.loss_history[-window:]
        self.loss_history.append(float(loss))

    def observe_gradient(self, name: str, normalized_gradient: Tensor) -> None:
        """Add one normalised gradient to the window of ``name``, then adapt its lookback and resolution."""
        gradient = normalized_gradient.detach()
        total = self.window_sum[name]
        self.window_sum[name] = gradient.clone() if total is None else total + gradient
        self.window_count[name] += 1
        diversity = gradient_diversity(self.window_count[name], self.window_sum[name])
        self.lookback[name] = next_lookback(
            diversity, self.lookback[name], self.min_lookback, self.max_lookback, self.lookback_momentum
        )
        self.resolution[name] = next_resolution(
            self.lookback[name],
            self.resolution[name],
            self.min_lookback,
            self.max_lookback,
            self.min_resolution,
            self.max_resolution,
        )

    def window_complete(self, name: str) -> bool:
        return self.window_count[name] >= self.lookback[name]

    def switch(self, name: str, master_weights: Tensor, seed: int, step: int) -> tuple[int, int]:
        """Push the precision of ``name`` down to the lossless minimum for ``master_weights``, then up by the
        window's gradient diversity; reset the window; record the switch; return the new ``(WL, FL)``."""
        if self.window_count[name] == 0:
            raise RuntimeError(f"no gradient of {name!r} was observed since its last precision switch")
        diversity = gradient_diversity(self.window_count[name], self.window_sum[name])
        word, fraction = push_down(
            master_weights,
            self.word_length[name],
            self.fraction_length[name],
            self.min_fraction_length,
            self.resolution[name],
            seed,
        )
        pushed_down = (word, fraction)
        word, fraction = push_up(diversity, word, fraction, self.push_up_strategy, self.results_buffer)
        self.switches.append(
            {
                "step": step,
                "name": name,
                "window": self.window_count[name],
                "diversity": diversity,
                "resolution": self.resolution[name],
                "strategy": self.push_up_strategy,
                "before": self.format(name),
                "pushed_down": pushed_down,
                "after": (word, fraction),
            }
        )
        self.word_length[name], self.fraction_length[name] = word, fraction
        self.window_count[name], self.window_sum[name] = 0, None
        return word, fraction

    def state_dict(self) -> dict[str, Any]:
        keys = ("word_length", "fraction_length", "lookback", "resolution", "window_count", "window_sum")
        state = {key: dict(getattr(self, key)) for key in keys}
        return state | {
            "push_up_strategy": self.push_up_strategy,
            "loss_history": list(self.loss_history),
            "switches": list(self.switches),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state["word_length"]) != set(self.names):
            raise ValueError(
                f"the saved precision state covers tensors {sorted(state['word_length'])}, not {sorted(self.names)}"
            )
        for key in ("word_length", "fraction_length", "lookback", "resolution", "window_count", "window_sum"):
            setattr(self, key, dict(state[key]))
        self.push_up_strategy = state["push_up_strategy"]
        self.loss_history = list(state["loss_history"])
        self.switches = list(state["switches"])
