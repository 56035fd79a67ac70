"""Machine unlearning: worst-case forget-set selection and the unlearning methods it is judged with."""

from lit_methods.unlearning.data import IndexedDataModule
from lit_methods.unlearning.methods import UNLEARNING_METHODS, mia_efficacy, unlearn, unlearning_metrics
from lit_methods.unlearning.worst_case import SignSGD, WorstCaseForget, project_capped_simplex, top_k_mask

__all__ = [
    "IndexedDataModule",
    "SignSGD",
    "UNLEARNING_METHODS",
    "WorstCaseForget",
    "mia_efficacy",
    "project_capped_simplex",
    "top_k_mask",
    "unlearn",
    "unlearning_metrics",
]
