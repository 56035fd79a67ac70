"""TAS and DεpS under a 2-process CPU (gloo) DDP run (find_unused_parameters): both ranks, started from different
global random states, draw the same shapes at every step, and their parameters (weights and TAS' architecture
logits; not the per-rank BN statistics) stay identical."""

from __future__ import annotations

import os

import lightning as L
import pytest
import torch

from lit_methods.datamodules import DigitsDataModule
from lit_methods.nas import DEpS, TAS
from tests.ddp_helpers import run_distributed
from tests.helpers import cpu_trainer


class RecordDraws(L.Callback):
    """Records what every step trains: TAS' sampled width indices, DεpS' sandwich of sub-networks."""

    def __init__(self) -> None:
        self.draws: list = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if isinstance(pl_module, TAS):
            self.draws.append([i.tolist() for i, _ in pl_module.draw(0)["widths"]])
        else:
            self.draws.append([c.name for c in pl_module.scheduler().configs(trainer.global_step)])


def _train(method: str, root_dir: str) -> tuple[list, dict]:
    torch.set_num_threads(1)
    # ranks start from different global random states: the draws must not depend on them
    L.seed_everything(0)
    if method == "tas":
        module = TAS(num_classes=10, in_channels=1, image_size=(8, 8), stage_widths=(4, 8, 8), blocks=(1, 1, 1))
    else:
        module = DEpS(num_classes=10, in_channels=1, stage_widths=(8, 8), stage_depths=(1, 1), shrink_start=0.25,
                      epsilon=0.5, epsilon_steps=1)
    torch.manual_seed(100 + int(os.environ.get("RANK", 0)))
    recorder = RecordDraws()
    trainer = cpu_trainer(devices=2, strategy="ddp_find_unused_parameters_true", max_steps=4, max_epochs=-1,
                          limit_val_batches=0, callbacks=[recorder], default_root_dir=root_dir)
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=32))
    # numpy copies: tensors sent back from a finished process would point to its released shared memory
    # parameters only: BN running statistics are per rank (each sees its own shard)
    return recorder.draws, {k: v.detach().numpy().copy() for k, v in module.named_parameters()}


def _train_both(root_dir: str) -> dict[str, tuple[list, dict]]:
    """Both methods in one spawn (starting the processes costs more than the tiny fits)."""
    return {method: _train(method, root_dir) for method in ("tas", "deps")}


@pytest.mark.ddp
def test_ranks_train_the_same_draws_and_stay_in_sync(tmp_path):
    """4 steps of each method on 2 ranks whose global random states differ."""
    rank0, rank1 = run_distributed(_train_both, str(tmp_path))
    for method in ("tas", "deps"):
        (draws0, weights0), (draws1, weights1) = rank0[method], rank1[method]
        assert draws0 == draws1 and len(draws0) == 4, method
        assert len({str(d) for d in draws0}) > 1, method
        for name, value in weights0.items():
            assert (value == weights1[name]).all(), f"{method}: {name} differs between ranks"
