"""Losses shared by several methods, each a plain ``nn.Module`` with its own tests."""

from lit_methods.losses.barlow_twins import BarlowTwinsLoss
from lit_methods.losses.gather import gather_with_grad
from lit_methods.losses.ntxent import NTXentLoss

__all__ = ["BarlowTwinsLoss", "NTXentLoss", "gather_with_grad"]
