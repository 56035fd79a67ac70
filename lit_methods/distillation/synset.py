"""The synthetic set as a file, as a picture, and the shared evaluation protocol (function and callback).

Evaluation follows the protocol of the dataset-condensation papers (Zhao et al., arXiv:2006.05929, and every method of
this family): fresh randomly initialised ConvNets are trained on the synthetic set only (SGD momentum 0.9, weight
decay 5e-4, the learning rate x0.1 once half-way, each batch augmented by DSA with per-image parameters), then tested
on the real test split; the mean and the (population) standard deviation of the test accuracies over the nets are
reported. The official loop runs ``E + 1`` epochs with the decay at ``E // 2 + 1``; here ``E`` epochs with the decay
after ``E // 2``. Everything random is drawn from generators seeded by ``seed``, so a call is deterministic.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from torch import Tensor, nn

from lit_methods.distillation.augment import DSA, DEFAULT_STRATEGY
from lit_methods.nets import ConvNet

__all__ = [
    "SYNSET_KEYS",
    "EvaluationSettings",
    "SyntheticSetEvaluator",
    "evaluate_synset",
    "load_synset",
    "save_synset",
    "save_synset_grid",
    "synset_grid",
]

SYNSET_KEYS = ("images", "labels", "lr", "num_classes", "ipc", "space", "mean", "std")
"""What a synthetic-set file holds: ``images`` (class-major, ``ipc`` per class), ``labels`` (int classes or soft
rows), ``lr`` (a learned evaluation rate or None), ``space`` ("normalized", "pixels" or "zca"), ``mean``/``std`` of
the data (for pictures), and ``zca_mean``/``zca_matrix`` when ``space == "zca"``."""


def save_synset(path: str | Path, synset: Mapping[str, Any]) -> Path:
    """Write a synthetic set (:data:`SYNSET_KEYS`) with ``torch.save``; CPU tensors, loadable with weights_only."""
    missing = [key for key in SYNSET_KEYS if key not in synset]
    if missing:
        raise ValueError(f"a synthetic set needs {missing}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cpu = {k: v.detach().cpu() if isinstance(v, Tensor) else v for k, v in synset.items()}
    torch.save(cpu, path)
    return path


def load_synset(
    path: str | Path, num_classes: int | None = None, image_shape: tuple[int, ...] | None = None
) -> dict[str, Any]:
    """Read a synthetic-set file and check it against the data it will be evaluated on; a ``ValueError`` names the
    mismatch (classes, image shape, labels) before anything trains."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no synthetic-set file at {str(path)!r}")
    synset = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(synset, dict) or any(key not in synset for key in SYNSET_KEYS):
        raise ValueError(f"{path} is not a synthetic-set file (it needs the keys {SYNSET_KEYS})")
    images, labels = synset["images"], synset["labels"]
    if images.ndim != 4 or len(images) != synset["num_classes"] * synset["ipc"]:
        raise ValueError(
            f"{path}: images of shape {tuple(images.shape)} are not num_classes={synset['num_classes']} x "
            f"ipc={synset['ipc']} images"
        )
    if len(labels) != len(images):
        raise ValueError(f"{path}: {len(images)} images but {len(labels)} labels")
    if num_classes is not None and synset["num_classes"] != num_classes:
        raise ValueError(f"{path} holds {synset['num_classes']} classes but the data has {num_classes}")
    if image_shape is not None and tuple(images.shape[1:]) != tuple(image_shape):
        raise ValueError(
            f"{path} holds images of shape {tuple(images.shape[1:])} but the data's images are {tuple(image_shape)}"
        )
    return synset


def synset_grid(images: Tensor, ipc: int, mean: Any = None, std: Any = None) -> Tensor:
    """One image of the synthetic set, a row per class (``ipc`` images each), in [0, 1] for viewing: normalized
    images are mapped back with ``mean``/``std``, every image is then clipped (ZCA images are min-max scaled)."""
    from torchvision.utils import make_grid

    images = images.detach().cpu().float()
    if mean is not None and std is not None:
        images = images * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)
    else:
        low, high = images.amin(), images.amax()
        images = (images - low) / (high - low).clamp_min(1e-8)
    return make_grid(images.clamp(0, 1), nrow=ipc, padding=1, pad_value=1.0)


