"""Worst-case forget sets for machine unlearning: "Challenging Forgets: Unveiling the Worst-Case Forget Sets in
Machine Unlearning" (Fan, Liu, Hero, Liu, ECCV 2024, arXiv:2403.07362; official code ``OPTML-Group/Unlearn-WorstCase``,
``data-wise/main_selmu.py``).

A bi-level search for the K training samples whose influence is hardest to erase. Per-sample weights
``w in [0, 1]^N`` with ``sum(w) = K``; the lower level is an approximate unlearner: from the original model theta_0,
sign-SGD (``p <- p - lr * sign(grad)``) on the weighted retain loss ``sum_i (1 - w_i) l_i(theta)`` (a plain sum) for
``lower_epochs`` epochs; the upper level minimises ``sum_i w_i l_i(theta(w)) + gamma ||w||^2`` over the capped simplex
with one projected gradient step ``w <- Proj(w - w_lr (l(theta(w)) + 2 gamma w))``, the losses taken in eval mode
over the whole training split without augmentation (sign steps make the implicit Jacobian vanish almost everywhere,
so only the direct gradient is used, as in the code). Samples whose loss stays low after unlearning gain weight: the
model still remembers them. After each upper step theta is reloaded from theta_0. The result is the top-K mask of w.
"""

from __future__ import annotations

import copy
import csv
import time
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_methods.base import ImageClassifier, load_pretrained_weights
from lit_methods.datamodules.batch import as_batch
from lit_methods.unlearning.methods import (
    check_unlearning_methods,
    check_unlearning_options,
    unlearn,
    unlearning_metrics,
)

__all__ = ["DEFAULT_UNLEARNING_LRS", "SignSGD", "WorstCaseForget", "project_capped_simplex", "top_k_mask"]

#: SGD rates of the unlearning methods on the original model (Unlearn-Sparse's ranges; retrain trains from scratch;
#: SCRUB: the WorstCase code's example command, 5e-4; boundary: Chen et al.'s 1e-5 is too small for a few CPU epochs,
#: so FT's 0.01 here, like EU-k/CF-k, which fine-tune; IU takes no rate, it is one Newton-like step)
DEFAULT_UNLEARNING_LRS = {
    "retrain": 0.1, "ft": 0.01, "ga": 1e-4, "rl": 0.01, "l1-sparse": 0.01, "boundary-shrink": 0.01,
    "boundary-expand": 0.01, "scrub": 5e-4, "eu-k": 0.01, "cf-k": 0.01,
}


def project_capped_simplex(w: Tensor, k: float, tol: float = 1e-5, max_iter: int = 100) -> Tensor:
    """The Euclidean projection of ``w`` onto ``{0 <= v <= 1, sum(v) = k}``: ``clamp(w - mu, 0, 1)`` with ``mu``
    found by bisection until the sum is within ``tol`` of ``k`` (at most ``max_iter`` halvings, as the official
    code; float64 inside)."""
    n = w.numel()
    if not 0 < k < n:
        raise ValueError(f"the forget-set size K must lie in (0, {n}), got {k}")
    x = w.double()
    low, high = float(x.min()) - 1.0, float(x.max())  # sum is n > k at low and 0 < k at high
    mu = (low + high) / 2
    for _ in range(max_iter):
        mu = (low + high) / 2
        total = float((x - mu).clamp(0.0, 1.0).sum())
        if abs(total - k) <= tol:
            break
        if total > k:
            low = mu
        else:
            high = mu
    return (x - mu).clamp(0.0, 1.0).to(w.dtype)


def top_k_mask(w: Tensor, k: int) -> Tensor:
    """A ``bool`` mask with exactly ``k`` ones at the ``k`` largest entries of ``w`` (ties by position)."""
    mask = torch.zeros(w.numel(), dtype=torch.bool, device=w.device)
    mask[torch.topk(w.flatten(), k, sorted=False).indices] = True
    return mask


class SignSGD(torch.optim.Optimizer):
    """``p <- p - lr * sign(grad)``: the lower level's optimiser (no state)."""

    def __init__(self, params: Any, lr: float) -> None:
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad.sign(), alpha=-group["lr"])
        return loss


