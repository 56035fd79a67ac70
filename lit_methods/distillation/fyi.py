"""FYI: Flip Your Images for dataset distillation (Son et al., ECCV 2024, arXiv:2407.08113), on distribution
matching (DM, Zhao & Bilen, arXiv:2110.04181); the ``fyi`` flag of every module of this family does the same."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from lit_methods.distillation.base import DistillationModule
from lit_methods.nets import ConvNet

__all__ = ["FYI", "DistributionMatching"]


class DistributionMatching(DistillationModule):
    """DM (Zhao & Bilen, arXiv:2110.04181): for a fresh random ConvNet (frozen) per step, match the per-class mean
    embedding (``forward_features``) of real and synthetic images, ``sum_c ||mean emb(R_c) - mean emb(S_c)||^2``,
    with Siamese DSA; one SGD step on the images (``lr`` 1.0, ``batch_real`` 256)."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("lr", 1.0)
        super().__init__(**kwargs)

    def matching_loss(self) -> Tensor:
        net = self.random_net()
        net.train().requires_grad_(False)
        real, syn = self.augmented_class_batches()
        return self.embedding_matching_loss(net, real, syn)

    def embedding_matching_loss(self, net: ConvNet, real: list[Tensor], syn: list[Tensor]) -> Tensor:
        """``sum_c ||mean emb(R_c) - mean emb(S_c)||^2`` of per-class batches (equal sizes; one forward each)."""
        with torch.no_grad():
            real_emb = net.forward_features(torch.cat(real)).view(len(real), len(real[0]), -1).mean(1)
        syn_emb = net.forward_features(torch.cat(syn)).view(len(syn), len(syn[0]), -1).mean(1)
        return ((real_emb - syn_emb) ** 2).sum()


class FYI(DistributionMatching):
    """FYI on DM (Son et al., arXiv:2407.08113): every synthetic image is matched together with its mirror image
    (the class batch is ``S_c`` followed by ``flip(S_c)``), so each image and its mirror can carry different content
    on the two sides instead of a left-right symmetric average. Only ``S`` is stored and evaluated.

    The same option is the ``fyi`` argument of :class:`~lit_methods.distillation.DCC` (matching and the net's
    updates), :class:`~lit_methods.distillation.DataDAM` and :class:`~lit_methods.distillation.TESLA` (student
    minibatches of ``batch_syn // 2`` images doubled). The official code also switches DSA to its always-flip
    variant (``always_flip``), which this class turns on by default; ``fyi=False`` gives plain DM.

    Args:
        fyi: mirror-double the synthetic batches (default on).
        always_flip: FYI's DSA variant (default on).
        **kwargs: :class:`DistributionMatching`.
    """

    slug: ClassVar[str] = "fyi"

    def __init__(self, *, fyi: bool = True, always_flip: bool = True, **kwargs: Any) -> None:
        super().__init__(fyi=fyi, always_flip=always_flip, **kwargs)
