"""Expert trajectories for trajectory matching (MTT, Cazenavette et al., arXiv:2203.11932; TESLA, arXiv:2211.10586).

An expert is an ordinary classifier trained on the real data; :class:`ExpertTrajectorySaver` snapshots its
flattened parameters before training and after every epoch and writes them as one file per expert into a buffer
folder; :func:`load_expert_buffer` reads a folder back and checks every trajectory against the student network.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

__all__ = ["ExpertTrajectorySaver", "flat_parameters", "load_expert_buffer", "parameter_layout"]


def parameter_layout(net: nn.Module) -> list[list[Any]]:
    """``[name, shape]`` of every parameter of ``net``, in order (what a flat parameter vector means)."""
    return [[name, list(p.shape)] for name, p in net.named_parameters()]


def flat_parameters(net: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()]).cpu().clone()


class ExpertTrajectorySaver(Callback):
    """Save the trajectory of the module's ``backbone`` (e.g. :class:`~lit_methods.ImageClassifier` with a ConvNet):
    parameters at the start and after every training epoch, written at the end of training to
    ``buffer_dir/expert_<seed>.pt`` as ``{"trajectory": (epochs + 1, P) tensor, "layout": parameter_layout}``.

    One expert per run (the MTT/TESLA buffers hold many: run the config with several ``seed_everything`` values, one
    process each; under DDP only rank 0 writes, and the trajectory is that of the gradient-averaged run).

    Args:
        buffer_dir: the buffer folder.
        seed: names the file (defaults to the run's global seed, ``PL_GLOBAL_SEED``).
    """

    def __init__(self, buffer_dir: str = "buffers/expert_trajectories", seed: int | None = None) -> None:
        self.buffer_dir = Path(buffer_dir)
        self.seed = seed
        self.snapshots: list[Tensor] = []

    def _net(self, pl_module: L.LightningModule) -> nn.Module:
        net = getattr(pl_module, "backbone", None)
        if not isinstance(net, nn.Module):
            raise ValueError(f"ExpertTrajectorySaver needs a module with a `backbone`, got {type(pl_module).__name__}")
        return net

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
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
            {"trajectory": torch.stack(self.snapshots), "layout": parameter_layout(self._net(pl_module))},
            self.buffer_dir / f"expert_{seed}.pt",
        )

    def state_dict(self) -> dict[str, Any]:
        return {"snapshots": list(self.snapshots)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.snapshots = list(state_dict.get("snapshots", []))


def load_expert_buffer(buffer_dir: str | Path, student: nn.Module, min_epochs: int) -> list[Tensor]:
    """Every trajectory (``(epochs + 1, P)``) in ``buffer_dir``, checked against ``student``'s parameter layout and
    for at least ``min_epochs`` epochs; a ``FileNotFoundError``/``ValueError`` names what is missing or mismatched."""
    folder = Path(buffer_dir)
    files = sorted(folder.glob("expert_*.pt")) if folder.is_dir() else []
    if not files:
        raise FileNotFoundError(
            f"no expert trajectories (expert_*.pt) in {str(folder)!r}: build the buffer first, e.g. "
            "lit-methods fit --config experiments/tesla/tesla_experts_convnet_digits.yaml"
        )
    layout = parameter_layout(student)
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
        trajectories.append(saved["trajectory"])
    return trajectories
