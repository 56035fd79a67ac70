"""Privacy accounting of the sub-sampled Gaussian mechanism with opacus' RDP accountant, and DiceSGD's bound.

Mironov, "Renyi Differential Privacy", https://arxiv.org/abs/1702.07476; Mironov, Talwar, Zhang, "Renyi Differential
Privacy of the Sampled Gaussian Mechanism", https://arxiv.org/abs/1908.10530 (the analysis opacus' ``RDPAccountant``
implements). A *history* lists ``(noise_multiplier, sample_rate, steps)`` entries, as opacus' accountant keeps them;
opacus is an optional dependency (the extra ``privacy``) and is imported when a function needs it.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Sequence

import numpy as np

__all__ = [
    "MAX_BUDGET_STEPS",
    "AccountantHistory",
    "DICESGD_ACCOUNTANTS",
    "calibrate_by_bisection",
    "calibrate_noise_multiplier",
    "dicesgd_step_entry",
    "feedback_noise_multiplier",
    "rdp_epsilon",
    "rdp_of_one_step",
    "require_opacus",
    "steps_within_budget",
]

MAX_BUDGET_STEPS = 2**40  # the search of steps_within_budget stops here (a budget no training run would exhaust)

AccountantHistory = Sequence[tuple[float, float, int]]  # (noise_multiplier, sample_rate, steps) entries

# DiceSGD's accountants: the bound proved in feedback_noise_multiplier's docstring (the default), and the official
# code's heuristic (each step counted max(1, floor(ln E)) times as a DP-SGD step), which is no proof.
DICESGD_ACCOUNTANTS = ("feedback_sensitivity_bound", "official_code_log_epochs_heuristic")


def require_opacus(user: str) -> None:
    """Raise ``ImportError`` naming ``user`` and the extra to install when opacus is missing."""
    try:
        import opacus  # noqa: F401
    except ImportError as error:  # opacus is an optional dependency (extra "privacy")
        raise ImportError(f"{user} needs opacus: pip install 'lit-methods[privacy]'") from error


@functools.lru_cache(maxsize=64)
def rdp_of_one_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """Opacus' RDP of one sub-sampled Gaussian step at the RDP accountant's default orders (cached: it is slow)."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp

    return np.asarray(
        compute_rdp(
            q=sample_rate,
            noise_multiplier=noise_multiplier,
            steps=1,
            orders=RDPAccountant.DEFAULT_ALPHAS,
        )
    )


def rdp_epsilon(history: AccountantHistory, delta: float) -> float:
    """Epsilon of opacus' ``RDPAccountant`` with this ``(noise_multiplier, sample_rate, steps)`` history at ``delta``.

    The RDP of ``steps`` identical steps is ``steps`` times that of one (what ``compute_rdp`` computes), so the
    accountant's value is reproduced exactly from a cached per-step RDP. An empty history has spent nothing (0).
    """
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import get_privacy_spent

    if not history:
        return 0.0
    rdp = sum(steps * rdp_of_one_step(sigma, q) for sigma, q, steps in history)
    with warnings.catch_warnings():  # "optimal order is the largest alpha": the bound is still valid, just loose
        warnings.simplefilter("ignore", UserWarning)
        epsilon, _ = get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
    return float(epsilon)