def save_synset_grid(path: str | Path, images: Tensor, ipc: int, mean: Any = None, std: Any = None) -> Path:
    """Save :func:`synset_grid` as a PNG (upscaled so that 8x8 images stay visible)."""
    from torchvision.utils import save_image

    grid = synset_grid(images, ipc, mean, std)
    scale = max(1, 256 // max(grid.shape[-2:]))
    if scale > 1:
        grid = F.interpolate(grid.unsqueeze(0), scale_factor=scale, mode="nearest").squeeze(0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, path)
    return path


@dataclass(frozen=True)
class EvaluationSettings:
    """The evaluation protocol's knobs (defaults: the DC/DSA/DM/DCC papers on CIFAR; TESLA uses 3 nets and the
    learned rate, DataDAM's code 10 nets, batch 64 and 1800 epochs).

    Args:
        num_nets: fresh nets trained and tested.
        epochs: training epochs on the synthetic set.
        lr: SGD learning rate (a synthetic set's learned rate replaces it when ``use_learned_lr``).
        batch_size: synthetic images per step.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        dsa: augment every training batch with DSA (per-image parameters).
        dsa_strategy: DSA op groups.
        always_flip: FYI's DSA variant (flip always applied, then one other op).
        use_learned_lr: train with the set's learned rate when it has one (MTT/TESLA).
        depth: ConvNet depth.
        width: ConvNet width.
        norm: ConvNet norm.
        seed: seeds the nets' initialisation, the batch order and DSA.
    """

    num_nets: int = 20
    epochs: int = 1000
    lr: float = 0.01
    batch_size: int = 256
    momentum: float = 0.9
    weight_decay: float = 5e-4
    dsa: bool = True
    dsa_strategy: str = DEFAULT_STRATEGY
    always_flip: bool = False
    use_learned_lr: bool = True
    depth: int = 3
    width: int = 128
    norm: str = "instancenorm"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_nets", "epochs", "batch_size", "depth", "width"):
            if getattr(self, name) < 1:
                raise ValueError(f"evaluation {name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"evaluation lr must be > 0, got {self.lr}")


def make_eval_net(settings: EvaluationSettings, num_classes: int, image_shape: tuple[int, int, int]) -> nn.Module:
    channels, height, width = image_shape
    return ConvNet(
        num_classes=num_classes,
        in_channels=channels,
        depth=settings.depth,
        width=settings.width,
        norm=settings.norm,  # type: ignore[arg-type]
        image_size=(height, width),
    )


def train_on_synset(
    net: nn.Module,
    images: Tensor,
    labels: Tensor,
    settings: EvaluationSettings,
    lr: float,
    generator: torch.Generator,
) -> nn.Module:
    """Train ``net`` on the synthetic set alone (the protocol's training half); hard or soft ``labels``."""
    augment = DSA(settings.dsa_strategy, settings.always_flip) if settings.dsa else None
    optimizer = torch.optim.SGD(
        net.parameters(), lr=lr, momentum=settings.momentum, weight_decay=settings.weight_decay
    )
    net.train()
    for epoch in range(settings.epochs):
        if epoch == settings.epochs // 2 and epoch > 0:
            for group in optimizer.param_groups:
                group["lr"] = lr * 0.1
        order = torch.randperm(len(images), generator=generator).to(images.device)
        for index in order.split(settings.batch_size):
            batch = images[index]
            if augment is not None:
                batch = augment(batch, generator, siamese=False)
            loss = F.cross_entropy(net(batch), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return net


@torch.no_grad()
def test_accuracy(net: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 1024) -> float:
    net.eval()
    correct = 0
    for start in range(0, len(images), batch_size):
        logits = net(images[start : start + batch_size])
        correct += int((logits.argmax(1) == labels[start : start + batch_size]).sum())
    return correct / len(images)


def evaluate_synset(
    images: Tensor,
    labels: Tensor,
    test_images: Tensor,
    test_labels: Tensor,
    settings: EvaluationSettings,
    learned_lr: float | None = None,
) -> tuple[float, float, list[float]]:
    """Train ``settings.num_nets`` fresh ConvNets on ``(images, labels)`` and test each on the real test split.

    ``images`` and ``test_images`` live in the same space (normalized, pixels or ZCA) on one device. Returns the
    mean and population std of the test accuracies and the accuracies themselves. Deterministic for a seed.
    """
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} synthetic images but {len(labels)} labels")
    if tuple(images.shape[1:]) != tuple(test_images.shape[1:]):
        raise ValueError(
            f"synthetic images of shape {tuple(images.shape[1:])} do not match test images "
            f"{tuple(test_images.shape[1:])}"
        )
    num_classes = labels.shape[1] if labels.is_floating_point() else int(test_labels.max()) + 1
    if not labels.is_floating_point():
        num_classes = max(num_classes, int(labels.max()) + 1)
    lr = learned_lr if (settings.use_learned_lr and learned_lr is not None) else settings.lr
    images, labels = images.detach(), labels.detach()
    accuracies = []
    for index in range(settings.num_nets):
        seed = int(np.random.SeedSequence([settings.seed, index]).generate_state(1)[0])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = make_eval_net(settings, num_classes, tuple(images.shape[1:])).to(images.device)
        generator = torch.Generator().manual_seed(seed)
        with torch.enable_grad():
            train_on_synset(net, images, labels, settings, lr, generator)
        accuracies.append(test_accuracy(net, test_images, test_labels))
    return float(np.mean(accuracies)), float(np.std(accuracies)), accuracies


def run_directory(trainer: L.Trainer) -> Path:
    """Where the run's pictures and synthetic-set files go: the logger's folder, else the default root."""
    return Path(trainer.log_dir or trainer.default_root_dir)


class SyntheticSetEvaluator(Callback):
    """Evaluate the module's synthetic set with :func:`evaluate_synset` every ``every_n_steps`` optimizer steps and
    when training ends; log ``eval/acc_mean`` and ``eval/acc_std``, save the grid picture
    (``synset_step=N.png`` next to the logs) and log it to wandb when the logger is a ``WandbLogger``.

    Needs from the module: ``synthetic_set()`` (the dict of :data:`SYNSET_KEYS`) and ``real_test_set()`` (test
    images and labels in the synthetic set's space). Under DDP only rank 0 evaluates (every rank holds the same set).

    Args:
        every_n_steps: evaluate after this many optimizer steps (0: only at the end).
        at_train_end: also evaluate when training ends.
        The other arguments are :class:`EvaluationSettings`.
    """

    def __init__(
        self,
        every_n_steps: int = 0,
        at_train_end: bool = True,
        num_nets: int = 20,
        epochs: int = 1000,
        lr: float = 0.01,
        batch_size: int = 256,
        dsa: bool = True,
        dsa_strategy: str = DEFAULT_STRATEGY,
        always_flip: bool = False,
        use_learned_lr: bool = True,
        depth: int = 3,
        width: int = 128,
        norm: str = "instancenorm",
        seed: int = 0,
    ) -> None:
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps must be >= 0, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.at_train_end = at_train_end
        self.settings = EvaluationSettings(
            num_nets=num_nets,
            epochs=epochs,
            lr=lr,
            batch_size=batch_size,
            dsa=dsa,
            dsa_strategy=dsa_strategy,
            always_flip=always_flip,
            use_learned_lr=use_learned_lr,
            depth=depth,
            width=width,
            norm=norm,
            seed=seed,
        )
        self.results: list[tuple[int, float, float]] = []
        self._last_step = -1

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        if step == self._last_step:
            return
        self._last_step = step
        if not trainer.is_global_zero:
            return
        synset = pl_module.synthetic_set()
        test_images, test_labels = pl_module.real_test_set()
        mean, std, _ = evaluate_synset(
            synset["images"], synset["labels"], test_images, test_labels, self.settings, synset["lr"]
        )
        self.results.append((step, mean, std))
        for logger in trainer.loggers:
            logger.log_metrics({"eval/acc_mean": mean, "eval/acc_std": std}, step=step)
        picture = save_synset_grid(
            run_directory(trainer) / f"synset_step={step}.png",
            synset["images"],
            synset["ipc"],
            synset["mean"] if synset["space"] == "normalized" else None,
            synset["std"] if synset["space"] == "normalized" else None,
        )
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="synthetic_set", images=[str(picture)], step=step)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0 and trainer.global_step > 0:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_train_end:
            self.evaluate(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"results": list(self.results)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.results = [tuple(r) for r in state_dict.get("results", [])]

