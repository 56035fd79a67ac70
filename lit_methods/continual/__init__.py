"""Class-incremental (continual) learning: the per-task driver and its metrics, the NMC baseline and NAPA-VQ."""

from lit_methods.continual.base import ContinualMethod
from lit_methods.continual.metrics import (
    accuracy_matrix_table,
    average_forgetting,
    average_incremental_accuracy,
    save_accuracy_matrix_heatmap,
    seen_class_accuracy,
)
from lit_methods.continual.napa_vq import NAPAVQ
from lit_methods.continual.nmc import NCMHead, NMCBaseline

__all__ = [
    "ContinualMethod",
    "NAPAVQ",
    "NCMHead",
    "NMCBaseline",
    "accuracy_matrix_table",
    "average_forgetting",
    "average_incremental_accuracy",
    "save_accuracy_matrix_heatmap",
    "seen_class_accuracy",
]
