"""Adversarial robustness: attacks and adversarial training methods."""

from __future__ import annotations

from lit_methods.robustness.adversarial_finetune import AdversarialFineTune, SlowStartFastDecay
from lit_methods.robustness.attacks import make_attack, pgd_linf, robust_accuracy, write_robust_accuracy_table
from lit_methods.robustness.crossmax import CrossMax, MultiResolutionInput, crossmax

__all__ = [
    "AdversarialFineTune",
    "CrossMax",
    "MultiResolutionInput",
    "SlowStartFastDecay",
    "crossmax",
    "make_attack",
    "pgd_linf",
    "robust_accuracy",
    "write_robust_accuracy_table",
]
