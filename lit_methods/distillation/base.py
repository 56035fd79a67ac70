"""The synthetic-set platform of the dataset-distillation family: one LightningModule the methods build on.

Dataset distillation learns a small synthetic training set (``ipc`` images per class) that stands in for the real
one (Wang et al., arXiv:1811.10959; Zhao et al., arXiv:2006.05929). Every method of this family (DCC, DataDAM, TESLA,
FYI's DM) shares the machinery below and only defines how the synthetic images receive their gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from lit_methods.base import MethodBase, drop_object_hyperparameters
from lit_methods.distillation.augment import DEFAULT_STRATEGY, DSA, ZCAWhitening, flip_doubled
from lit_methods.distillation.synset import run_directory, save_synset
from lit_methods.nets import ConvNet

__all__ = ["DistillationModule", "average_across_ranks", "process_rank"]

INITS = ("real", "noise")


def process_rank() -> int:
    """This process' rank in the default process group (0 without one)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def average_across_ranks(tensors: Sequence[Tensor]) -> None:
    """Average ``tensors`` in place over the ranks of the default process group (nothing without one)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    world_size = dist.get_world_size()
    for tensor in tensors:
        dist.all_reduce(tensor)
        tensor.div_(world_size)


class DistillationModule(MethodBase):
    """A synthetic set as the only trainable state, learned by a method-specific matching objective.

    **State**: ``image_syn`` (``num_classes * ipc`` images, class-major: ``ipc`` images of class 0, then class 1 ...)
    is the only parameter (TESLA adds its learned rate); ``label_syn`` holds the classes. Networks used by the
    objective are built inside the step from a per-step seed and never registered, so checkpoints and the optimizer
    hold only the synthetic set. The default optimizer is SGD on the images (``lr``, ``momentum`` 0.5), constant rate.

    **Real data**: any in-memory datamodule (``train_images``/``train_labels`` ``uint8`` tensors and ``to_inputs``,
    e.g. :class:`~lit_methods.datamodules.DigitsDataModule`); at ``setup`` the training split is turned into inputs
    (normalized, or [0, 1] pixels, then ZCA-whitened with ``zca``), indexed by class and, at the first step, moved to
    the module's device. Real images of class ``c`` are drawn without replacement (``get_images(c, n)`` of the
    official code). The synthetic set is initialised from random real images (``init="real"``) or N(0, 1) noise.

    **Randomness**: every step draws its nets, real batches and DSA parameters from generators seeded by ``(seed,
    step, rank)``: a resumed run continues exactly, and under DDP each rank does its own work.

    **DDP**: every rank holds the same synthetic set; the image gradient is computed with ``torch.autograd.grad``
    (the DDP wrapper's reducer is not involved) and averaged across ranks (:func:`average_across_ranks`) before the
    step, so the ranks stay identical and two ranks equal one process doing both ranks' work.

    **Exports**: every checkpoint also writes ``synsets/synset_step=N.pt`` next to the logs
    (:func:`~lit_methods.distillation.synset.save_synset`), which ``python -m lit_methods.distillation.evaluate``
    evaluates; :class:`~lit_methods.distillation.synset.SyntheticSetEvaluator` evaluates during training.

    Args:
        ipc: synthetic images per class.
        init: ``"real"`` (random real images of the class) or ``"noise"``.
        lr: learning rate of the images.
        momentum: SGD momentum of the images (0.5 in every official code).
        batch_real: real images per class drawn at each matching step.
        dsa: Siamese DSA on the real and the synthetic batch of a class (one seed for both).
        dsa_strategy: DSA op groups.
        always_flip: FYI's DSA variant (flip always, then one other op).
        fyi: FYI (arXiv:2407.08113): every synthetic batch used for matching is doubled with its mirror images.
        zca: ZCA-whiten the real data (fit on the training split) and learn the set in ZCA space; needs [0, 1]
            pixel inputs (the datamodule's ``normalize: false``).
        net_depth: depth of the random ConvNets.
        net_width: width of the random ConvNets.
        net_norm: norm of the random ConvNets (instance norm in every paper).
        seed: seeds the initialisation and every step's randomness.
        num_classes: classes of the data (filled from the datamodule by the CLI).
        in_channels: image channels (filled by the CLI).
        image_size: image height and width (filled by the CLI).
        **kwargs: :class:`~lit_methods.base.MethodBase` (``optimizer``, ``mean``, ``std``, ``inputs_normalized``).
    """

    #: whether the objective draws ``batch_real`` real images per class (TESLA reads experts instead)
    draws_real_batches: ClassVar[bool] = True

    def __init__(
        self,
        *,
        ipc: int = 10,
        init: Literal["real", "noise"] = "real",
        lr: float = 0.1,
        momentum: float = 0.5,
        batch_real: int = 256,
        dsa: bool = True,
        dsa_strategy: str = DEFAULT_STRATEGY,
        always_flip: bool = False,
        fyi: bool = False,
        zca: bool = False,
        net_depth: int = 3,
        net_width: int = 128,
        net_norm: Literal["instancenorm", "batchnorm", "groupnorm", "none"] = "instancenorm",
        seed: int = 0,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int | tuple[int, int] = 32,
        lr_schedule: Literal["cosine", "onecycle", "constant"] = "constant",
        **kwargs: Any,
    ) -> None:
        super().__init__(lr=lr, momentum=momentum, lr_schedule=lr_schedule, **kwargs)
        if isinstance(ipc, bool) or not isinstance(ipc, int) or ipc < 1:
            raise ValueError(f"ipc (images per class) must be an integer >= 1, got {ipc!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if batch_real < 1:
            raise ValueError(f"batch_real must be >= 1, got {batch_real}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if zca and self.inputs_normalized:
            raise ValueError(
                "zca=True whitens [0, 1] pixels (as MTT/TESLA): build the datamodule with normalize=false "
                "(the model then gets inputs_normalized=false)"
            )
        self.save_hyperparameters()
        drop_object_hyperparameters(self)
        self.automatic_optimization = False
        self.ipc = ipc
        self.num_classes = num_classes
        height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.image_shape = (in_channels, height, width)
        self.dsa = DSA(dsa_strategy, always_flip) if dsa else None
        self.fyi = fyi
        self.batch_real = batch_real
        # a ConvNet of this shape must exist (too many poolings for the image size fails here, not in a step)
        self.make_net()
        self.image_syn = nn.Parameter(torch.zeros(num_classes * ipc, *self.image_shape))
        self.register_buffer("label_syn", torch.arange(num_classes).repeat_interleave(ipc))
        self.register_buffer("initialized", torch.tensor(False))
        self.zca = ZCAWhitening(in_channels * height * width) if zca else None
        self._real: Tensor | None = None
        self._class_indices: list[Tensor] = []
        self._test: tuple[Tensor, Tensor] | None = None
        self._test_source: Callable[[], tuple[Tensor, Tensor]] | None = None

    # -- the networks and randomness of a step ----------------------------------------------------------------------
    def make_net(self, num_classes: int | None = None) -> ConvNet:
        hp = self.hparams
        return ConvNet(
            num_classes=self.num_classes if num_classes is None else num_classes,
            in_channels=self.image_shape[0],
            depth=hp.net_depth,
            width=hp.net_width,
            norm=hp.net_norm,
            image_size=self.image_shape[1:],
        )

    def step_seed(self, *salt: int) -> int:
        """A seed for this step's randomness from ``(seed, step, rank, *salt)``."""
        entropy = [self.hparams.seed, self.global_step, process_rank(), *salt]
        return int(np.random.SeedSequence(entropy).generate_state(1)[0])

    def random_net(self, *salt: int) -> ConvNet:
        """A freshly initialised ConvNet (PyTorch default init from this step's seed) on the module's device; it is
        not registered, so it stays out of checkpoints and optimizers."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.step_seed(1, *salt))
            net = self.make_net()
        return net.to(self.image_syn.device)

    def generator(self, *salt: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.step_seed(2, *salt))

    # -- real data ------------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage != "fit" or self._real is not None:
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or getattr(datamodule, "train_images", None) is None:
            raise ValueError(
                f"{type(self).__name__} reads the real images from an in-memory datamodule (train_images, "
                f"train_labels, to_inputs), got {type(datamodule).__name__}"
            )

        def test_source() -> tuple[Tensor, Tensor]:
            if datamodule.test_images is None:
                datamodule.setup("test")
            return datamodule.test_images, datamodule.test_labels

        self.attach_real_data(datamodule.train_images, datamodule.train_labels, datamodule.to_inputs, test_source)

    def attach_real_data(
        self,
        images: Tensor,
        labels: Tensor,
        to_inputs: Callable[[Tensor], Tensor],
        test_source: Callable[[], tuple[Tensor, Tensor]] | None = None,
    ) -> None:
        """Index the real training images by class (checking there are enough of each), fit ZCA and initialise the
        synthetic set if it has not been. ``to_inputs`` turns pixels into the datamodule's inputs."""
        if tuple(images.shape[1:]) != self.image_shape:
            raise ValueError(f"real images have shape {tuple(images.shape[1:])}, the model expects {self.image_shape}")
        if int(labels.max()) >= self.num_classes:
            raise ValueError(f"real labels reach {int(labels.max())} but num_classes={self.num_classes}")
        self._to_inputs = to_inputs
        inputs = to_inputs(images).float()
        if self.zca is not None:
            if not bool(self.zca.fitted):
                self.zca.fit(inputs)
            inputs = self.zca(inputs)
        indices = [torch.nonzero(labels == c).squeeze(1) for c in range(self.num_classes)]
        needed = max(self.batch_real if self.draws_real_batches else 1, self.ipc if self.hparams.init == "real" else 1)
        short = {c: len(i) for c, i in enumerate(indices) if len(i) < needed}
        if short:
            batch = f" / batch_real={self.batch_real}" if self.draws_real_batches else ""
            raise ValueError(
                f"classes {short} have fewer real images than ipc={self.ipc}{batch} (needs {needed} per class)"
            )
        self._real, self._class_indices = inputs, indices
        self._test_source = test_source
        if not bool(self.initialized):
            self.initialize_synset()

    @torch.no_grad()
    def initialize_synset(self) -> None:
        generator = torch.Generator().manual_seed(self.hparams.seed)
        if self.hparams.init == "real":
            chosen = [idx[torch.randperm(len(idx), generator=generator)[: self.ipc]] for idx in self._class_indices]
            self.image_syn.copy_(self._real[torch.cat(chosen)])
        else:
            self.image_syn.copy_(torch.randn(self.image_syn.shape, generator=generator))
        self.initialized.fill_(True)

    def real_images(self, c: int, n: int, generator: torch.Generator) -> Tensor:
        """``n`` random real images of class ``c`` (without replacement) on the synthetic set's device."""
        if self._real is None:
            raise RuntimeError("no real data attached: the module gets it from the datamodule at setup('fit')")
        if self._real.device != self.image_syn.device:
            self._real = self._real.to(self.image_syn.device)
            self._class_indices = [i.to(self.image_syn.device) for i in self._class_indices]
        idx = self._class_indices[c]
        pick = torch.randperm(len(idx), generator=generator)[:n].to(idx.device)
        return self._real[idx[pick]]

    def real_test_set(self) -> tuple[Tensor, Tensor]:
        """The real test split in the synthetic set's space, on its device (for the evaluator)."""
        if self._test is None:
            if self._test_source is None:
                raise RuntimeError("no test split attached")
            images, labels = self._test_source()
            inputs = self._to_inputs(images).float()
            if self.zca is not None:
                inputs = self.zca(inputs)
            self._test = (inputs, labels)
        device = self.image_syn.device
        return self._test[0].to(device), self._test[1].to(device)

    # -- the synthetic set ------------------------------------------------------------------------------------------
    def class_slice(self, c: int) -> slice:
        return slice(c * self.ipc, (c + 1) * self.ipc)

    def augment_pair(self, real: Tensor, syn: Tensor, seed_salt: int) -> tuple[Tensor, Tensor]:
        """Siamese DSA on a real and a synthetic batch (one seed, same op and parameters); identity without DSA."""
        if self.dsa is None:
            return real, syn
        real = self.dsa(real, self.generator(3, seed_salt), siamese=True)
        syn = self.dsa(syn, self.generator(3, seed_salt), siamese=True)
        return real, syn

    def augmented_class_batches(self) -> tuple[list[Tensor], list[Tensor]]:
        """Per class, ``batch_real`` real images and the synthetic batch after Siamese DSA: the inputs of the
        distribution-style losses (DM, DataDAM), one list entry per class."""
        generator = self.generator(0)
        real, syn = [], []
        for c in range(self.num_classes):
            real_c = self.real_images(c, self.batch_real, generator)
            real_c, syn_c = self.augment_pair(real_c, self.synthetic_batch(c)[0], c)
            real.append(real_c)
            syn.append(syn_c)
        return real, syn

    def synthetic_batch(self, c: int) -> tuple[Tensor, Tensor]:
        """Class ``c``'s synthetic images and labels as the matching step uses them (mirror-doubled with FYI)."""
        images, labels = self.image_syn[self.class_slice(c)], self.label_syn[self.class_slice(c)]
        if self.fyi:
            images, labels = flip_doubled(images, labels)
        return images, labels

    def learned_lr(self) -> float | None:
        """The learned evaluation rate (MTT/TESLA) or None."""
        return None

    def synthetic_labels(self) -> Tensor:
        """The labels stored with the set (hard classes; soft rows for TESLA's soft labels)."""
        return self.label_syn

    def synthetic_set(self) -> dict[str, Any]:
        """The synthetic set as the file :func:`~lit_methods.distillation.synset.save_synset` writes."""
        space = "zca" if self.zca is not None else ("normalized" if self.inputs_normalized else "pixels")
        synset = {
            "images": self.image_syn.detach().clone(),
            "labels": self.synthetic_labels().detach().clone(),
            "lr": self.learned_lr(),
            "num_classes": self.num_classes,
            "ipc": self.ipc,
            "space": space,
            "mean": self._data_stat("mean"),
            "std": self._data_stat("std"),
        }
        if self.zca is not None:
            synset |= {"zca_mean": self.zca.mean.clone(), "zca_matrix": self.zca.matrix.clone()}
        return synset

    def _data_stat(self, name: str) -> list[float] | None:
        """The data's ``mean``/``std`` (for pictures): the module's own, else the datamodule's."""
        if self.hparams.get(name) is not None:
            return [float(v) for v in self.hparams[name]]
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        value = getattr(datamodule, name, None)
        return None if value is None else [float(v) for v in value]

    # -- optimisation ------------------------------------------------------------------------------------------------
    def synthetic_parameters(self) -> list[nn.Parameter]:
        return [self.image_syn]

    def step_synthetic(self, gradients: Sequence[Tensor | None]) -> None:
        """Write the gradients of :meth:`synthetic_parameters`, average them across ranks and take one step."""
        params = self.synthetic_parameters()
        for param, grad in zip(params, gradients):
            param.grad = torch.zeros_like(param) if grad is None else grad.detach().clone()
        average_across_ranks([p.grad for p in params])
        optimizer = self.optimizers()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()

    def matching_loss(self) -> Tensor:
        """The objective of single-level methods (one loss, one image step per training step)."""
        raise NotImplementedError

    def image_gradients(self) -> tuple[Tensor, list[Tensor]]:
        """This step's matching loss and the gradients of :meth:`synthetic_parameters`, averaged across ranks."""
        loss = self.matching_loss()
        grads = list(torch.autograd.grad(loss, self.synthetic_parameters(), allow_unused=True))
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(self.synthetic_parameters(), grads)]
        average_across_ranks(grads)
        return loss.detach(), grads

    def distillation_step(self) -> Tensor:
        loss, grads = self.image_gradients()
        self.step_synthetic(grads)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """One distillation iteration (the datamodule's batch is not used: real images are drawn per class)."""
        loss = self.distillation_step()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        trainer = self._trainer
        if trainer is not None and trainer.is_global_zero:
            save_synset(run_directory(trainer) / "synsets" / f"synset_step={trainer.global_step}.pt",
                        self.synthetic_set())

