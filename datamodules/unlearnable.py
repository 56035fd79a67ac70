"""CUDA: Convolution-based Unlearnable DAtasets (Sadasivan, Soltanolkotabi & Feizi, CVPR 2023, arXiv:2303.04278).

A data owner protects a training set by convolving every image of class ``c`` with a fixed random 3x3 filter
``w_c`` drawn from a private key. A network trained on the protected set learns the filter-to-label shortcut
instead of the images' content, so its accuracy on clean test data collapses.

* :class:`CUDATransform`: the class-wise filters and the poisoning of a ``uint8`` image batch (written from the
  project's method card; the official code carries a research-only licence and was not copied).
* :class:`CUDAUnlearnableDataModule`: any in-memory datamodule whose training split is poisoned once in ``setup``
  (the poisoned split is cached on the datamodule and recomputed bit for bit from the key on every rank or run);
  validation and test splits stay clean.
* :class:`DeconvolutionAdversarialTraining`: the paper's adaptive defence (Deconvolution-based Adversarial
  Training, DAT; ``final_muladv.py`` of the official code): before each training step, class-wise transposed
  convolutions are fitted by gradient ascent to maximise the model's loss and the model trains on their outputs.
* :class:`UnlearnabilityReport`: the figures of a run (poisoned/clean training, clean and class-filtered test
  accuracy) written as a CSV next to the logs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lit_methods.datamodules.base import InMemoryVisionDataModule, WrappingDataModule
from lit_methods.datamodules.batch import INPUTS, TARGETS

__all__ = [
    "CUDATransform",
    "CUDAUnlearnableDataModule",
    "DeconvolutionAdversarialTraining",
    "UnlearnabilityReport",
    "deconvolution_attack",
]


class CUDATransform:
    """The class-wise convolution poisoning of CUDA with a private key.

    For each class ``c`` in order, a ``kernel_size`` x ``kernel_size`` kernel is drawn with entries uniform in
    ``[0, blur]`` from ``numpy.random.RandomState(key)``; one entry, at a random position (not necessarily the
    centre), is then set to ``center`` (1.0). The same kernel filters every channel (a depthwise convolution with
    zero padding). A poisoned image is ``z / max(z)`` with ``z = conv(x, w_y)`` and the max over the whole image
    (all channels), re-quantised as ``floor(clip(255 z, 0, 255))``. Each image is poisoned with probability ``mix``
    (the draws follow the filters in the key's stream); the others are left as they are.

    Args:
        num_classes: number of classes (one filter each).
        key: the private key seeding every random draw (filters, mixing, control filters).
        kernel_size: side of the filters (odd; official: 3).
        blur: upper end of the uniform filter entries, the "blur parameter" (official: 0.3 on CIFAR-10/100).
        center: the value of the one fixed entry (official: 1.0).
        mix: fraction of training images poisoned, in [0, 1] (official default 1.0).
        class_wise: ``False`` gives the control of the card's check: every image gets its own random filter of the
            same family, unrelated to its label (the harm of CUDA comes from the class-wise tie).
    """

    def __init__(
        self,
        num_classes: int,
        key: int = 0,
        kernel_size: int = 3,
        blur: float = 0.3,
        center: float = 1.0,
        mix: float = 1.0,
        class_wise: bool = True,
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if not 0 <= key < 2**32:
            raise ValueError(f"key must be an integer in [0, 2**32), got {key}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size}")
        if not blur >= 0:
            raise ValueError(f"blur must be >= 0, got {blur}")
        if not center > 0:
            raise ValueError(f"center must be > 0, got {center}")
        if not 0.0 <= mix <= 1.0:
            raise ValueError(f"mix must lie in [0, 1], got {mix}")
        self.num_classes = num_classes
        self.key = key
        self.kernel_size = kernel_size
        self.blur = blur
        self.center = center
        self.mix = mix
        self.class_wise = class_wise
        self._rng = np.random.RandomState(key)
        #: the class filters, ``(num_classes, kernel_size, kernel_size)`` float32
        self.filters = torch.from_numpy(self._draw_filters(num_classes)).float()
        self._after_filters = self._rng.get_state()

    def _draw_filters(self, count: int) -> np.ndarray:
        k = self.kernel_size
        filters = np.empty((count, k, k))
        for i in range(count):
            kernel = self._rng.uniform(0.0, self.blur, size=(k, k))
            kernel[self._rng.randint(k), self._rng.randint(k)] = self.center
            filters[i] = kernel
        return filters

    def filter_images(self, images: Tensor, kernels: Tensor) -> Tensor:
        """``images`` (``uint8`` or [0, 1] floats, ``(N, C, H, W)``) each convolved with its own ``kernels[i]``
        (``(N, k, k)``, the same on every channel) and divided by its global max: [0, 1] floats."""
        pixels = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        n, c, h, w = pixels.shape
        k = self.kernel_size
        # one group per (image, channel): a depthwise convolution with each image's kernel
        weight = kernels.to(pixels).repeat_interleave(c, dim=0).view(n * c, 1, k, k)
        out = F.conv2d(pixels.reshape(1, n * c, h, w), weight, padding=k // 2, groups=n * c).view(n, c, h, w)
        peak = out.flatten(1).amax(dim=1).clamp_min(torch.finfo(out.dtype).tiny).view(n, 1, 1, 1)
        return out / peak

    def class_filtered(self, images: Tensor, labels: Tensor) -> Tensor:
        """``images`` filtered with the filters of ``labels`` (no mixing, no quantisation): what the card's check
        applies to the clean test set to show that the shortcut was learnt."""
        return self.filter_images(images, self.filters[labels.long().cpu()].to(images.device))

    def __call__(self, images: Tensor, labels: Tensor) -> Tensor:
        """The poisoned copy of a ``uint8`` ``(N, C, H, W)`` training split with ``labels``; deterministic in the key
        (the key's stream restarts after the filters at every call)."""
        if images.dtype != torch.uint8:
            raise ValueError(f"CUDA poisons the uint8 training images before any augmentation, got {images.dtype}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        labels = labels.long().cpu()
        if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < self.num_classes:
            raise ValueError(f"labels must lie in [0, {self.num_classes}), got {int(labels.min())}..{int(labels.max())}")
        self._rng.set_state(self._after_filters)
        poisoned_mask = torch.from_numpy(self._rng.uniform(size=len(labels)) < self.mix)
        if self.class_wise:
            kernels = self.filters[labels]
        else:
            kernels = torch.from_numpy(self._draw_filters(len(labels))).float()
        out = images.clone()
        chosen = poisoned_mask.nonzero().flatten()
        for block in chosen.split(1024) if len(chosen) else ():
            filtered = self.filter_images(images[block], kernels[block])
            out[block] = (filtered * 255.0).clamp(0.0, 255.0).floor().to(torch.uint8)
        return out


class CUDAUnlearnableDataModule(WrappingDataModule):
    """``datamodule`` with its training split made unlearnable by :class:`CUDATransform` (applied once, in
    ``setup``, to the raw ``uint8`` images before any augmentation or normalisation); validation and test splits
    stay clean. ``num_classes``, ``in_channels``, ``image_size``, ``mean``, ``std`` and ``inputs_normalized`` are
    those of ``datamodule``.

    The poisoned split replaces ``datamodule.train_images`` (so both the fast and the torchvision path train on
    it) and is kept there for the datamodule's life; every process and every run recomputes the same bytes from
    the key. A validation split carved from the training split (``val_split``) is carved before poisoning and stays
    clean.

    Args:
        datamodule: the dataset, an :class:`~lit_methods.datamodules.base.InMemoryVisionDataModule`.
        key: the private key.
        kernel_size: filter side (official: 3).
        blur: the blur parameter (official: 0.3).
        center: the fixed entry (official: 1.0).
        mix: fraction of training images poisoned.
        class_wise: ``False`` gives the random-filter control (see :class:`CUDATransform`).
    """

    slug: ClassVar[str] = "cuda-unlearnable"

    def __init__(
        self,
        datamodule: InMemoryVisionDataModule,
        key: int = 0,
        kernel_size: int = 3,
        blur: float = 0.3,
        center: float = 1.0,
        mix: float = 1.0,
        class_wise: bool = True,
    ) -> None:
        super().__init__(datamodule)
        if not isinstance(datamodule, InMemoryVisionDataModule):
            raise ValueError(f"CUDAUnlearnableDataModule wraps an InMemoryVisionDataModule, got {datamodule!r}")
        self.transform = CUDATransform(datamodule.num_classes, key, kernel_size, blur, center, mix, class_wise)
        self.clean_train_images: Tensor | None = None

    @property
    def train_images(self) -> Tensor | None:
        """The poisoned training split (after ``setup``)."""
        return self.datamodule.train_images

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        images, labels = self.datamodule.train_images, self.datamodule.train_labels
        if images is not None and self.clean_train_images is None:
            self.clean_train_images = images
            self.datamodule.train_images = self.transform(images, labels)


def deconvolution_attack(
    model: torch.nn.Module,
    images: Tensor,
    labels: Tensor,
    num_classes: int,
    steps: int = 10,
    step_size: float = 0.1,
    kernel_size: int = 7,
    bound: float = 5.0,
) -> Tensor:
    """The worst-case class-wise deconvolution of a batch of [0, 1] ``images`` (DAT, arXiv:2303.04278).

    Each class gets a fresh ``kernel_size`` transposed convolution with a bias, shared by the channels and
    initialised as PyTorch's ``ConvTranspose2d(1, 1, kernel_size)`` (from the global RNG). ``steps`` times, the
    weights and biases are clamped to ``[-bound, bound]`` and each class's filter moves by ``step_size`` times the
    gradient of the mean cross-entropy of that class's images (ascent; the official code steps class by class, which
    gives the same gradients since the classes' filters are disjoint). Returns the filtered images, each min-max
    scaled to [0, 1], detached. The model's parameters get no gradient (their ``requires_grad`` is restored).
    """
    n, c, h, w = images.shape
    k = kernel_size
    init = [torch.nn.ConvTranspose2d(1, 1, k, padding=k // 2) for _ in range(num_classes)]
    weight = torch.cat([conv.weight.detach() for conv in init]).to(images).requires_grad_(True)  # (K, 1, k, k)
    bias = torch.cat([conv.bias.detach() for conv in init]).to(images).requires_grad_(True)  # (K,)
    labels = labels.long()
    counts = torch.bincount(labels, minlength=num_classes).to(images)

    def apply(x: Tensor) -> Tensor:
        kernels = weight[labels].repeat_interleave(c, dim=0)  # (N * C, 1, k, k): one group per image channel
        out = F.conv_transpose2d(x.reshape(1, n * c, h, w), kernels, padding=k // 2, groups=n * c)
        return out.view(n, c, h, w) + bias[labels].view(n, 1, 1, 1)

    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            for _ in range(steps):
                with torch.no_grad():
                    weight.clamp_(-bound, bound)
                    bias.clamp_(-bound, bound)
                losses = F.cross_entropy(model(apply(images)), labels, reduction="none")
                loss = (losses / counts[labels]).sum()  # the sum over classes of each class's mean loss
                grad_w, grad_b = torch.autograd.grad(loss, [weight, bias])
                with torch.no_grad():
                    weight.add_(step_size * grad_w)
                    bias.add_(step_size * grad_b)
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
    with torch.no_grad():
        flat = apply(images).flatten(1)
        low = flat.amin(dim=1, keepdim=True)
        span = (flat.amax(dim=1, keepdim=True) - low).clamp_min(torch.finfo(flat.dtype).tiny)
        return ((flat - low) / span).view_as(images)


class DeconvolutionAdversarialTraining(L.Callback):
    """CUDA's adaptive defence, Deconvolution-based Adversarial Training (DAT, arXiv:2303.04278; official
    ``final_muladv.py``): at the start of every training step the batch's images are replaced, in place, by
    :func:`deconvolution_attack` of them against the current model, so the model trains on worst-case class-wise
    deconvolutions. Works on any classifier whose batches are [0, 1] pixels (a datamodule with ``normalize=False``
    and a model with ``inputs_normalized=False``, which normalises them itself).

    Args:
        steps: ascent steps per batch (official: 10).
        step_size: ascent step on the filters' raw gradient (official: 0.1).
        kernel_size: side of the transposed convolutions (official: 7).
        bound: the filters' weights and biases are clamped to ``[-bound, bound]`` (official: 5).
    """

    def __init__(self, steps: int = 10, step_size: float = 0.1, kernel_size: int = 7, bound: float = 5.0) -> None:
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if not step_size > 0:
            raise ValueError(f"step_size must be > 0, got {step_size}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size}")
        if not bound > 0:
            raise ValueError(f"bound must be > 0, got {bound}")
        self.steps = steps
        self.step_size = step_size
        self.kernel_size = kernel_size
        self.bound = bound

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if getattr(pl_module, "inputs_normalized", True):
            raise ValueError(
                "DeconvolutionAdversarialTraining filters [0, 1] pixels: build the datamodule with normalize=False "
                "and the model with inputs_normalized=False"
            )

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        images, labels = batch[INPUTS], batch[TARGETS]
        num_classes = int(getattr(pl_module, "num_classes", int(labels.max()) + 1))
        adversarial = deconvolution_attack(
            pl_module, images, labels, num_classes, self.steps, self.step_size, self.kernel_size, self.bound
        )
        images.copy_(adversarial)


class UnlearnabilityReport(L.Callback):
    """Writes ``unlearnability_report.csv`` next to the logs (``trainer.log_dir``) when training ends: the model's
    accuracy on the poisoned training split, on the clean training split, on the clean test split and on the test
    split filtered with the class filters (the shortcut: close to 100 % when the filters were learnt). The
    datamodule is a :class:`CUDAUnlearnableDataModule`; the figures are also logged as ``unlearnable/*``.

    Args:
        batch_size: evaluation batch size.
    """

    def __init__(self, batch_size: int = 512) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.figures: dict[str, float] = {}

    @torch.no_grad()
    def _accuracy(self, model: L.LightningModule, dm: CUDAUnlearnableDataModule, pixels: Tensor, labels: Tensor) -> float:
        correct = 0
        for start in range(0, len(labels), self.batch_size):
            x = dm.to_inputs(pixels[start : start + self.batch_size].to(model.device))
            correct += int((model(x).argmax(dim=1).cpu() == labels[start : start + self.batch_size]).sum())
        return 100.0 * correct / max(len(labels), 1)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = trainer.datamodule
        if not isinstance(dm, CUDAUnlearnableDataModule):
            raise ValueError(f"UnlearnabilityReport needs a CUDAUnlearnableDataModule, got {type(dm).__name__}")
        inner = dm.datamodule
        inner.setup("test")
        was_training = pl_module.training
        pl_module.eval()
        try:
            filtered = dm.transform.class_filtered(inner.test_images, inner.test_labels)
            self.figures = {
                "poisoned_train_acc": self._accuracy(pl_module, dm, inner.train_images, inner.train_labels),
                "clean_train_acc": self._accuracy(pl_module, dm, dm.clean_train_images, inner.train_labels),
                "clean_test_acc": self._accuracy(pl_module, dm, inner.test_images, inner.test_labels),
                "class_filtered_test_acc": self._accuracy(pl_module, dm, filtered, inner.test_labels),
            }
        finally:
            pl_module.train(was_training)
        if trainer.is_global_zero and trainer.log_dir is not None:
            path = Path(trainer.log_dir) / "unlearnability_report.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            rows = [f"{name},{value:.2f}" for name, value in self.figures.items()]
            path.write_text("metric,accuracy_percent\n" + "\n".join(rows) + "\n")
        for logger in trainer.loggers:
            logger.log_metrics({f"unlearnable/{k}": v for k, v in self.figures.items()}, step=trainer.global_step)
