"""Approximate unlearning methods and the metrics that judge them, as used by "Challenging Forgets" (Fan et al.,
ECCV 2024, arXiv:2403.07362, built on Unlearn-Sparse, Jia et al., arXiv:2304.04934; official code
``OPTML-Group/Unlearn-WorstCase``, ``data-wise/unlearn/`` and ``data-wise/evaluation/SVC_MIA.py``).

Every method starts from a copy of the original model (the original is never modified) and trains it with SGD on
in-memory tensors (inputs already as the model takes them):

* ``retrain``: from a fresh initialisation on the retain set D_r (the gold standard);
* ``ft``: fine-tuning on D_r;
* ``ga``: gradient ascent on the forget set D_f;
* ``rl``: random labels: D_f with labels drawn uniformly among the other classes, trained together with D_r;
* ``l1-sparse``: fine-tuning on D_r plus ``alpha_t * ||theta||_1``, ``alpha_t`` decaying linearly from ``alpha``
  to 0 over the run.

The metrics (in percent): UA = 100 - accuracy on D_f, RA = accuracy on D_r, TA = test accuracy, and MIA-Efficacy:
an SVC (C=3, RBF, gamma="auto") fitted on the true-class confidence of shadow members (the first |D_test| samples of
D_r) against non-members (D_test), the share of D_f it calls non-members.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["UNLEARNING_METHODS", "check_unlearning_methods", "mia_efficacy", "unlearn", "unlearning_metrics"]

UNLEARNING_METHODS = ("retrain", "ft", "ga", "rl", "l1-sparse")


def check_unlearning_methods(methods: Sequence[str]) -> None:
    """``ValueError`` naming any method of ``methods`` that is not one of :data:`UNLEARNING_METHODS`."""
    unknown = [m for m in methods if m not in UNLEARNING_METHODS]
    if unknown:
        raise ValueError(f"unknown unlearning method(s) {unknown}: choose among {list(UNLEARNING_METHODS)}")


def _reinitialise(model: nn.Module) -> None:
    for module in model.modules():
        if module is not model and hasattr(module, "reset_parameters"):
            module.reset_parameters()


def unlearn(
    model: nn.Module,
    method: str,
    forget: tuple[Tensor, Tensor],
    retain: tuple[Tensor, Tensor],
    num_classes: int,
    epochs: int,
    lr: float,
    batch_size: int = 64,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    alpha: float = 5e-4,
    seed: int = 0,
) -> nn.Module:
    """A copy of ``model`` unlearnt of ``forget`` = (inputs, labels) by ``method`` (see the module doc), trained for
    ``epochs`` epochs with SGD(``lr``, ``momentum``, ``weight_decay``) on shuffled batches drawn with ``seed``."""
    check_unlearning_methods([method])
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    generator = torch.Generator().manual_seed(seed)
    student = copy.deepcopy(model)
    for p in student.parameters():
        p.requires_grad_(True)
    if method == "retrain":
        torch.manual_seed(seed)
        _reinitialise(student)
    (xf, yf), (xr, yr) = forget, retain
    if method == "ga":
        x, y, sign = xf, yf, -1.0
    elif method == "rl":
        shift = torch.randint(1, num_classes, yf.shape, generator=generator).to(yf.device)
        x, y, sign = torch.cat([xr, xf]), torch.cat([yr, (yf + shift) % num_classes]), 1.0
    else:
        x, y, sign = xr, yr, 1.0
    optimizer = torch.optim.SGD(student.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    student.train()
    steps = epochs * -(-len(y) // batch_size)
    step = 0
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=generator).split(batch_size):
            idx = idx.to(y.device)
            loss = sign * F.cross_entropy(student(x[idx]), y[idx])
            if method == "l1-sparse":
                current = alpha * (1.0 - step / steps)
                loss = loss + current * sum(p.abs().sum() for p in student.parameters())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
    return student.eval()


@torch.no_grad()
def _true_class_confidence(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1024) -> tuple[Tensor, Tensor]:
    probs = torch.cat([model(x[i : i + batch_size]).softmax(dim=1) for i in range(0, len(y), batch_size)])
    return probs.gather(1, y.view(-1, 1)).flatten(), probs.argmax(dim=1)


def mia_efficacy(member_conf: Tensor, nonmember_conf: Tensor, forget_conf: Tensor) -> float:
    """MIA-Efficacy in percent: an SVC (C=3, RBF, gamma="auto") fitted on equal numbers of member and non-member
    true-class confidences; the share of the forget set's confidences predicted non-member."""
    from sklearn.svm import SVC

    n = min(len(member_conf), len(nonmember_conf))
    if n == 0 or len(forget_conf) == 0:
        raise ValueError("MIA-Efficacy needs members, non-members and forget samples, got an empty set")
    features = torch.cat([member_conf[:n], nonmember_conf[:n]]).cpu().double().numpy().reshape(-1, 1)
    labels = np.concatenate([np.ones(n), np.zeros(n)])
    svc = SVC(C=3, gamma="auto", kernel="rbf").fit(features, labels)
    predicted = svc.predict(forget_conf.cpu().double().numpy().reshape(-1, 1))
    return 100.0 * float((predicted == 0).mean())


def unlearning_metrics(
    model: nn.Module, forget: tuple[Tensor, Tensor], retain: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor]
) -> dict[str, float]:
    """UA, RA, TA and MIA-Efficacy (percent) of ``model`` (in eval mode; its mode is restored)."""
    was_training = model.training
    model.eval()
    try:
        conf_f, pred_f = _true_class_confidence(model, *forget)
        conf_r, pred_r = _true_class_confidence(model, *retain)
        conf_t, pred_t = _true_class_confidence(model, *test)
    finally:
        model.train(was_training)
    def accuracy(pred: Tensor, y: Tensor) -> float:
        return 100.0 * float((pred == y).float().mean())

    return {
        "UA": 100.0 - accuracy(pred_f, forget[1]),
        "RA": accuracy(pred_r, retain[1]),
        "TA": accuracy(pred_t, test[1]),
        "MIA": mia_efficacy(conf_r, conf_t, conf_f),
    }
