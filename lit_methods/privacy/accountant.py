"""Privacy accounting of the sub-sampled Gaussian mechanism with opacus' RDP accountant.

Mironov, "Renyi Differential Privacy", https://arxiv.org/abs/1702.07476; Mironov, Talwar, Zhang, "Renyi Differential
Privacy of the Sampled Gaussian Mechanism", https://arxiv.org/abs/1908.10530 (the analysis opacus' ``RDPAccountant``
implements). A *history* lists ``(noise_multiplier, sample_rate, steps)`` entries, as opacus' accountant keeps them;
opacus is an optional dependency (the extra ``privacy``) and is imported when a function needs it.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence

import numpy as np

__all__ = [
    "MAX_BUDGET_STEPS",
    "AccountantHistory",
    "calibrate_noise_multiplier",
    "rdp_epsilon",
    "rdp_of_one_step",
    "require_opacus",
    "steps_within_budget",
]

MAX_BUDGET_STEPS = 2**40  # the search of steps_within_budget stops here (a budget no training run would exhaust)

AccountantHistory = Sequence[tuple[float, float, int]]  # (noise_multiplier, sample_rate, steps) entries


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
    noise_multiplier: float,
    sample_rate: float,
    accountant_steps_per_step: int,
    delta: float,
    target_epsilon: float,
) -> int:
    """How many more steps keep epsilon within ``target_epsilon``: the largest ``n`` for which ``history`` plus ``n``
    steps of ``(noise_multiplier, sample_rate)``, each counted ``accountant_steps_per_step`` times, has
    ``rdp_epsilon <= target_epsilon`` (0 when even one step exceeds it; at most :data:`MAX_BUDGET_STEPS`).

    Epsilon grows with the steps, so the answer is found by doubling and then bisection.
    """

    def within(steps: int) -> bool:
        entry = (noise_multiplier, sample_rate, steps * accountant_steps_per_step)
        return rdp_epsilon([*history, entry], delta) <= target_epsilon

    if not within(1):
        return 0
    low, high = 1, 2
    while within(high) and high < MAX_BUDGET_STEPS:
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if within(middle) else (low, middle)
    return low
