"""Multi-sample dropout classifier (Inoue, arXiv:1905.09788)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from torch import Tensor, nn

from lit_methods.base import ImageClassifier
from lit_methods.datamodules.batch import as_batch
from lit_methods.nets.multi_sample_dropout import MultiSampleDropoutHead

__all__ = ["MultiSampleDropoutClassifier", "multi_sample_loss"]


def multi_sample_loss(logits: Tensor, targets: Tensor, criterion: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """Mean over the M copies of ``criterion(logits[m], targets)``: the average of losses, not the loss of the
    average logits."""
    return sum(criterion(copy, targets) for copy in logits) / len(logits)


class MultiSampleDropoutClassifier(ImageClassifier):
    """:class:`~lit_methods.ImageClassifier` whose backbone's classifier ``fc`` sees ``num_samples`` dropout samples.

    The backbone runs once per batch (``forward_features``); its ``fc`` becomes the shared head of a
    :class:`~lit_methods.nets.MultiSampleDropoutHead`. Training minimises the mean of the M cross-entropies;
    training accuracy is measured on the mean of the M copies' logits. Evaluation is one pass with dropout off.
    The backbone must expose ``forward_features`` and ``fc`` (every :mod:`lit_methods.nets` backbone and
    ``TimmModel`` do).

    Args:
        num_samples: dropout samples M (paper: 8).
        dropout: dropout probability in front of the classifier (paper: 0.5).
        **kwargs: the arguments of :class:`~lit_methods.ImageClassifier`.
    """

    slug: ClassVar[str] = "multi-sample-dropout"

    def __init__(self, backbone: nn.Module, num_samples: int = 8, dropout: float = 0.5, **kwargs: Any) -> None:
        if not (hasattr(backbone, "forward_features") and isinstance(getattr(backbone, "fc", None), nn.Module)):
            raise ValueError(
                f"{type(backbone).__name__} has no forward_features/fc: use a lit_methods.nets backbone or TimmModel"
            )
        super().__init__(backbone, **kwargs)
        self.head = MultiSampleDropoutHead(backbone.fc, num_samples=num_samples, p=dropout)

    def forward(self, x: Tensor) -> Tensor:
        """Logits: ``(M, B, C)`` in training mode, ``(B, C)`` in evaluation mode."""
        return self.head(self.backbone.forward_features(self.normalize_inputs(x)))

    def shared_step(self, batch: Any, stage: str) -> tuple[Tensor, Tensor, Tensor]:
        batch = as_batch(batch)
        images, targets = batch["inputs"], batch["targets"]
        logits = self(images)
        if logits.dim() == 2:
            return self.compute_loss(logits, targets), logits, targets
        return multi_sample_loss(logits, targets, self.compute_loss), logits.mean(0), targets
