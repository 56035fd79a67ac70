"""Self-supervised learning: the shared base, base methods, the methods built on them, and evaluation."""

from lit_methods.ssl.barlow_twins import BarlowTwins
from lit_methods.ssl.base import SSLMethod
from lit_methods.ssl.hallucinator import Hallucinator
from lit_methods.ssl.linear_eval import LinearEvaluation
from lit_methods.ssl.mixed_barlow_twins import MixedBarlowTwins
from lit_methods.ssl.mlc import MLC
from lit_methods.ssl.moco import MoCoV2, cosine_momentum
from lit_methods.ssl.monitors import OnlineLinearProbe, WeightedKNNClassifier
from lit_methods.ssl.projection_head import ProjectionHeadStudy, effective_rank, knn_accuracy_by_depth
from lit_methods.ssl.selfie import AttentionPooling, Selfie
from lit_methods.ssl.simclr import SimCLR
from lit_methods.ssl.simsiam import SimSiam
from lit_methods.ssl.ssl_ey import SSLEY
from lit_methods.ssl.tcr import TCRPretrain, coding_rate_head

__all__ = [
    "MLC",
    "SSLEY",
    "AttentionPooling",
    "BarlowTwins",
    "Hallucinator",
    "LinearEvaluation",
    "MixedBarlowTwins",
    "MoCoV2",
    "OnlineLinearProbe",
    "ProjectionHeadStudy",
    "SSLMethod",
    "Selfie",
    "SimCLR",
    "SimSiam",
    "TCRPretrain",
    "WeightedKNNClassifier",
    "coding_rate_head",
    "cosine_momentum",
    "effective_rank",
    "knn_accuracy_by_depth",
]
