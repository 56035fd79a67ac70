"""DCC: dataset condensation with contrastive signals (Lee et al., ICML 2022, arXiv:2202.02916)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_methods.distillation.augment import flip_doubled
from lit_methods.distillation.base import DistillationModule
from lit_methods.distillation.matching import gradient_distance
from lit_methods.nets import ConvNet

__all__ = ["DCC"]


class DCC(DistillationModule):
    """DCC (Lee et al., arXiv:2202.02916): gradient matching where the synthetic gradient is that of the loss over
    ALL classes at once, matched to the class-average of the per-class real gradients, so the synthetic images also
    learn how the classes differ. ``contrast=False`` is class-wise gradient matching (DC, arXiv:2006.05929; DSA with
    ``dsa=True``).

    One training step is one outer iteration of the official code: a fresh random ConvNet, then ``inner_loop``
    image steps, each followed (but the last) by ``inner_epochs`` epochs of SGD (``lr_net``, batches of
    ``batch_train``, DSA with per-image parameters) of the net on the current synthetic set. The distance is DC's
    layer-wise ``sum(1 - cos)`` over output rows (1-d parameters count 0). Warm-up, as the official code: the
    contrastive loss is used when ``outer >= outer_warmup or inner >= inner_warmup`` (else class-wise). The outer
    iteration is ``global_step // inner_loop`` (the step counter counts image steps). With ``dsa`` the synthetic
    images of the contrastive gradient are the same augmented tensors Siamese-paired with each class's real batch.
    With ``fyi`` the synthetic batches are mirror-doubled in matching and in the net's training (arXiv:2407.08113).

    Args:
        contrast: use the contrastive (all-class) gradient after the warm-up.
        inner_loop: image steps per outer iteration (paper by ipc: 1: 10, 10: 10, 50: 50).
        inner_epochs: epochs of the net on the synthetic set between image steps (ipc 1: 5, 10: 50, 50: 10).
        outer_warmup: outer iterations of class-wise matching first (250).
        inner_warmup: inner steps of class-wise matching in every outer iteration (10).
        lr_net: SGD rate of the net's updates (no momentum, as the official code).
        batch_train: synthetic images per batch of the net's updates.
        **kwargs: :class:`~lit_methods.distillation.base.DistillationModule` (``lr`` 0.1, ``batch_real`` 256 ...).
    """

    slug: ClassVar[str] = "dcc"

    def __init__(
        self,
        *,
        contrast: bool = True,
        inner_loop: int = 10,
        inner_epochs: int = 50,
        outer_warmup: int = 250,
        inner_warmup: int = 10,
        lr_net: float = 0.01,
        batch_train: int = 256,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("lr", 0.1)
        super().__init__(**kwargs)
        for name, value, minimum in (
            ("inner_loop", inner_loop, 1),
            ("inner_epochs", inner_epochs, 0),
            ("outer_warmup", outer_warmup, 0),
            ("inner_warmup", inner_warmup, 0),
            ("batch_train", batch_train, 1),
        ):
            if value < minimum:
                raise ValueError(f"{name} must be >= {minimum}, got {value}")
        if lr_net <= 0:
            raise ValueError(f"lr_net must be > 0, got {lr_net}")
        self.contrast = contrast
        self.inner_loop = inner_loop
        self.inner_epochs = inner_epochs
        self.outer_warmup = outer_warmup
        self.inner_warmup = inner_warmup
        self.lr_net = lr_net
        self.batch_train = batch_train

    def uses_contrast(self, outer: int, inner: int) -> bool:
        """Whether the contrastive loss is used at outer iteration ``outer``, inner step ``inner`` (the warm-up)."""
        return self.contrast and (outer >= self.outer_warmup or inner >= self.inner_warmup)

    def gradient_matching_loss(self, net: ConvNet, contrastive: bool, salt: int = 0) -> Tensor:
        """Class-wise (``sum_c D(g_syn_c, g_real_c)``) or contrastive (``D(g_syn_all, mean_c g_real_c)``) loss."""
        params = [p for p in net.parameters() if p.requires_grad]
        generator = self.generator(10, salt)
        real_grads: list[list[Tensor]] = []
        syn_images, syn_labels = [], []
        loss = torch.zeros((), device=self.image_syn.device)
        for c in range(self.num_classes):
            real_c = self.real_images(c, self.batch_real, generator)
            syn_c, labels_c = self.synthetic_batch(c)
            real_c, syn_c = self.augment_pair(real_c, syn_c, salt * self.num_classes + c)
            targets = torch.full((len(real_c),), c, device=real_c.device)
            real_grad = [g.detach() for g in torch.autograd.grad(F.cross_entropy(net(real_c), targets), params)]
            if contrastive:
                real_grads.append(real_grad)
                syn_images.append(syn_c)
                syn_labels.append(labels_c)
            else:
                syn_grad = torch.autograd.grad(F.cross_entropy(net(syn_c), labels_c), params, create_graph=True)
                loss = loss + gradient_distance(real_grad, syn_grad)
        if not contrastive:
            return loss
        mean_real = [torch.stack(per_param).mean(0) for per_param in zip(*real_grads)]
        syn_loss = F.cross_entropy(net(torch.cat(syn_images)), torch.cat(syn_labels))
        syn_grad = torch.autograd.grad(syn_loss, params, create_graph=True)
        return gradient_distance(mean_real, syn_grad)

    def train_net(self, net: ConvNet, salt: int) -> None:
        """``inner_epochs`` epochs of SGD of ``net`` on the (detached) synthetic set."""
        images, labels = self.image_syn.detach(), self.label_syn
        if self.fyi:
            images, labels = flip_doubled(images, labels)
        optimizer = torch.optim.SGD(net.parameters(), lr=self.lr_net)
        generator = self.generator(11, salt)
        for _ in range(self.inner_epochs):
            order = torch.randperm(len(images), generator=generator).to(images.device)
            for index in order.split(self.batch_train):
                batch = images[index]
                if self.dsa is not None:
                    batch = self.dsa(batch, generator, siamese=False)
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(net(batch), labels[index]).backward()
                optimizer.step()

    def distillation_step(self) -> Tensor:
        outer = self.global_step // self.inner_loop
        net = self.random_net()
        net.train()
        losses = []
        for inner in range(self.inner_loop):
            loss = self.gradient_matching_loss(net, self.uses_contrast(outer, inner), inner)
            grads = torch.autograd.grad(loss, [self.image_syn])
            self.step_synthetic(grads)
            losses.append(loss.detach())
            if inner < self.inner_loop - 1:
                with torch.enable_grad():
                    self.train_net(net, inner)
        return torch.stack(losses).mean()
