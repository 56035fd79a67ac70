"""TESLA: trajectory matching with constant memory and soft labels (Cui et al., ICML 2023, arXiv:2211.10586), on MTT
(Cazenavette et al., CVPR 2022, arXiv:2203.11932)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from lit_methods.distillation.augment import flip_doubled
from lit_methods.distillation.base import DistillationModule, average_across_ranks
from lit_methods.distillation.experts import load_buffer_zca, load_expert_buffer

__all__ = ["TESLA", "FlatForward", "mtt_gradients", "tesla_gradients", "trajectory_loss"]

GRADIENT_MODES = ("tesla", "unrolled")
BatchFn = Callable[[Tensor, int], tuple[Tensor, Tensor]]


class FlatForward:
    """``net``'s forward as a function of one flat parameter vector (MTT's ``ReparamModule``)."""

    def __init__(self, net: nn.Module) -> None:
        self.net = net
        self.names = [name for name, _ in net.named_parameters()]
        self.shapes = [p.shape for p in net.parameters()]
        self.sizes = [p.numel() for p in net.parameters()]

    def __call__(self, x: Tensor, flat: Tensor) -> Tensor:
        params = {n: t.view(s) for n, t, s in zip(self.names, flat.split(self.sizes), self.shapes)}
        return functional_call(self.net, params, (x,))


def trajectory_loss(theta: Tensor, start: Tensor, target: Tensor) -> Tensor:
    """MTT's normalised parameter distance ``||theta - target||^2 / ||start - target||^2`` (sums of squares)."""
    return ((theta - target) ** 2).sum() / ((start - target) ** 2).sum()


def student_gradient(forward: FlatForward, theta: Tensor, x: Tensor, y: Tensor, create_graph: bool) -> Tensor:
    loss = F.cross_entropy(forward(x, theta), y)
    (grad,) = torch.autograd.grad(loss, theta, create_graph=create_graph)
    return grad


def mtt_gradients(
    forward: FlatForward, images: Tensor, lr: Tensor, start: Tensor, target: Tensor, batch: BatchFn, steps: int
) -> tuple[Tensor, Tensor, Tensor]:
    """MTT: unroll ``steps`` student SGD steps from ``start`` keeping the whole graph, then differentiate the
    trajectory loss w.r.t. the images and the learned rate (memory grows linearly with ``steps``)."""
    theta = start.detach().requires_grad_(True)
    current = theta
    for i in range(steps):
        x, y = batch(images, i)
        current = current - lr * student_gradient(forward, current, x, y, create_graph=True)
    loss = trajectory_loss(current, start, target)
    grad_images, grad_lr = torch.autograd.grad(loss, [images, lr])
    return loss.detach(), grad_images, grad_lr


def tesla_gradients(
    forward: FlatForward, images: Tensor, lr: Tensor, start: Tensor, target: Tensor, batch: BatchFn, steps: int
) -> tuple[Tensor, Tensor, Tensor]:
    """TESLA's constant-memory gradient of the trajectory loss.

    ``theta_N = theta_0 - lr * sum_i g_i`` with ``g_i`` the student gradient at ``theta_i``. Holding every ``theta_i``
    fixed (the dropped terms are the Hessian couplings across steps), ``dL/dX = sum_i (dg_i/dX)^T (-lr * G)`` with
    ``G = dL/dtheta_N = 2 (theta_N - target) / ||theta_0 - target||^2``, and ``dL/dlr = -G . sum_i g_i``. Pass 1
    runs the student without a graph to get ``theta_N`` and ``G``; pass 2 replays it (same batches: ``batch`` is
    deterministic in ``i``) and, one step at a time, backpropagates ``-lr * G . g_i`` into the images and frees that
    step's graph, so the memory saved for backward does not grow with ``steps``.

    The official code multiplies a tuple by 2 (``2 * torch.autograd.grad(...)``), which drops the factor 2 of ``G``
    (its image gradient is half of this one); here the factor is kept, so the official ``lr_img`` values correspond
    to half of ours.
    """
    lr_value = lr.detach()
    theta = start.detach().clone()
    grad_sum = torch.zeros_like(theta)
    for i in range(steps):  # pass 1: the student trajectory, no graph kept
        x, y = batch(images.detach(), i)
        g = student_gradient(forward, theta.requires_grad_(True), x, y, create_graph=False)
        grad_sum += g
        theta = (theta - lr_value * g).detach()
    loss = trajectory_loss(theta, start, target)
    outer = 2.0 * (theta - target) / ((start - target) ** 2).sum()
    grad_lr = -(outer * grad_sum).sum()
    grad_images = torch.zeros_like(images)
    theta = start.detach().clone()
    for i in range(steps):  # pass 2: one step's graph at a time
        x, y = batch(images, i)
        g = student_gradient(forward, theta.requires_grad_(True), x, y, create_graph=True)
        (contribution,) = torch.autograd.grad((g * outer).sum() * -lr_value, images)
        grad_images += contribution
        theta = (theta - lr_value * g.detach()).detach()
    return loss.detach(), grad_images, grad_lr.reshape(lr.shape)


