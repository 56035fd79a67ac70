"""The cross-cutting callbacks attached together: they compose, and a resumed run continues exactly.

GhostBatchNorm needs BatchNorm and ErrorFeedbackDP refuses it, so the two groups that apply together are
ghost BN + AP (a BatchNorm net) and EF-DP + AP (a GroupNorm net). EF-DP comes before AP in the callback list, so
AP masks the private gradients it wrote.
"""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_methods.callbacks import ActivatingWhilePruning, ErrorFeedbackDP, GhostBatchNorm
from lit_methods.datamodules import DigitsDataModule
from lit_methods import ImageClassifier
from lit_methods.nets import ConvNet
from tests.helpers import cpu_trainer


def _callbacks(group: str) -> list:
    pruning = ActivatingWhilePruning(prune_rate=0.3, ap_rate=0.05, epochs_per_cycle=1)
    if group == "ghost_bn+ap":
        return [GhostBatchNorm(virtual_batch_size=8), pruning]
    return [ErrorFeedbackDP(clip_norm=0.5, noise_multiplier=0.8, seed=3), pruning]


def _fit(tmp_path, group: str, max_epochs: int, ckpt_path=None, checkpoint=None):
    torch.manual_seed(0)
    norm = "batchnorm" if group == "ghost_bn+ap" else "groupnorm"
    model = ImageClassifier(ConvNet(num_classes=10, in_channels=1, depth=2, width=8, norm=norm, image_size=8), lr=0.05)
    callbacks = _callbacks(group) + ([checkpoint] if checkpoint else [])
    trainer = cpu_trainer(
        max_epochs=max_epochs,
        limit_train_batches=5,
        limit_val_batches=2,
        callbacks=callbacks,
        enable_checkpointing=checkpoint is not None or ckpt_path is not None,
        default_root_dir=tmp_path,
        deterministic=True,
    )
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=32, seed=1, cutout_size=2), ckpt_path=ckpt_path)
    return model, callbacks


@pytest.mark.parametrize("group", ["ghost_bn+ap", "dp+ap"])
def test_two_epochs_equal_one_epoch_then_a_resume(tmp_path, group):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    straight, straight_callbacks = _fit(tmp_path, group, 3, checkpoint=checkpoint)
    resumed, resumed_callbacks = _fit(tmp_path, group, 3, ckpt_path=tmp_path / "ckpt" / "epoch=0-step=5.ckpt")
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    pruned = {name: mask for name, mask in straight_callbacks[1].masks.items()}
    assert pruned and all(torch.equal(m, resumed_callbacks[1].masks[n]) for n, m in pruned.items())
    # two pruning steps of 30% happened (epochs 1 and 2), and the pruned weights are exactly zero
    weights = dict(straight.named_parameters())
    total = sum(m.numel() for m in pruned.values())
    alive = sum(int(m.sum()) for m in pruned.values())
    assert alive == pytest.approx(total * 0.7 * 0.7, abs=2)
    assert all(torch.all(weights[name][mask == 0] == 0) for name, mask in pruned.items())
    if group == "dp+ap":
        assert resumed_callbacks[0].epsilon == straight_callbacks[0].epsilon > 0
