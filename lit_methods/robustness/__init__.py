"""Adversarial robustness: attacks and adversarial training methods."""

from __future__ import annotations

from lit_methods.robustness.adversarial_finetune import AdversarialFineTune, SlowStartFastDecay
from lit_methods.robustness.attacks import pgd_linf

__all__ = ["AdversarialFineTune", "SlowStartFastDecay", "pgd_linf"]