class WorstCaseForget(ImageClassifier):
    """Selects the worst-case forget set of a trained classifier and judges unlearning methods on it.

    Trains on an :class:`~lit_methods.unlearning.IndexedDataModule` (training batches carry ``index``). Every
    Lightning epoch is one lower-level epoch of sign-SGD (the optimizer is :class:`SignSGD` with ``lr``, the code's
    ``theta_lr``); every ``lower_epochs`` epochs the upper step updates ``w`` and the backbone is reloaded from the
    original weights (kept in ``original_backbone``). Run ``upper_epochs * lower_epochs`` epochs. The weights
    ``selection_weights``, the current forget mask ``forget_mask`` (top-K of w) and the number of upper steps are
    buffers, so checkpoints hold them and a resumed run continues exactly. With ``binarize_every`` the weights are
    replaced by the top-K indicator every that many upper steps (the code's ``feq_to_bi``).

    When training ends, each method of ``unlearning_methods`` unlearns the worst-case set and ``random_sets`` random
    sets of the same size, starting from the original model; UA, RA, TA and MIA-Efficacy of each
    (:mod:`lit_methods.unlearning.methods`), and of the original model, with each method's run-time RTE (seconds), are
    written to ``unlearning_report.csv``, and
    the chosen indices to ``worst_case_forget_indices.txt``, next to the logs (``trainer.log_dir``); the rows are in
    :attr:`report`. The module reads the datamodule's in-memory training and test splits (``train_images``,
    ``test_images`` and ``to_inputs``) for the upper step and the report.

    Args:
        backbone: the original classifier (trained on all data, or loaded from ``pretrained_checkpoint``).
        forget_size: K, as a count (int) or a fraction of the training split (float in (0, 1); paper: 10 %).
        lower_epochs: sign-SGD epochs of the lower level per upper step (code's ``unlearn_steps``: 2-10).
        w_lr: the upper step (code: 0.01).
        gamma: the weights' L2 penalty (code default 0).
        binarize_every: binarise w every this many upper steps (0: never).
        easiest: step up instead of down (the code's ``re_optm``): the easiest-to-forget set instead.
        pretrained_checkpoint: a Lightning checkpoint of an :class:`~lit_methods.ImageClassifier` (its
            ``backbone.*`` weights) or a plain backbone ``state_dict``, loaded once in ``setup``.
        unlearning_methods: methods judged at the end, among
            :data:`~lit_methods.unlearning.methods.UNLEARNING_METHODS` (``retrain``, ``ft``, ``ga``, ``rl``,
            ``l1-sparse``, ``iu``, ``boundary-shrink``, ``boundary-expand``, ``scrub``, ``eu-k``, ``cf-k``).
        unlearning_epochs: epochs of every iterative unlearning method (retrain included).
        unlearning_lrs: SGD rate per method (defaults: :data:`DEFAULT_UNLEARNING_LRS`).
        unlearning_options: method options passed to :func:`~lit_methods.unlearning.unlearn` (keys of
            :data:`~lit_methods.unlearning.methods.UNLEARNING_OPTIONS`, e.g. ``last_layers`` for EU-k/CF-k,
            ``iu_damping``, ``scrub_max_epochs``).
        random_sets: random forget sets of size K the worst-case set is compared with (seeds 0, 1, ...).
        lr: the sign-SGD step (code's ``theta_lr``: 1e-3).
        **kwargs: see :class:`~lit_methods.ImageClassifier`.
    """

    slug: ClassVar[str] = "worst-case-forget"

    def __init__(
        self,
        backbone: nn.Module,
        forget_size: int | float = 0.1,
        lower_epochs: int = 2,
        w_lr: float = 0.01,
        gamma: float = 0.0,
        binarize_every: int = 0,
        easiest: bool = False,
        pretrained_checkpoint: str | None = None,
        unlearning_methods: list[str] | None = None,
        unlearning_epochs: int = 10,
        unlearning_lrs: dict[str, float] | None = None,
        unlearning_options: dict[str, Any] | None = None,
        random_sets: int = 1,
        lr: float = 1e-3,
        lr_schedule: str = "constant",
        weight_decay: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(backbone, lr=lr, lr_schedule=lr_schedule, weight_decay=weight_decay, **kwargs)
        if isinstance(forget_size, bool) or not (
            (isinstance(forget_size, int) and forget_size >= 1)
            or (isinstance(forget_size, float) and 0.0 < forget_size < 1.0)
        ):
            raise ValueError(f"forget_size must be a count >= 1 or a fraction in (0, 1), got {forget_size!r}")
        for name, value, minimum in (
            ("lower_epochs", lower_epochs, 1),
            ("binarize_every", binarize_every, 0),
            ("unlearning_epochs", unlearning_epochs, 1),
            ("random_sets", random_sets, 0),
        ):
            if value < minimum:
                raise ValueError(f"{name} must be >= {minimum}, got {value}")
        if not w_lr > 0:
            raise ValueError(f"w_lr must be > 0, got {w_lr}")
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        methods = ["ft", "ga", "rl", "l1-sparse"] if unlearning_methods is None else list(unlearning_methods)
        options = dict(unlearning_options or {})
        check_unlearning_options(options)
        check_unlearning_methods(methods)
        lrs = dict(DEFAULT_UNLEARNING_LRS) | dict(unlearning_lrs or {})
        check_unlearning_methods(list(lrs))
        bad_lrs = {m: v for m, v in lrs.items() if not v > 0}
        if bad_lrs:
            raise ValueError(f"unlearning_lrs must be > 0, got {bad_lrs}")
        self.forget_size = forget_size
        self.lower_epochs = lower_epochs
        self.w_lr = w_lr
        self.gamma = gamma
        self.binarize_every = binarize_every
        self.easiest = easiest
        self.pretrained_checkpoint = pretrained_checkpoint
        self.unlearning_methods = methods
        self.unlearning_epochs = unlearning_epochs
        self.unlearning_lrs = lrs
        self.unlearning_options = options
        self.random_sets = random_sets
        self.original_backbone = copy.deepcopy(self.backbone).requires_grad_(False)
        self.register_buffer("selection_weights", torch.zeros(0))
        self.register_buffer("forget_mask", torch.zeros(0, dtype=torch.bool))
        self.register_buffer("upper_steps", torch.zeros((), dtype=torch.long))
        self.report: list[dict[str, Any]] = []
        self._pretrained_loaded = False

    # -- set-up ----------------------------------------------------------------------------------------------------
    def make_default_optimizer(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        return SignSGD(groups, lr=self.lr)

    def forget_count(self, num_samples: int) -> int:
        """K for a training split of ``num_samples``; ``ValueError`` when it is not in (0, num_samples)."""
        k = self.forget_size if isinstance(self.forget_size, int) else round(self.forget_size * num_samples)
        if not 0 < k < num_samples:
            raise ValueError(
                f"the forget set must hold K in (0, {num_samples}) samples of the training split, got K={k} "
                f"(forget_size={self.forget_size!r})"
            )
        return k

    def setup(self, stage: str) -> None:
        if self.pretrained_checkpoint is not None and not self._pretrained_loaded:
            load_pretrained_weights(self.backbone, self.pretrained_checkpoint, {"backbone.": ""})
            self._pretrained_loaded = True
        if stage == "fit" and self.selection_weights.numel() == 0:
            labels = self._data().train_labels
            n = len(labels)
            k = self.forget_count(n)
            self.original_backbone.load_state_dict(self.backbone.state_dict())
            self.selection_weights = torch.full((n,), k / n, device=self.device)
            self.forget_mask = top_k_mask(self.selection_weights, k)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("state_dict", {})
        for name in ("selection_weights", "forget_mask"):
            if name in state:
                setattr(self, name, torch.empty_like(state[name], device=self.device))

    def _data(self) -> Any:
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is None or getattr(dm, "train_labels", None) is None:
            raise RuntimeError(
                "WorstCaseForget reads the in-memory training split of its datamodule (an IndexedDataModule): fit it "
                "with one"
            )
        return dm

    # -- lower level -------------------------------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        batch = as_batch(batch)
        if "index" not in batch:
            raise ValueError("WorstCaseForget needs each sample's index: wrap the datamodule in an IndexedDataModule")
        logits = self(batch["inputs"])
        losses = F.cross_entropy(logits, batch["targets"], reduction="none")
        retain_weights = 1.0 - self.selection_weights[batch["index"].to(self.selection_weights.device)]
        loss = (retain_weights * losses).sum()
        self.log("train/weighted_retain_loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        self._update_metrics("train", logits, batch["targets"])
        return loss

    # -- upper level -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _inputs_and_labels(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        return self._data().to_inputs(images.to(self.device)), labels.to(self.device)

    @torch.no_grad()
    def per_sample_losses(self, model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1024) -> Tensor:
        """Cross-entropy of every sample under ``model`` in eval mode (its mode is restored)."""
        was_training = model.training
        model.eval()
        try:
            inputs = x if self.normalize is None else self.normalize(x)
            return torch.cat(
                [F.cross_entropy(model(inputs[i : i + batch_size]), y[i : i + batch_size], reduction="none")
                 for i in range(0, len(y), batch_size)]
            )
        finally:
            model.train(was_training)

    def on_train_epoch_end(self) -> None:
        if (self.current_epoch + 1) % self.lower_epochs:
            return
        dm = self._data()
        x, y = self._inputs_and_labels(dm.train_images, dm.train_labels)
        losses = self.per_sample_losses(self.backbone, x, y).to(self.selection_weights)
        k = self.forget_count(len(y))
        w = self.selection_weights
        gradient = losses + 2.0 * self.gamma * w
        stepped = w + self.w_lr * gradient if self.easiest else w - self.w_lr * gradient
        w = project_capped_simplex(stepped, k)
        self.upper_steps += 1
        if self.binarize_every and int(self.upper_steps) % self.binarize_every == 0:
            w = top_k_mask(w, k).to(w.dtype)
        self.selection_weights.copy_(w)
        self.forget_mask.copy_(top_k_mask(w, k))
        self.backbone.load_state_dict(self.original_backbone.state_dict())
        self.log("select/forget_loss", losses[self.forget_mask].mean(), on_epoch=True)
        self.log("select/retain_loss", losses[~self.forget_mask].mean(), on_epoch=True)

    # -- judging unlearning methods ------------------------------------------------------------------------------
    def classifier(self, backbone: nn.Module) -> nn.Module:
        """``backbone`` behind this module's input normalisation (the unlearning methods see model inputs)."""
        return backbone if self.normalize is None else nn.Sequential(copy.deepcopy(self.normalize), backbone)

    def judge(self, mask: Tensor, seed: int = 0) -> dict[str, dict[str, Any]]:
        """UA, RA, TA and MIA-Efficacy of the original model and of every unlearning method on the forget set
        ``mask`` (a ``bool`` mask of the training split), with each method's run-time RTE in seconds (wall clock;
        empty for the original)."""
        dm = self._data()
        dm.setup("test")
        x, y = self._inputs_and_labels(dm.train_images, dm.train_labels)
        test = self._inputs_and_labels(dm.test_images, dm.test_labels)
        mask = mask.to(x.device)
        forget, retain = (x[mask], y[mask]), (x[~mask], y[~mask])
        original = self.classifier(self.original_backbone)
        rows: dict[str, dict[str, Any]] = {
            "original": unlearning_metrics(original, forget, retain, test) | {"RTE": ""}
        }
        for method in self.unlearning_methods:
            start = time.perf_counter()
            model = unlearn(
                original, method, forget, retain, self.num_classes, self.unlearning_epochs,
                self.unlearning_lrs.get(method, 1.0), seed=seed, **self.unlearning_options,
            )
            elapsed = time.perf_counter() - start
            rows[method] = unlearning_metrics(model, forget, retain, test) | {"RTE": elapsed}
        return rows

    def on_train_end(self) -> None:
        if not self.unlearning_methods or self.forget_mask.numel() == 0:
            return
        n, k = self.forget_mask.numel(), int(self.forget_mask.sum())
        sets = {"worst-case" if not self.easiest else "easiest": self.forget_mask}
        for seed in range(self.random_sets):
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
            random_mask = torch.zeros(n, dtype=torch.bool)
            random_mask[order[:k]] = True
            sets[f"random-{seed}"] = random_mask
        self.report = []
        for name, mask in sets.items():
            for method, metrics in self.judge(mask).items():
                self.report.append({"forget_set": name, "method": method, **metrics})
        log_dir = self.trainer.log_dir
        if self.trainer.is_global_zero and log_dir is not None:
            folder = Path(log_dir)
            folder.mkdir(parents=True, exist_ok=True)
            with open(folder / "unlearning_report.csv", "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=["forget_set", "method", "UA", "RA", "TA", "MIA", "RTE"])
                writer.writeheader()
                writer.writerows(
                    {k: (f"{v:.4f}" if k == "RTE" else f"{v:.2f}") if isinstance(v, float) else v
                     for k, v in row.items()}
                    for row in self.report
                )
            indices = self.forget_mask.nonzero().flatten().tolist()
            (folder / "worst_case_forget_indices.txt").write_text("\n".join(map(str, indices)) + "\n")

