"""Approximate unlearning methods and the metrics that judge them, as used by "Challenging Forgets" (Fan et al.,
ECCV 2024, arXiv:2403.07362, built on Unlearn-Sparse, Jia et al., arXiv:2304.04934; official code
``OPTML-Group/Unlearn-WorstCase``, ``data-wise/unlearn/`` and ``data-wise/evaluation/SVC_MIA.py``, and
``OPTML-Group/Unlearn-Sparse``, ``unlearn/Wfisher.py`` for IU).

Every method starts from a copy of the original model (the original is never modified) and, except ``iu``, trains it
with SGD(``lr``, ``momentum``, ``weight_decay``) on shuffled batches of in-memory tensors (inputs already as the model
takes them):

* ``retrain``: from a fresh initialisation on the retain set D_r (the gold standard);
* ``ft``: fine-tuning on D_r;
* ``ga``: gradient ascent on the forget set D_f;
* ``rl``: random labels: D_f with labels drawn uniformly among the other classes, trained together with D_r;
* ``l1-sparse``: fine-tuning on D_r plus ``alpha_t * ||theta||_1``, ``alpha_t`` decaying linearly from ``alpha``
  to 0 over the run;
* ``iu``: influence unlearning, one step ``theta + iu_scale * F^-1 v`` with ``v = n_f / n * (mean grad on D_f - mean
  grad on D_r)`` and ``F = iu_damping * I + mean_i g_i g_i^T`` the WoodFisher (damped empirical Fisher) of
  ``iu_samples`` retain samples (:mod:`lit_methods.unlearning.influence`);
* ``boundary-shrink`` (Chen et al., CVPR 2023): fine-tune on D_f relabelled with the class an FGSM step of size
  ``boundary_bound`` (in model-input units) pushes each sample to under the original model, its nearest wrong class;
* ``boundary-expand`` (same paper): a shadow class is added to the last linear layer, D_f is trained towards it, and
  the shadow output is removed again;
* ``scrub`` (Kurmanji et al., NeurIPS 2023, arXiv:2302.09880): a student (the model) and a frozen teacher (the
  original); in each of the first ``scrub_max_epochs`` epochs a max pass over D_f (minimise ``-KL(teacher||student)``)
  is followed by the min pass over D_r (``scrub_gamma * CE + scrub_alpha * KL``), later epochs run the min pass only;
  temperature ``scrub_temperature``, the rate divided by 10 after epochs 3, 5 and 9 (the code's ``lr_decay_epochs``);
* ``eu-k`` / ``cf-k`` (Goel et al., arXiv:2201.06640): exact / catastrophic forgetting of the last ``last_layers``
  layers: the last ``last_layers`` weight layers (``Conv2d``/``Linear``, and the normalisation layers after them) are
  re-initialised (EU) or kept (CF) and fine-tuned on D_r; every other layer stays frozen, in eval mode, bit-identical.

Where this differs from the official code (each change named in the function that makes it): IU uses the exact
Woodbury inverse of the damped Fisher where the code approximates the Sherman-Morrison recursion; SCRUB interleaves the
max and min passes as the SCRUB paper (the WorstCase code runs max-only epochs then min-only ones) and drops the
weight-averaging penalty (``smoothing`` defaults to 0 there); EU re-initialises once with PyTorch's default
initialisation (the code re-initialises with N(0, 1) at every epoch) and counts layers among leaf modules only (the
code's walk over all modules unfreezes whole blocks when it meets their containers); boundary-shrink does not clamp or
round the FGSM image, which is in model-input units here, not [0, 1] pixels.

The metrics (in percent): UA = 100 - accuracy on D_f, RA = accuracy on D_r, TA = test accuracy, and MIA-Efficacy:
an SVC (C=3, RBF, gamma="auto") fitted on the true-class confidence of shadow members (the first |D_test| samples of
D_r) against non-members (D_test), the share of D_f it calls non-members.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_methods.unlearning.influence import influence_unlearn

__all__ = [
    "UNLEARNING_METHODS",
    "UNLEARNING_OPTIONS",
    "boundary_shrink_labels",
    "check_unlearning_methods",
    "check_unlearning_options",
    "layer_split",
    "mia_efficacy",
    "scrub_kl",
    "unlearn",
    "unlearning_metrics",
]

UNLEARNING_METHODS = (
    "retrain", "ft", "ga", "rl", "l1-sparse", "iu", "boundary-shrink", "boundary-expand", "scrub", "eu-k", "cf-k"
)

#: the method-specific keyword arguments of :func:`unlearn` (and their types), settable per run
UNLEARNING_OPTIONS: dict[str, type] = {
    "batch_size": int,
    "momentum": float,
    "weight_decay": float,
    "alpha": float,
    "iu_scale": float,
    "iu_damping": float,
    "iu_samples": int,
    "boundary_bound": float,
    "scrub_max_epochs": int,
    "scrub_gamma": float,
    "scrub_alpha": float,
    "scrub_temperature": float,
    "last_layers": int,
}

#: epochs after which SCRUB's rate is divided by 10 (the code's ``lr_decay_epochs`` and ``lr_decay_rate``)
SCRUB_LR_DECAY_EPOCHS = (3, 5, 9)


def check_unlearning_methods(methods: Sequence[str]) -> None:
    """``ValueError`` naming any method of ``methods`` that is not one of :data:`UNLEARNING_METHODS`."""
    unknown = [m for m in methods if m not in UNLEARNING_METHODS]
    if unknown:
        raise ValueError(f"unknown unlearning method(s) {unknown}: choose among {list(UNLEARNING_METHODS)}")


def check_unlearning_options(options: dict[str, Any]) -> None:
    """``ValueError`` naming any key of ``options`` that is not one of :data:`UNLEARNING_OPTIONS`, or a value of the
    wrong type."""
    unknown = sorted(set(options) - set(UNLEARNING_OPTIONS))
    if unknown:
        raise ValueError(f"unknown unlearning option(s) {unknown}: choose among {sorted(UNLEARNING_OPTIONS)}")
    for name, value in options.items():
        kind = UNLEARNING_OPTIONS[name]
        if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
            raise ValueError(f"unlearning option {name} must be {kind.__name__}, got {value!r}")


def _reinitialise(model: nn.Module) -> None:
    for module in model.modules():
        if module is not model and hasattr(module, "reset_parameters"):
            module.reset_parameters()


def layer_split(model: nn.Module, last_layers: int) -> tuple[list[nn.Module], list[nn.Module]]:
    """(frozen, trained) leaf modules with parameters for EU-k / CF-k: walking the leaves backwards, the trained ones
    run up to and including the ``last_layers``-th ``Conv2d``/``Linear`` (normalisation layers after it included).
    ``ValueError`` when the model has fewer weight layers."""
    leaves = [m for m in model.modules() if not list(m.children()) and any(True for _ in m.parameters(recurse=False))]
    weight_layers = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in leaves)
    if not 1 <= last_layers <= weight_layers:
        raise ValueError(f"last_layers must lie in [1, {weight_layers}] (the model's Conv2d/Linear layers), "
                         f"got {last_layers}")
    trained: list[nn.Module] = []
    seen = 0
    for module in reversed(leaves):
        if seen == last_layers:
            break
        trained.append(module)
        seen += isinstance(module, (nn.Conv2d, nn.Linear))
    trained_ids = {id(m) for m in trained}
    return [m for m in leaves if id(m) not in trained_ids], trained[::-1]


def _last_linear(model: nn.Module) -> tuple[nn.Module, str, nn.Linear]:
    found = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            found = name, module
    if found is None:
        raise ValueError("boundary-expand needs a model whose classifier is an nn.Linear; none found")
    name, layer = found
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    return parent, name.rpartition(".")[2], layer


def _resize_head(model: nn.Module, outputs: int) -> None:
    """Replace the last linear layer by one with ``outputs`` outputs, keeping the rows both share."""
    parent, attribute, old = _last_linear(model)
    new = nn.Linear(old.in_features, outputs, bias=old.bias is not None, device=old.weight.device,
                    dtype=old.weight.dtype)
    keep = min(outputs, old.out_features)
    with torch.no_grad():
        new.weight[:keep] = old.weight[:keep]
        if old.bias is not None:
            new.bias[:keep] = old.bias[:keep]
    setattr(parent, attribute, new)


def boundary_shrink_labels(model: nn.Module, x: Tensor, y: Tensor, bound: float, batch_size: int = 1024) -> Tensor:
    """Boundary shrink's targets: the class ``model`` (in eval mode) predicts for ``x + bound * sign(grad_x CE)``, one
    FGSM step away from the true class ``y`` (the nearest class across the decision boundary; it can stay ``y`` where
    the step does not cross it)."""
    was_training = model.training
    model.eval()
    labels = []
    try:
        for i in range(0, len(y), batch_size):
            xb = x[i : i + batch_size].detach().clone().requires_grad_(True)
            loss = F.cross_entropy(model(xb), y[i : i + batch_size])
            (grad,) = torch.autograd.grad(loss, xb)
            with torch.no_grad():
                labels.append(model(xb + bound * grad.sign()).argmax(dim=1))
    finally:
        model.train(was_training)
    return torch.cat(labels)


def scrub_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """SCRUB's distillation term: ``KL(softmax(t/T) || softmax(s/T)) * T^2``, summed over classes, batch mean."""
    log_student = F.log_softmax(student_logits / temperature, dim=1)
    teacher = F.softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_student, teacher, reduction="sum") * temperature**2 / len(student_logits)


