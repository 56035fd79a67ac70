"""Global magnitude (L1) pruning of a list of tensors with ``torch.nn.utils.prune``, made permanent."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from torch.nn.utils import prune

__all__ = ["global_magnitude_prune"]


def global_magnitude_prune(tensors: Sequence[tuple[nn.Module, str]], amount: float) -> None:
    """Zero the ``round(amount * total)`` entries of smallest ``|w|`` over all ``(module, parameter name)`` pairs
    together (``prune.global_unstructured`` with ``L1Unstructured``), then remove the re-parametrisation so the
    modules hold plain parameters again (no ``weight_orig``/``weight_mask`` keys in checkpoints)."""
    if not 0.0 < amount < 1.0:
        raise ValueError(f"amount must lie in (0, 1), got {amount}")
    if not tensors:
        raise ValueError("no tensor to prune")
    prune.global_unstructured(list(tensors), pruning_method=prune.L1Unstructured, amount=amount)
    for module, name in tensors:
        prune.remove(module, name)
