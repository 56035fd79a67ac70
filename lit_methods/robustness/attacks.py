"""L-infinity PGD (Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks",
arXiv:1706.06083, https://arxiv.org/abs/1706.06083) on images in [0, 1]. A classifier of normalized images is
attacked in pixel space behind :class:`lit_methods.datamodules.Normalize`
(``nn.Sequential(Normalize(mean, std), model)``).

:func:`make_attack` builds any attack of ``torchattacks`` by name (the project's one attack toolbox: the methods'
evaluations and PubDef's transfer examples go through it), :func:`robust_accuracy` runs one over a set of images and
:func:`write_robust_accuracy_table` writes the per-attack figures next to the logs.

The attack follows the update of ``torchattacks.PGD`` (3.3.0), which the tests compare it with: optional uniform
random start in the eps-ball, ``steps`` signed-gradient steps of size ``alpha`` on the mean cross-entropy, projection
onto the eps-ball and onto [0, 1] after each step. The input gradient is taken with ``torch.autograd.grad``, so the
model's parameter gradients are never touched.
"""

from __future__ import annotations

import csv
import difflib
import inspect
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "attack_names",
    "check_attack_arguments",
    "check_eps",
    "make_attack",
    "pgd_linf",
    "robust_accuracy",
    "write_robust_accuracy_table",
]

AUTOATTACK_VERSIONS = ("standard", "plus", "rand")


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


def check_eps(eps: float) -> None:
    """Raise ``ValueError`` unless ``eps`` lies in [0, 1] (perturbations are in [0, 1] pixel units)."""
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"eps must lie in [0, 1] (pixel units), got {eps}")


def attack_names() -> list[str]:
    """The attack names :func:`make_attack` accepts: ``torchattacks``' attacks and ``AutoAttack-<version>``."""
    import torchattacks

    names = [name for name in torchattacks.__all__ if name not in ("VANILA", "MultiAttack", "LGV")]
    return [*names, *(f"AutoAttack-{version}" for version in AUTOATTACK_VERSIONS)]


def make_attack(
    name: str,
    model: nn.Module,
    eps: float,
    alpha: float | None = None,
    steps: int | None = None,
    n_classes: int | None = None,
    seed: int = 0,
) -> Any:
    """A ``torchattacks`` attack on ``model`` (which maps [0, 1] pixels to logits) by class name, e.g. ``"PGD"``,
    ``"EOTPGD"``, ``"MIFGSM"``, ``"APGD"``, ``"AutoAttack"`` (standard) or ``"AutoAttack-rand"`` (the EOT version for
    stochastic models). ``eps``, ``alpha``, ``steps``, ``n_classes`` and ``seed`` go to the attack where its
    constructor takes them (``None`` keeps its default). Raises ``ValueError`` for a name ``torchattacks`` does not
    have (with close matches) or ``eps`` outside [0, 1]."""
    import torchattacks

    check_eps(eps)
    known = attack_names()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else f"; known: {', '.join(known)}"
        raise ValueError(f"torchattacks has no attack {name!r}{hint}")
    class_name, _, version = name.partition("-")
    attack_class = getattr(torchattacks, class_name)
    accepted = inspect.signature(attack_class.__init__).parameters
    wanted: dict[str, Any] = {"eps": eps, "alpha": alpha, "steps": steps, "n_classes": n_classes, "seed": seed}
    if version:
        wanted["version"] = version
    kwargs = {key: value for key, value in wanted.items() if key in accepted and value is not None}
    return attack_class(model, **kwargs)


def robust_accuracy(
    model: nn.Module, attack: Any, pixels: Tensor, targets: Tensor, batch_size: int = 256
) -> tuple[float, Tensor]:
    """Accuracy of ``model`` on ``attack``'s examples of ``pixels`` (in [0, 1]), and those examples. Runs with
    gradients enabled (also under a trainer's inference mode); ``model`` is evaluated in its current mode."""
    correct, examples = 0, []
    with torch.inference_mode(False), torch.enable_grad():
        for start in range(0, len(targets), batch_size):
            images = pixels[start : start + batch_size].clone()
            labels = targets[start : start + batch_size].clone()
            adversarial = attack(images, labels).detach()
            with torch.no_grad():
                correct += int((model(adversarial).argmax(dim=1) == labels).sum())
            examples.append(adversarial)
    return correct / max(1, len(targets)), torch.cat(examples)


def write_robust_accuracy_table(rows: Sequence[dict[str, Any]], directory: str | Path, name: str) -> Path:
    """Write ``rows`` (dicts with the same keys, e.g. attack, eps, accuracy) as ``<name>.csv`` and a Markdown
    ``<name>.md`` table in ``directory``; returns the Markdown path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if not rows:
        raise ValueError("no rows to write")
    columns = list(rows[0])
    with open(directory / f"{name}.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)

    def cell(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row[column]) for column in columns) + " |" for row in rows]
    markdown = directory / f"{name}.md"
    markdown.write_text("\n".join(lines) + "\n")
    return markdown
