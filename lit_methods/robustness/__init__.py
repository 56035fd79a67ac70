"""Adversarial robustness: attacks and adversarial training methods."""

from __future__ import annotations

from lit_methods.robustness.adversarial_finetune import AdversarialFineTune, SlowStartFastDecay
from lit_methods.robustness.attacks import make_attack, pgd_linf, robust_accuracy, write_robust_accuracy_table
from lit_methods.robustness.crossmax import CrossMax, MultiResolutionInput, crossmax
from lit_methods.robustness.pubdef import PubDef, generate_transfer_examples, load_source_weights

__all__ = [
    "AdversarialFineTune",
    "CrossMax",
    "MultiResolutionInput",
    "PubDef",
    "SlowStartFastDecay",
    "crossmax",
    "generate_transfer_examples",
    "load_source_weights",
    "make_attack",
    "pgd_linf",
    "robust_accuracy",
    "write_robust_accuracy_table",
]