def _sgd_passes(
    params: list[nn.Parameter],
    passes: Callable[[int], list[tuple[Tensor, Callable[[Tensor], Tensor]]]],
    epochs: int,
    lr: float,
    momentum: float,
    weight_decay: float,
    batch_size: int,
    generator: torch.Generator,
    on_epoch: Callable[[int, torch.optim.Optimizer], None] | None = None,
) -> None:
    """SGD over ``epochs`` epochs; ``passes(epoch)`` lists the (sample count, batch-loss) passes of that epoch, run in
    order, each over a fresh shuffle of its samples drawn from ``generator``; the loss takes the batch's indices."""
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    for epoch in range(epochs):
        if on_epoch is not None:
            on_epoch(epoch, optimizer)
        for count, batch_loss in passes(epoch):
            for idx in torch.randperm(int(count), generator=generator).split(batch_size):
                loss = batch_loss(idx)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()


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
    iu_scale: float = 1.0,
    iu_damping: float = 1.0,
    iu_samples: int = 1000,
    boundary_bound: float = 0.1,
    scrub_max_epochs: int = 2,
    scrub_gamma: float = 0.99,
    scrub_alpha: float = 0.001,
    scrub_temperature: float = 4.0,
    last_layers: int = 1,
    seed: int = 0,
) -> nn.Module:
    """A copy of ``model`` unlearnt of ``forget`` = (inputs, labels) by ``method`` (see the module doc), trained for
    ``epochs`` epochs with SGD(``lr``, ``momentum``, ``weight_decay``) on shuffled batches drawn with ``seed`` (``iu``
    takes one step and uses neither). Defaults of the method options: the official code's (``iu_damping`` 1 and
    ``iu_samples`` 1000 are the identity start and the ``N`` of its WoodFisher recursion; boundary's FGSM bound 0.1;
    SCRUB's gamma 0.99, alpha 0.001, T 4, 2 max epochs = its ``m_steps`` 1 counted inclusively; EU/CF's k = 1)."""
    check_unlearning_methods([method])
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    for name, value in (("iu_damping", iu_damping), ("boundary_bound", boundary_bound),
                        ("scrub_temperature", scrub_temperature)):
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    if iu_samples < 1:
        raise ValueError(f"iu_samples must be >= 1, got {iu_samples}")
    if scrub_max_epochs < 0:
        raise ValueError(f"scrub_max_epochs must be >= 0, got {scrub_max_epochs}")
    generator = torch.Generator().manual_seed(seed)
    student = copy.deepcopy(model)
    for p in student.parameters():
        p.requires_grad_(True)
    (xf, yf), (xr, yr) = forget, retain
    if method == "iu":
        influence_unlearn(student, forget, retain, scale=iu_scale, damping=iu_damping, samples=iu_samples)
        return student.eval()
    if method == "retrain":
        torch.manual_seed(seed)
        _reinitialise(student)

    def cross_entropy(x: Tensor, y: Tensor, sign: float = 1.0) -> Callable[[Tensor], Tensor]:
        return lambda idx: sign * F.cross_entropy(student(x[idx.to(x.device)]), y[idx.to(y.device)])

    params = list(student.parameters())
    options: dict[str, Any] = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay,
                               "batch_size": batch_size, "generator": generator}
    student.train()
    if method in ("retrain", "ft"):
        _sgd_passes(params, lambda e: [(len(yr), cross_entropy(xr, yr))], epochs, **options)
    elif method == "ga":
        _sgd_passes(params, lambda e: [(len(yf), cross_entropy(xf, yf, -1.0))], epochs, **options)
    elif method == "rl":
        shift = torch.randint(1, num_classes, yf.shape, generator=generator).to(yf.device)
        x, y = torch.cat([xr, xf]), torch.cat([yr, (yf + shift) % num_classes])
        _sgd_passes(params, lambda e: [(len(y), cross_entropy(x, y))], epochs, **options)
    elif method == "l1-sparse":
        steps = epochs * -(-len(yr) // batch_size)
        step = [0]

        def l1_loss(idx: Tensor) -> Tensor:
            current = alpha * (1.0 - step[0] / steps)
            step[0] += 1
            return cross_entropy(xr, yr)(idx) + current * sum(p.abs().sum() for p in student.parameters())

        _sgd_passes(params, lambda e: [(len(yr), l1_loss)], epochs, **options)
    elif method == "boundary-shrink":
        targets = boundary_shrink_labels(model, xf, yf, boundary_bound)
        _sgd_passes(params, lambda e: [(len(yf), cross_entropy(xf, targets))], epochs, **options)
    elif method == "boundary-expand":
        _resize_head(student, num_classes + 1)
        shadow = torch.full_like(yf, num_classes)
        _sgd_passes(list(student.parameters()), lambda e: [(len(yf), cross_entropy(xf, shadow))], epochs,
                    **options)
        _resize_head(student, num_classes)
    elif method == "scrub":
        _scrub(student, model, forget, retain, epochs, scrub_max_epochs, scrub_gamma, scrub_alpha,
               scrub_temperature, options)
    else:  # eu-k, cf-k
        frozen, trained = layer_split(student, last_layers)
        if method == "eu-k":
            torch.manual_seed(seed)
            for module in trained:
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
        for module in frozen:
            module.requires_grad_(False).eval()
        trained_params = [p for m in trained for p in m.parameters()]
        _sgd_passes(trained_params, lambda e: [(len(yr), cross_entropy(xr, yr))], epochs, **options)
        for module in frozen:
            module.requires_grad_(True)
    return student.eval()


def _scrub(
    student: nn.Module,
    original: nn.Module,
    forget: tuple[Tensor, Tensor],
    retain: tuple[Tensor, Tensor],
    epochs: int,
    max_epochs: int,
    gamma: float,
    alpha: float,
    temperature: float,
    options: dict[str, Any],
) -> None:
    """SCRUB's alternation (see the module doc) on ``student`` with ``original`` as the frozen teacher."""
    teacher = copy.deepcopy(original).eval().requires_grad_(False)
    (xf, _), (xr, yr) = forget, retain

    def max_loss(idx: Tensor) -> Tensor:
        x = xf[idx.to(xf.device)]
        with torch.no_grad():
            target = teacher(x)
        return -scrub_kl(student(x), target, temperature)

    def min_loss(idx: Tensor) -> Tensor:
        x, y = xr[idx.to(xr.device)], yr[idx.to(yr.device)]
        with torch.no_grad():
            target = teacher(x)
        logits = student(x)
        return gamma * F.cross_entropy(logits, y) + alpha * scrub_kl(logits, target, temperature)

    def passes(epoch: int) -> list[tuple[int, Callable[[Tensor], Tensor]]]:
        return ([(len(xf), max_loss)] if epoch < max_epochs else []) + [(len(yr), min_loss)]

    def decay(epoch: int, optimizer: torch.optim.Optimizer) -> None:
        for group in optimizer.param_groups:
            group["lr"] = options["lr"] * 0.1 ** sum(epoch > e for e in SCRUB_LR_DECAY_EPOCHS)

    _sgd_passes(list(student.parameters()), passes, epochs, on_epoch=decay, **options)


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
