"""Offline linear evaluation: an SSL checkpoint's backbone is loaded exactly, stays frozen, and a head learns on it;
run end to end through the CLI on digits."""

from __future__ import annotations

import shutil

import pytest
import torch
import yaml

from lit_methods.datamodules import DigitsDataModule
from lit_methods.cli import LitMethodsCLI
from lit_methods.nets import ConvNet
from lit_methods.ssl.linear_eval import LinearEvaluation
from lit_methods.ssl.simclr import SimCLR
from tests.helpers import cpu_trainer


def _convnet(width: int = 16) -> ConvNet:
    return ConvNet(num_classes=10, in_channels=1, depth=2, width=width, norm="batchnorm", image_size=8)


@pytest.fixture(scope="module")
def ssl_checkpoint(tmp_path_factory) -> str:
    """SimCLR trained for one epoch on digits, saved as a Lightning checkpoint."""
    path = tmp_path_factory.mktemp("simclr")
    torch.manual_seed(0)
    model = SimCLR(_convnet(), projection_hidden_dim=32, projection_dim=16, lr=0.1)
    trainer = cpu_trainer(max_epochs=1, limit_val_batches=0, default_root_dir=path)
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=64, ssl_views=2, num_workers=0))
    checkpoint = str(path / "simclr.ckpt")
    trainer.save_checkpoint(checkpoint)
    return checkpoint


def test_linear_evaluation_through_the_cli_keeps_the_ssl_backbone_and_trains_the_head(in_tmp_dir, ssl_checkpoint):
    checkpoint = ssl_checkpoint
    saved = torch.load(checkpoint, weights_only=True)["state_dict"]
    ssl_backbone = {k.removeprefix("backbone."): v for k, v in saved.items() if k.startswith("backbone.")}
    config = {
        "seed_everything": 0,
        "model": {
            "class_path": "lit_methods.ssl.linear_eval.LinearEvaluation",
            "init_args": {
                "backbone": {"class_path": "lit_methods.nets.ConvNet", "init_args": {"depth": 2, "width": 16, "norm": "batchnorm"}},
                "ssl_checkpoint": checkpoint,
                "lr": 0.5,
                "knn_k": 20,
            },
        },
        "data": {"class_path": "lit_methods.datamodules.DigitsDataModule", "init_args": {"batch_size": 64, "num_workers": 0}},
        "trainer": {
            "max_epochs": 3,
            "accelerator": "cpu",
            "devices": 1,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
        },
    }
    (in_tmp_dir / "linear.yaml").write_text(yaml.safe_dump(config))
    cli = LitMethodsCLI(args=["fit", "--config", "linear.yaml"], run=True)
    model = cli.model
    assert isinstance(model, LinearEvaluation) and model.head.out_features == 10  # num_classes from the data
    # every backbone tensor (BN running statistics included) is the checkpoint's, after three epochs of training
    after = model.backbone.state_dict()
    assert set(after) == set(ssl_backbone)
    for name, value in ssl_backbone.items():
        assert torch.equal(after[name], value), name
    assert not any(p.requires_grad for p in model.backbone.parameters())
    fit_metrics = dict(cli.trainer.callback_metrics)
    test_metrics = cli.trainer.test(model, datamodule=cli.datamodule)[0]
    print({k: round(float(v), 3) for k, v in (fit_metrics | test_metrics).items()})
    assert fit_metrics["val/acc"] > 0.6 and test_metrics["test/acc"] > 0.6  # chance is 0.1
    assert fit_metrics["val/knn_acc"] > 0.6


def test_backbone_stays_in_eval_mode_and_gets_no_gradient(ssl_checkpoint):
    model = LinearEvaluation(_convnet(), ssl_checkpoint=ssl_checkpoint)
    model.load_backbone()
    model.train()
    assert model.head.training and not model.backbone.training
    images, targets = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    model.training_step((images, targets), 0).backward()
    assert model.head.weight.grad is not None
    assert all(p.grad is None for p in model.backbone.parameters())
    with pytest.raises(TypeError, match="ssl_views=0"):
        model.training_step(([images, images], targets), 0)


def test_a_mismatched_or_foreign_checkpoint_is_rejected(tmp_path, ssl_checkpoint):
    checkpoint = ssl_checkpoint
    with pytest.raises(ValueError, match="does not match.*simclr.ckpt"):
        LinearEvaluation(_convnet(width=8), ssl_checkpoint=checkpoint).load_backbone()
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"encoder.weight": torch.zeros(1)}}, foreign)
    with pytest.raises(ValueError, match="no 'backbone.\\*' weights"):
        LinearEvaluation(_convnet(), ssl_checkpoint=str(foreign)).load_backbone()
    with pytest.raises(ValueError, match="lr must be > 0, got 0.0"):
        LinearEvaluation(_convnet(), ssl_checkpoint=checkpoint, lr=0.0)


def test_own_checkpoint_reloads_without_the_ssl_checkpoint(tmp_path, ssl_checkpoint):
    copy = tmp_path / "copy.ckpt"
    shutil.copy(ssl_checkpoint, copy)
    model = LinearEvaluation(_convnet(), ssl_checkpoint=str(copy))
    trainer = cpu_trainer(max_steps=2, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=64, num_workers=0))
    trainer.save_checkpoint(tmp_path / "linear.ckpt")
    copy.unlink()
    restored = LinearEvaluation.load_from_checkpoint(tmp_path / "linear.ckpt", backbone=_convnet())
    restored.load_backbone()  # the backbone weights came with the checkpoint: nothing to read
    for a, b in zip(restored.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
