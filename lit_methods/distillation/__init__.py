"""Dataset distillation: one synthetic-set platform and the DCC, DataDAM, TESLA and FYI methods on it."""

from lit_methods.distillation.augment import DSA, ZCAWhitening, flip_doubled
from lit_methods.distillation.base import DistillationModule
from lit_methods.distillation.datadam import DataDAM
from lit_methods.distillation.dcc import DCC
from lit_methods.distillation.experts import (
    ExpertTrajectorySaver,
    ZCAWhitenedDataModule,
    load_buffer_zca,
    load_expert_buffer,
)
from lit_methods.distillation.fyi import FYI, DistributionMatching
from lit_methods.distillation.synset import (
    EvaluationSettings,
    SyntheticSetEvaluator,
    evaluate_synset,
    load_synset,
    save_synset,
    save_synset_grid,
)
from lit_methods.distillation.tesla import TESLA

__all__ = [
    "DCC",
    "DSA",
    "DataDAM",
    "DistillationModule",
    "DistributionMatching",
    "EvaluationSettings",
    "ExpertTrajectorySaver",
    "FYI",
    "SyntheticSetEvaluator",
    "TESLA",
    "ZCAWhitenedDataModule",
    "ZCAWhitening",
    "evaluate_synset",
    "flip_doubled",
    "load_buffer_zca",
    "load_expert_buffer",
    "load_synset",
    "save_synset",
    "save_synset_grid",
]
