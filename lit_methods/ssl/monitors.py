"""Online evaluation of self-supervised representations: a weighted kNN classifier and a linear probe.

Both are child modules of an SSL method (lightly's design), so they move with it between devices, are saved in its
checkpoints and sync across ranks through torchmetrics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

__all__ = ["OnlineLinearProbe", "WeightedKNNClassifier"]


class WeightedKNNClassifier(Metric):
    """Accuracy of a cosine-similarity, temperature-weighted kNN vote (Wu et al. 2018, arXiv:1805.01978).

    Training features (the bank) and test features are accumulated with :meth:`update`; :meth:`compute` labels each
    test feature by the ``k`` most similar bank features, each voting for its class with weight
    ``exp(cos / temperature)``, and returns the top-1 accuracy. States are concatenated across processes under DDP,
    so every rank votes against the global bank.

    Args:
        num_classes: number of classes.
        k: neighbours (200 in the standard CIFAR protocol).
        temperature: vote temperature (0.1).
        chunk_size: test features compared with the bank at once (memory bound).
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, num_classes: int, k: int = 200, temperature: float = 0.1, chunk_size: int = 256) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.num_classes = num_classes
        self.k = k
        self.temperature = temperature
        self.chunk_size = chunk_size
        for name in ("bank_features", "bank_targets", "test_features", "test_targets"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(
        self,
        bank_features: Tensor | None = None,
        bank_targets: Tensor | None = None,
        test_features: Tensor | None = None,
        test_targets: Tensor | None = None,
    ) -> None:
        """Add training features to the bank and/or test features to be classified (detached, normalized).

        Features are kept in float32 whatever their dtype: under 16-bit mixed precision the backbone gives fp16 or
        bf16 features, and the votes ``exp(cos / T)`` (up to ``e^10 = 22026`` at T = 0.1, summed over ``k``
        neighbours) would overflow fp16 and tie classes at inf.
        """
        if bank_features is not None and bank_targets is not None:
            self.bank_features.append(F.normalize(bank_features.detach().float(), dim=1))
            self.bank_targets.append(bank_targets.detach())
        if test_features is not None and test_targets is not None:
            self.test_features.append(F.normalize(test_features.detach().float(), dim=1))
            self.test_targets.append(test_targets.detach())

    def predict(self, bank: Tensor, bank_targets: Tensor, queries: Tensor) -> Tensor:
        """Class scores ``(Q, num_classes)`` of normalized ``queries`` against a normalized bank."""
        k = min(self.k, len(bank))
        scores = []
        for chunk in queries.split(self.chunk_size):
            similarity, index = (chunk @ bank.T).topk(k, dim=1)
            votes = torch.zeros(len(chunk), self.num_classes, device=chunk.device, dtype=chunk.dtype)
            votes.scatter_add_(1, bank_targets[index], (similarity / self.temperature).exp())
            scores.append(votes)
        return torch.cat(scores)

    def compute(self) -> Tensor:
        if len(self.bank_features) == 0 or len(self.test_features) == 0:  # lists, or tensors once synced
            raise RuntimeError("WeightedKNNClassifier needs both bank and test features before compute()")
        bank, bank_targets = dim_zero_cat(self.bank_features), dim_zero_cat(self.bank_targets)
        queries, targets = dim_zero_cat(self.test_features), dim_zero_cat(self.test_targets)
        predictions = self.predict(bank, bank_targets, queries).argmax(dim=1)
        return (predictions == targets).float().mean()


class OnlineLinearProbe(nn.Module):
    """A linear classifier trained on detached features next to the SSL objective (its gradients never reach the
    backbone); :meth:`forward` returns its cross-entropy and logits."""

    def __init__(self, num_features: int, num_classes: int) -> None:
        super().__init__()
        if num_features < 1 or num_classes < 2:
            raise ValueError(f"need num_features >= 1 and num_classes >= 2, got {num_features}, {num_classes}")
        self.classifier = nn.Linear(num_features, num_classes)

    def forward(self, features: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.classifier(features.detach())
        return F.cross_entropy(logits, targets), logits
