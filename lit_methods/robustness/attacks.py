"""L-infinity PGD (Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks",
arXiv:1706.06083, https://arxiv.org/abs/1706.06083) on images in [0, 1]. A classifier of normalized images is
attacked in pixel space behind :class:`lit_methods.datamodules.Normalize`
(``nn.Sequential(Normalize(mean, std), model)``).

The attack follows the update of ``torchattacks.PGD`` (3.3.0), which the tests compare it with: optional uniform
random start in the eps-ball, ``steps`` signed-gradient steps of size ``alpha`` on the mean cross-entropy, projection
onto the eps-ball and onto [0, 1] after each step. The input gradient is taken with ``torch.autograd.grad``, so the
model's parameter gradients are never touched.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["check_attack_arguments", "pgd_linf"]


def check_attack_arguments(eps: float, alpha: float, steps: int) -> None:
    """Raise ``ValueError`` naming the bad value: ``eps >= 0``, ``alpha > 0``, ``steps >= 1``."""
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")


def pgd_linf(
    model: Callable[[Tensor], Tensor],
    pixels: Tensor,
    targets: Tensor,
    eps: float,
    alpha: float,
    steps: int,
    random_start: bool = True,
) -> Tensor:
    """Untargeted L-infinity PGD adversarial examples of ``pixels`` (in [0, 1]) against ``model``.

    Args:
        model: maps [0, 1] images to logits (e.g. preceded by :class:`~lit_methods.datamodules.Normalize`); used
            in whatever mode it is in.
        pixels: ``(N, C, H, W)`` clean images in [0, 1].
        targets: ``(N,)`` class indices.
        eps: radius of the L-infinity ball, in [0, 1] pixel units (CIFAR papers: 8/255).
        alpha: step size (CIFAR papers: 2/255).
        steps: number of gradient steps.
        random_start: start from a uniform random point of the eps-ball (drawn from the global torch RNG).

    Returns:
        the adversarial images, detached, within ``eps`` of ``pixels`` and inside [0, 1].
    """
    check_attack_arguments(eps, alpha, steps)
    clean = pixels.detach()
    adversarial = clean.clone()
    if random_start:
        adversarial = (adversarial + torch.empty_like(adversarial).uniform_(-eps, eps)).clamp(0.0, 1.0)
    for _ in range(steps):
        adversarial.requires_grad_(True)
        loss = F.cross_entropy(model(adversarial), targets)
        (grad,) = torch.autograd.grad(loss, adversarial)
        stepped = adversarial.detach() + alpha * grad.sign()
        adversarial = (clean + (stepped - clean).clamp(-eps, eps)).clamp(0.0, 1.0)
    return adversarial.detach()
