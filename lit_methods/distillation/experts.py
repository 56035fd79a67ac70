"""Expert trajectories for trajectory matching (MTT, Cazenavette et al., arXiv:2203.11932; TESLA, arXiv:2211.10586).

An expert is an ordinary classifier trained on the real data; :class:`ExpertTrajectorySaver` snapshots its
flattened parameters before training and after every epoch and writes them as one file per expert into a buffer
folder; :func:`load_expert_buffer` reads a folder back and checks every trajectory against the student network.

ZCA: MTT and TESLA train their CIFAR experts (and distil) on ZCA-whitened images. :class:`ZCAWhitenedDataModule`
wraps the experts' datamodule and whitens every batch with a transform fitted once on the training split; the saver
writes that transform to ``buffer_dir/zca.pt`` and records in every expert file whether (and with which ``eps`` and
mean) it was used, so that :func:`load_expert_buffer` can refuse a buffer whose ZCA setting differs from the
student's and :func:`load_buffer_zca` gives the student the experts' own transform.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from lit_methods.datamodules.base import InMemoryVisionDataModule, WrappingDataModule
from lit_methods.datamodules.batch import INPUTS
from lit_methods.distillation.augment import ZCAWhitening

__all__ = [
    "ExpertTrajectorySaver",
    "ZCAWhitenedDataModule",
    "ZCA_FILE",
    "flat_parameters",
    "load_buffer_zca",
    "load_expert_buffer",
    "parameter_layout",
]

ZCA_FILE = "zca.pt"
"""The ZCA transform of a buffer whose experts trained on whitened data (``mean``, ``matrix``, ``eps``)."""


def parameter_layout(net: nn.Module) -> list[list[Any]]:
    """``[name, shape]`` of every parameter of ``net``, in order (what a flat parameter vector means)."""
    return [[name, list(p.shape)] for name, p in net.named_parameters()]


def flat_parameters(net: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()]).cpu().clone()


class ZCAWhitenedDataModule(WrappingDataModule):
    """``datamodule``'s batches ZCA-whitened, for experts trained as MTT/TESLA train theirs on CIFAR.

    At ``setup`` a :class:`~lit_methods.distillation.augment.ZCAWhitening` is fitted once on the training split's
    [0, 1] pixels (``datamodule`` must be built with ``normalize=False``); every batch (training, validation, test)
    is then the wrapped datamodule's batch (its augmentation and [0, 1] pixels) whitened. The official code whitens
    first and augments the whitened images with DSA; here the wrapped datamodule's augmentation (crop, flip) acts
    on the pixels before whitening. The model gets the whitened inputs as they are (``inputs_normalized`` is True:
    no normalization on top). :class:`ExpertTrajectorySaver` finds the transform as ``trainer.datamodule.zca`` and
    saves it with the buffer.

    Args:
        datamodule: the dataset, an :class:`~lit_methods.datamodules.base.InMemoryVisionDataModule` with
            ``normalize=False``.
        eps: added to the covariance eigenvalues (0.1, as the official code's kornia call).
    """

    def __init__(self, datamodule: InMemoryVisionDataModule, eps: float = 0.1) -> None:
        super().__init__(datamodule)
        if datamodule.inputs_normalized:
            raise ValueError(
                f"ZCAWhitenedDataModule whitens [0, 1] pixels: build {type(datamodule).__name__} with normalize=false"
            )
        height, width = datamodule.image_size
        self.zca = ZCAWhitening(datamodule.in_channels * height * width, eps)

    @property
    def inputs_normalized(self) -> bool:
        """True: the whitened inputs are what the model takes (no normalization on top)."""
        return True

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if self.datamodule.train_images is None:  # test/predict only: the transform needs the training split
            self.datamodule.setup("fit")
        if not bool(self.zca.fitted):
            self.zca.fit(self.datamodule.to_inputs(self.datamodule.train_images).float())

    def to_inputs(self, pixels: Tensor) -> Tensor:
        """Pixels as the whitened inputs this datamodule yields."""
        inputs = self.datamodule.to_inputs(pixels).float()
        return self.zca.to(inputs.device)(inputs)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        batch = self.datamodule.on_after_batch_transfer(batch, dataloader_idx)
        inputs = batch[INPUTS]
        return {**batch, INPUTS: self.zca.to(inputs.device)(inputs)}


def zca_record(zca: ZCAWhitening) -> dict[str, Any]:
    """What an expert file records of the ZCA its expert trained with (the matrix itself is in :data:`ZCA_FILE`)."""
    return {"eps": float(zca.eps), "mean": zca.mean.detach().cpu().clone()}


class ExpertTrajectorySaver(Callback):
    """Save the trajectory of the module's ``backbone`` (e.g. :class:`~lit_methods.ImageClassifier` with a ConvNet):
    parameters at the start and after every training epoch, written at the end of training to
    ``buffer_dir/expert_<seed>.pt`` as ``{"trajectory": (epochs + 1, P) tensor, "layout": parameter_layout}``.

    One expert per run (the MTT/TESLA buffers hold many: run the config with several ``seed_everything`` values, one
    process each; under DDP only rank 0 writes, and the trajectory is that of the gradient-averaged run).

    ZCA: when the datamodule whitens its batches (:class:`ZCAWhitenedDataModule`, found as ``trainer.datamodule.zca``)
    the transform is written to ``buffer_dir/zca.pt`` (a buffer holds one: a different transform already there is an
    error) and the expert file records ``"zca": {"eps", "mean"}``; otherwise it records ``"zca": None``.

    Args:
        buffer_dir: the buffer folder.
        seed: names the file (defaults to the run's global seed, ``PL_GLOBAL_SEED``).
    """

    def __init__(self, buffer_dir: str = "buffers/expert_trajectories", seed: int | None = None) -> None:
        self.buffer_dir = Path(buffer_dir)
        self.seed = seed
        self.snapshots: list[Tensor] = []
        self.zca: ZCAWhitening | None = None

    def _net(self, pl_module: L.LightningModule) -> nn.Module:
        net = getattr(pl_module, "backbone", None)
        if not isinstance(net, nn.Module):
            raise ValueError(f"ExpertTrajectorySaver needs a module with a `backbone`, got {type(pl_module).__name__}")
        return net

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        zca = getattr(getattr(trainer, "datamodule", None), "zca", None)
        self.zca = zca if isinstance(zca, ZCAWhitening) and bool(zca.fitted) else None
        if self.zca is not None and trainer.is_global_zero:
            self._write_zca(self.zca)
        if not self.snapshots:
            self.snapshots.append(flat_parameters(self._net(pl_module)))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.snapshots.append(flat_parameters(self._net(pl_module)))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        import os

        seed = self.seed if self.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
        self.buffer_dir.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "trajectory": torch.stack(self.snapshots),
                "layout": parameter_layout(self._net(pl_module)),
                "zca": None if self.zca is None else zca_record(self.zca),
            },
            self.buffer_dir / f"expert_{seed}.pt",
        )

    def _write_zca(self, zca: ZCAWhitening) -> None:
        """Write the buffer's ZCA file, or check that the one already there is this transform."""
        path = self.buffer_dir / ZCA_FILE
        state = {"mean": zca.mean.detach().cpu(), "matrix": zca.matrix.detach().cpu(), "eps": float(zca.eps)}
        if path.is_file():
            saved = torch.load(path, map_location="cpu", weights_only=True)
            same = (
                saved["eps"] == state["eps"]
                and saved["mean"].shape == state["mean"].shape
                and torch.allclose(saved["mean"], state["mean"], rtol=1e-5, atol=1e-6)
                and torch.allclose(saved["matrix"], state["matrix"], rtol=1e-4, atol=1e-5)
            )
            if not same:
                raise ValueError(
                    f"{path} holds another ZCA transform (eps {saved['eps']}, other data or settings) than this "
                    f"expert's (eps {state['eps']}): write the experts of other data or settings to another buffer"
                )
            return
        self.buffer_dir.mkdir(parents=True, exist_ok=True)
        torch.save(state, path)

    def state_dict(self) -> dict[str, Any]:
        return {"snapshots": list(self.snapshots)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.snapshots = list(state_dict.get("snapshots", []))


def describe_zca(record: dict[str, Any] | None) -> str:
    return "zca=False (experts trained on unwhitened inputs)" if record is None else f"zca=True (eps {record['eps']})"


def load_expert_buffer(
    buffer_dir: str | Path, student: nn.Module, min_epochs: int, zca: bool = False
) -> list[Tensor]:
    """Every trajectory (``(epochs + 1, P)``) in ``buffer_dir``, checked against ``student``'s parameter layout, for
    at least ``min_epochs`` epochs and for the student's ZCA setting (``zca``: the student learns in ZCA space, so
    every expert must have trained on whitened data, and none may have when it does not); a
    ``FileNotFoundError``/``ValueError`` names what is missing or mismatched. Files written before ZCA was recorded
    count as unwhitened."""
    folder = Path(buffer_dir)
    files = sorted(folder.glob("expert_*.pt")) if folder.is_dir() else []
    if not files:
        raise FileNotFoundError(
            f"no expert trajectories (expert_*.pt) in {str(folder)!r}: build the buffer first, e.g. "
            "lit-methods fit --config experiments/tesla/tesla_experts_convnet_digits.yaml"
        )
    layout = parameter_layout(student)
    buffer_zca = load_buffer_zca(folder) if zca and (folder / ZCA_FILE).is_file() else None
    trajectories = []
    for file in files:
        saved = torch.load(file, map_location="cpu", weights_only=True)
        if not isinstance(saved, dict) or "trajectory" not in saved or "layout" not in saved:
            raise ValueError(f"{file} is not an expert trajectory file")
        if saved["layout"] != layout:
            raise ValueError(
                f"{file} was trained with another network than the student: its parameters are "
                f"{[tuple(s) for _, s in saved['layout']][:4]}..., the student's {[tuple(s) for _, s in layout][:4]}..."
            )
        epochs = len(saved["trajectory"]) - 1
        if epochs < min_epochs:
            raise ValueError(
                f"{file} holds {epochs} epochs but max_start_epoch + expert_epochs = {min_epochs} are needed"
            )
        record = saved.get("zca")
        if (record is not None) != zca:
            raise ValueError(
                f"{file} records {describe_zca(record)} but the student has zca={zca}: the experts and the "
                "distillation must use the same ZCA setting (build the buffer with ZCAWhitenedDataModule for zca=True, "
                "with the plain datamodule for zca=False)"
            )
        if record is not None and (
            buffer_zca is None
            or record["eps"] != buffer_zca.eps
            or not torch.allclose(record["mean"], buffer_zca.mean, atol=1e-6)
        ):
            where = "is missing" if buffer_zca is None else f"holds another transform (eps {buffer_zca.eps})"
            raise ValueError(f"{file} records {describe_zca(record)} but the buffer's {ZCA_FILE} {where}")
        trajectories.append(saved["trajectory"])
    return trajectories


def load_buffer_zca(buffer_dir: str | Path) -> ZCAWhitening:
    """The ZCA transform the buffer's experts trained with (:data:`ZCA_FILE`); a ``FileNotFoundError`` when the
    buffer has none (:func:`load_expert_buffer` with ``zca=True`` checks every expert against it)."""
    folder = Path(buffer_dir)
    path = folder / ZCA_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(folder)!r} has no {ZCA_FILE}: its experts did not train on whitened data (zca=True needs a buffer "
            "built with ZCAWhitenedDataModule)"
        )
    saved = torch.load(path, map_location="cpu", weights_only=True)
    zca = ZCAWhitening(saved["mean"].numel(), saved["eps"])
    zca.mean.copy_(saved["mean"])
    zca.matrix.copy_(saved["matrix"])
    zca.fitted.fill_(True)
    return zca
