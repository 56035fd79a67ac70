"""Machine unlearning: worst-case forget-set selection and the unlearning methods it is judged with."""

from lit_methods.unlearning.data import IndexedDataModule
from lit_methods.unlearning.influence import influence_unlearn, inverse_fisher_product
from lit_methods.unlearning.methods import (
    UNLEARNING_METHODS,
    UNLEARNING_OPTIONS,
    boundary_shrink_labels,
    layer_split,
    mia_efficacy,
    scrub_kl,
    unlearn,
    unlearning_metrics,
)
from lit_methods.unlearning.worst_case import SignSGD, WorstCaseForget, project_capped_simplex, top_k_mask

__all__ = [
    "IndexedDataModule",
    "SignSGD",
    "UNLEARNING_METHODS",
    "UNLEARNING_OPTIONS",
    "WorstCaseForget",
    "boundary_shrink_labels",
    "influence_unlearn",
    "inverse_fisher_product",
    "layer_split",
    "mia_efficacy",
    "project_capped_simplex",
    "scrub_kl",
    "top_k_mask",
    "unlearn",
    "unlearning_metrics",
]
