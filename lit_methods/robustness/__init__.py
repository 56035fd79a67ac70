"""Adversarial robustness: attacks and adversarial training methods."""

from __future__ import annotations

from lit_methods.robustness.adversarial_finetune import AdversarialFineTune, SlowStartFastDecay
from lit_methods.robustness.attacks import PixelNormalization, pgd_linf

__all__ = ["AdversarialFineTune", "PixelNormalization", "SlowStartFastDecay", "pgd_linf"]
