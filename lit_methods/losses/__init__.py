"""Losses shared by several methods, each a plain ``nn.Module`` with its own tests."""

from lit_methods.losses.barlow_twins import BarlowTwinsLoss
from lit_methods.losses.eckhart_young import CCAEYLoss
from lit_methods.losses.gather import gather_with_grad
from lit_methods.losses.mcr2 import MCR2MembershipLoss
from lit_methods.losses.mixed_barlow_twins import MixedBarlowTwinsRegularizer
from lit_methods.losses.negative_cosine import NegativeCosineLoss
from lit_methods.losses.ntxent import NTXentLoss
from lit_methods.losses.spectral_contrastive import SpectralContrastiveLoss
from lit_methods.losses.total_coding_rate import TotalCodingRateLoss

__all__ = [
    "BarlowTwinsLoss",
    "CCAEYLoss",
    "MCR2MembershipLoss",
    "MixedBarlowTwinsRegularizer",
    "NTXentLoss",
    "NegativeCosineLoss",
    "SpectralContrastiveLoss",
    "TotalCodingRateLoss",
    "gather_with_grad",
]