class TESLA(DistillationModule):
    """TESLA (Cui et al., arXiv:2211.10586): MTT's trajectory matching (arXiv:2203.11932) with a constant-memory
    gradient (:func:`tesla_gradients`; ``gradient_mode="unrolled"`` is plain MTT, :func:`mtt_gradients`) and soft label
    assignment (``soft_labels``).

    Each step: draw an expert trajectory from the buffer (:mod:`~lit_methods.distillation.experts`) and a start epoch
    in ``[0, max_start_epoch)``; from the expert's parameters at that epoch, train a student for ``syn_steps`` SGD
    steps of the learned rate ``syn_lr`` on minibatches of ``batch_syn`` synthetic images (DSA, one seed per step,
    replayed identically in both passes); the loss is the student's distance to the expert ``expert_epochs`` later,
    normalised by the expert's own move. Images (``lr``, momentum 0.5) and ``syn_lr`` (``lr_lr``, momentum 0.5) take
    one SGD step. With ``soft_labels`` the labels are the softmax of the target expert on the current images,
    recomputed every step and saved with the set (the official code wires this for ImageNet only). With ``fyi``
    each minibatch has ``batch_syn // 2`` images mirror-doubled. The learned rate is not clamped (as the official
    code); it is logged as ``train/syn_lr`` and used by the evaluator.

    ZCA (``zca=True``, as MTT/TESLA on CIFAR): the experts must have trained on whitened data (a buffer built with
    :class:`~lit_methods.distillation.experts.ZCAWhitenedDataModule`); the module then whitens the real data with the
    buffer's own transform (``zca.pt``, not refitted) and checks that the real training split is the data it was
    fitted on. A buffer whose ZCA setting differs from ``zca`` is refused at construction, naming both settings.

    Args:
        buffer: folder of expert trajectories (``expert_*.pt``) of the same network as the student.
        syn_steps: student steps N (CIFAR-10 IPC1: 50).
        expert_epochs: expert epochs M the student must cover (2).
        max_start_epoch: start epochs drawn in ``[0, max_start_epoch)`` (CIFAR-10 IPC1: 5).
        batch_syn: synthetic images per student step (None: all).
        lr_teacher: initial learned rate (the experts' rate, 0.01).
        lr_lr: learning rate of the learned rate (1e-7 for CIFAR-10 IPC1).
        gradient_mode: ``"tesla"`` (constant memory) or ``"unrolled"`` (MTT).
        soft_labels: TESLA's soft label assignment.
        **kwargs: :class:`~lit_methods.distillation.base.DistillationModule` (``lr`` 1000 for the images ...).
    """

    slug: ClassVar[str] = "tesla"
    draws_real_batches: ClassVar[bool] = False

    def __init__(
        self,
        *,
        buffer: str,
        syn_steps: int = 50,
        expert_epochs: int = 2,
        max_start_epoch: int = 5,
        batch_syn: int | None = None,
        lr_teacher: float = 0.01,
        lr_lr: float = 1e-7,
        gradient_mode: Literal["tesla", "unrolled"] = "tesla",
        soft_labels: bool = False,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("lr", 1000.0)
        super().__init__(**kwargs)
        counts = (("syn_steps", syn_steps), ("expert_epochs", expert_epochs), ("max_start_epoch", max_start_epoch))
        for name, value in counts:
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if batch_syn is not None and not 1 <= batch_syn <= self.num_classes * self.ipc:
            total = self.num_classes * self.ipc
            raise ValueError(f"batch_syn must lie in [1, num_classes * ipc = {total}], got {batch_syn}")
        if self.fyi and batch_syn is not None and batch_syn < 2:
            raise ValueError(f"fyi halves batch_syn before doubling it: batch_syn must be >= 2, got {batch_syn}")
        if gradient_mode not in GRADIENT_MODES:
            raise ValueError(f"gradient_mode must be one of {GRADIENT_MODES}, got {gradient_mode!r}")
        if lr_teacher <= 0 or lr_lr < 0:
            raise ValueError(f"lr_teacher must be > 0 and lr_lr >= 0, got {lr_teacher}, {lr_lr}")
        self.syn_steps = syn_steps
        self.expert_epochs = expert_epochs
        self.max_start_epoch = max_start_epoch
        self.batch_syn = batch_syn or self.num_classes * self.ipc
        self.lr_lr = lr_lr
        self.gradient_mode = gradient_mode
        self.soft_labels = soft_labels
        self.syn_lr = nn.Parameter(torch.tensor(float(lr_teacher)))
        self.register_buffer("soft_label_syn", torch.zeros(self.num_classes * self.ipc, self.num_classes))
        self.forward_fn = FlatForward(self.make_net())
        self.experts = load_expert_buffer(
            buffer, self.forward_fn.net, max_start_epoch + expert_epochs, zca=self.zca is not None
        )
        if self.zca is not None:
            buffer_zca = load_buffer_zca(buffer)
            if buffer_zca.mean.shape != self.zca.mean.shape:
                raise ValueError(
                    f"the buffer's ZCA whitens {buffer_zca.mean.numel()} features, the images have "
                    f"{self.zca.mean.numel()}"
                )
            self.zca.eps = buffer_zca.eps
            self.zca.load_state_dict(buffer_zca.state_dict())

    def attach_real_data(
        self,
        images: Tensor,
        labels: Tensor,
        to_inputs: Callable[[Tensor], Tensor],
        test_source: Callable[[], tuple[Tensor, Tensor]] | None = None,
    ) -> None:
        """As the base; with ``zca`` the real training split must be the data the buffer's ZCA was fitted on (same
        mean within 1e-4), so that the synthetic set lives in the experts' input space."""
        if self.zca is not None:
            mean = to_inputs(images).reshape(len(images), -1).double().mean(0).float()
            gap = float((mean - self.zca.mean.to(mean.device)).abs().max())
            if gap > 1e-4:
                raise ValueError(
                    f"the real training split is not the data the buffer's ZCA was fitted on (their means differ by "
                    f"up to {gap:.3g}): distil on the experts' training split"
                )
        super().attach_real_data(images, labels, to_inputs, test_source)

    def synthetic_parameters(self) -> list[nn.Parameter]:
        return [self.image_syn, self.syn_lr]

    def configure_optimizers(self) -> Any:
        groups = [{"params": [self.image_syn], "lr": self.lr}, {"params": [self.syn_lr], "lr": self.lr_lr}]
        if self.optimizer_factory is not None:
            return self.optimizer_factory(groups)
        return torch.optim.SGD(groups, lr=self.lr, momentum=self.momentum)

    def learned_lr(self) -> float | None:
        return float(self.syn_lr.detach())

    def synthetic_labels(self) -> Tensor:
        return self.soft_label_syn if self.soft_labels else self.label_syn

    def student_batches(self, labels: Tensor) -> BatchFn:
        """The student's minibatch of step ``i`` as a deterministic function of the images (indices and DSA seed
        drawn once per step, so both TESLA passes see the same batch)."""
        generator = self.generator(20)
        size = self.batch_syn // 2 if self.fyi else self.batch_syn
        n = len(labels)
        chunks: list[Tensor] = []
        while len(chunks) < self.syn_steps:  # MTT's index chunks: a fresh permutation when one is used up
            chunks += list(torch.randperm(n, generator=generator).split(size))
        seeds = torch.randint(2**62, (self.syn_steps,), generator=generator).tolist()
        device = self.image_syn.device

        def batch(images: Tensor, i: int) -> tuple[Tensor, Tensor]:
            index = chunks[i].to(device)
            x, y = images[index], labels[index]
            if self.fyi:
                x, y = flip_doubled(x, y)
            if self.dsa is not None:
                x = self.dsa(x, torch.Generator().manual_seed(seeds[i]), siamese=True)
            return x, y

        return batch

    def image_gradients(self) -> tuple[Tensor, list[Tensor]]:
        generator = self.generator(21)
        expert = self.experts[int(torch.randint(len(self.experts), (1,), generator=generator))]
        start_epoch = int(torch.randint(self.max_start_epoch, (1,), generator=generator))
        device = self.image_syn.device
        start = expert[start_epoch].to(device)
        target = expert[start_epoch + self.expert_epochs].to(device)
        labels: Tensor = self.label_syn
        if self.soft_labels:
            with torch.no_grad():
                self.forward_fn.net.to(device)
                probabilities = self.forward_fn(self.image_syn, target).softmax(dim=1)
            self.soft_label_syn.copy_(probabilities)
            labels = probabilities
        self.forward_fn.net.to(device)
        gradients = tesla_gradients if self.gradient_mode == "tesla" else mtt_gradients
        loss, grad_images, grad_lr = gradients(
            self.forward_fn, self.image_syn, self.syn_lr, start, target, self.student_batches(labels), self.syn_steps
        )
        grads = [grad_images, grad_lr]
        average_across_ranks(grads)
        return loss, grads

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        self.log("train/syn_lr", self.syn_lr.detach())
        return loss