def calibrate_noise_multiplier(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The noise multiplier that spends ``target_epsilon`` in ``steps`` steps at ``sample_rate`` (opacus'
    ``get_noise_multiplier`` with the RDP accountant)."""
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant="rdp",
            )
        )


def steps_within_budget(
    history: AccountantHistory,
    step: tuple[float, float, int],
    delta: float,
    target_epsilon: float,
) -> int:
    """How many more steps keep epsilon within ``target_epsilon``: the largest ``n`` for which ``history`` plus ``n``
    optimizer steps, each the accountant entry ``step = (noise_multiplier, sample_rate, count)`` (one optimizer
    step counted ``count`` times), has ``rdp_epsilon <= target_epsilon`` (0 when even one step exceeds it; at most
    :data:`MAX_BUDGET_STEPS`).

    Epsilon grows with the steps, so the answer is found by doubling and then bisection.
    """
    noise_multiplier, sample_rate, count = step

    def within(steps: int) -> bool:
        return rdp_epsilon([*history, (noise_multiplier, sample_rate, steps * count)], delta) <= target_epsilon

    if not within(1):
        return 0
    low, high = 1, 2
    while within(high) and high < MAX_BUDGET_STEPS:
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if within(middle) else (low, middle)
    return low


def feedback_noise_multiplier(
    noise_multiplier: float, clip_norm: float, feedback_clip_norm: float, batch_size: float
) -> float:
    """The effective noise multiplier of one DiceSGD step after the first, in the provable worst-case bound.

    A DiceSGD step releases ``v + w`` with ``v = (1/B) sum_i clip(g_i, C1) + clip(e, C2)`` and ``w`` the sum of two
    independent Gaussians of std ``sigma C1 / B`` and ``sigma C2 / B``, i.e. one Gaussian of std
    ``s = sigma sqrt(C1^2 + C2^2) / B`` (``B`` the fixed expected batch size that divides the sums). Proof sketch,
    for neighbouring data sets ``D' = D + {z}`` (add/remove) and Poisson sampling:

    1. Couple the two runs on all data-independent randomness ``R`` (every sample's inclusion in every batch, ``z``'s
       included; dropout). ``R`` has the same law under ``D`` and ``D'``, and Renyi divergence is jointly
       quasi-convex, so ``D_alpha(M(D) || M(D')) <= sup_R D_alpha(M(D) | R || M(D') | R)``.
    2. Given ``R``, each step's noiseless ``v_t`` is a deterministic function of the data, ``R`` and the released
       ``v_0 + w_0, ..., v_{t-1} + w_{t-1}`` (weights and buffer follow from them), so the run is an adaptive
       composition of Gaussian mechanisms (Mironov 2017, https://arxiv.org/abs/1702.07476, Prop. 1 and 7): RDP
       ``sum_t alpha D_t^2 / (2 s_t^2)`` with ``D_t`` a bound on ``||v_t(D) - v_t(D')||``.
    3. The clipped mean moves by at most ``C1 / B``. The buffer holds ``z``'s *unclipped* gradients once ``z`` has
       been drawn, which no constant bounds, so ``clip(e, C2)`` and ``clip(e', C2)`` are only known to lie in the
       ball of radius ``C2``: ``D_t = C1 / B + 2 C2`` for ``t >= 1``. At ``t = 0``, ``e_0 = 0`` on both and only
       the first noise term is added: ``D_0 = C1 / B``, ``s_0 = sigma C1 / B``, a Gaussian of multiplier ``sigma``.

    This function returns ``s / D_t`` for ``t >= 1``. Conditioning on ``R`` forgoes amplification by sub-sampling
    on every step (also the first), which makes the bound valid whatever the sampling, and loose: far costlier
    than DP-SGD's at equal ``sigma``. It holds for any ``C1, C2 > 0`` and any gradients.

    The paper's privacy theorem (arXiv 2311.14632, Section 3; Theorem 3.8 in the OpenReview version; ``C2 >= C1``)
    is not what this computes: its exact statement could not be recovered (the stored arXiv HTML has its formulas
    stripped; the OpenReview reviews only say that its ``sigma_1`` is a noise std and that the proof uses the
    small-``q`` sub-sampled Gaussian bound ``2 q^2 alpha / sigma^2`` for ``sigma >= 4``, Mironov, Talwar, Zhang
    2019), so no transcription of it could be checked.
    """
    if noise_multiplier == 0:  # no noise (infinite clip norms included): no privacy
        return 0.0
    sensitivity = clip_norm / batch_size + 2.0 * feedback_clip_norm
    std = noise_multiplier * math.sqrt(clip_norm**2 + feedback_clip_norm**2) / batch_size
    return std / sensitivity


def dicesgd_step_entry(
    accountant: str,
    noise_multiplier: float,
    sample_rate: float,
    *,
    first_step: bool,
    clip_norm: float,
    feedback_clip_norm: float,
    batch_size: float,
    log_epochs_count: int,
) -> tuple[float, float, int]:
    """The accountant entry ``(noise_multiplier, sample_rate, count)`` of one DiceSGD optimizer step.

    ``"feedback_sensitivity_bound"``: the first step is a Gaussian step (sample rate 1, no amplification) of
    ``noise_multiplier``, every later one a Gaussian step of :func:`feedback_noise_multiplier` (proof there). ``"official_code_log_epochs_
    heuristic"``: a sub-sampled Gaussian step counted ``log_epochs_count`` times (``max(1, floor(ln E))`` in the
    official code), a heuristic without proof that ignores ``C2`` and the unclipped history.
    """
    if accountant == "feedback_sensitivity_bound":
        if first_step:
            return (noise_multiplier, 1.0, 1)
        return (feedback_noise_multiplier(noise_multiplier, clip_norm, feedback_clip_norm, batch_size), 1.0, 1)
    if accountant == "official_code_log_epochs_heuristic":
        return (noise_multiplier, sample_rate, log_epochs_count)
    raise ValueError(f"accountant must be one of {DICESGD_ACCOUNTANTS}, got {accountant!r}")


def calibrate_by_bisection(epsilon_of: Callable[[float], float], target_epsilon: float) -> float:
    """The smallest noise multiplier (to a relative 1e-3) whose ``epsilon_of(sigma) <= target_epsilon``;
    ``epsilon_of`` must decrease in ``sigma``."""
    low, high = 0.0, 1.0
    while epsilon_of(high) > target_epsilon:
        low, high = high, high * 2
        if high > 1e12:
            raise ValueError(f"no noise multiplier up to 1e12 spends at most target_epsilon={target_epsilon}")
    while high - low > 1e-3 * high:
        middle = (low + high) / 2
        low, high = (low, middle) if epsilon_of(middle) <= target_epsilon else (middle, high)
    return high
