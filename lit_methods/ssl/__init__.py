"""Self-supervised learning: the shared base, base methods, and online evaluation monitors."""

from lit_methods.ssl.barlow_twins import BarlowTwins
from lit_methods.ssl.base import SSLMethod
from lit_methods.ssl.monitors import OnlineLinearProbe, WeightedKNNClassifier
from lit_methods.ssl.moco import MoCoV2, cosine_momentum
from lit_methods.ssl.simclr import SimCLR

__all__ = [
    "BarlowTwins",
    "MoCoV2",
    "OnlineLinearProbe",
    "SSLMethod",
    "SimCLR",
    "WeightedKNNClassifier",
    "cosine_momentum",
]
