"""Differential-privacy building blocks, free of Lightning (a library module, like ``nets`` and ``losses``: callbacks
may import it): the RDP accountant of the sub-sampled Gaussian mechanism, per-sample gradient engines (book-keeping
and ``torch.func``) and per-sample clipping."""

from .accountant import (
    DICESGD_ACCOUNTANTS,
    MAX_BUDGET_STEPS,
    AccountantHistory,
    calibrate_by_bisection,
    calibrate_noise_multiplier,
    dicesgd_step_entry,
    feedback_noise_multiplier,
    rdp_epsilon,
    rdp_of_one_step,
    require_opacus,
    steps_within_budget,
)
from .clipping import NORM_EPS, clip_factors
from .per_sample import BookKeeping, PerSampleTerm, unsupported_trainable_layers, vmap_per_sample_gradients

__all__ = [
    "DICESGD_ACCOUNTANTS",
    "MAX_BUDGET_STEPS",
    "AccountantHistory",
    "calibrate_by_bisection",
    "dicesgd_step_entry",
    "feedback_noise_multiplier",
    "NORM_EPS",
    "BookKeeping",
    "PerSampleTerm",
    "calibrate_noise_multiplier",
    "clip_factors",
    "rdp_epsilon",
    "rdp_of_one_step",
    "require_opacus",
    "steps_within_budget",
    "unsupported_trainable_layers",
    "vmap_per_sample_gradients",
]
