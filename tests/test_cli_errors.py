"""Bad inputs to the CLI: each ends in one short message naming the problem, before training, writing nothing.

Every row is an argv for ``lit-methods`` (built in the temporary working folder, with the files it needs) and a
fragment of the message the user must read last.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from lit_methods.cli import main

CPU = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.enable_progress_bar=false"]
DIGITS = ["--data=lit_methods.datamodules.DigitsDataModule", "--data.batch_size=32"]
TINY = ["--model=lit_methods.ImageClassifier", "--model.backbone=lit_methods.nets.ConvNet", "--model.backbone.width=8"]
FIT = ["fit", *TINY, *DIGITS, *CPU, "--trainer.max_steps=2", "--trainer.limit_val_batches=1"]


def _write_checkpoints(folder: Path) -> None:
    (folder / "empty.ckpt").write_bytes(b"")
    (folder / "random.ckpt").write_bytes(os.urandom(256))
    torch.save({"state_dict": {}, "hyper_parameters": {"_class_path": "lit_methods.ssl.SimCLR"}}, folder / "ssl.ckpt")
    small = {"_class_path": "lit_methods.ImageClassifier", "image_size": [16, 16], "num_classes": 10}
    torch.save({"state_dict": {}, "hyper_parameters": small}, folder / "other_shape.ckpt")


CASES = [
    pytest.param([*FIT, "--model.label_smoothing=1.0"], "label_smoothing must lie in [0, 1), got 1.0",
                 id="constructor"),
    pytest.param([*FIT, "--model.backbone.num_classes=7"], "num_classes=7 but the datamodule has num_classes=10",
                 id="data-fact"),
    pytest.param([*FIT, "--model.backbone.in_channels=3"], "in_channels=3 but the datamodule has in_channels=1",
                 id="explicit-default-data-fact"),
    pytest.param([*FIT, "--trainer.max_steps=0"], "no optimizer step to size lr_schedule='cosine'", id="max-steps-0"),
    pytest.param([*FIT, "--data.batch_size=4096", "--data.drop_last=true", "--model.lr_schedule=onecycle"],
                 "fit ran no training step: max_steps=2, or the training set gives no batch (batch_size=4096",
                 id="batch-larger-than-data"),
    pytest.param([*FIT, "--trainer.max_steps=-1", "--trainer.max_epochs=-1", "--trainer.max_time=00:00:00:05"],
                 "set no end", id="max-time-only"),
    pytest.param([*FIT, "--ckpt_path=empty.ckpt"], "is an empty file", id="empty-checkpoint"),
    pytest.param([*FIT, "--ckpt_path=random.ckpt"], "is not a Lightning checkpoint", id="random-bytes-checkpoint"),
    pytest.param([*FIT, "--ckpt_path=missing.ckpt"], "--ckpt_path='missing.ckpt': no such file",
                 id="missing-checkpoint"),
    pytest.param(["test", *TINY, *DIGITS, *CPU, "--ckpt_path=ssl.ckpt"],
                 "holds a lit_methods.ssl.SimCLR but the model is lit_methods.ImageClassifier", id="ssl-checkpoint"),
    pytest.param(["test", "--model=lit_methods.ssl.SimCLR", "--model.backbone=lit_methods.nets.ConvNet", *DIGITS, *CPU],
                 "defines no test_step", id="test-without-test-step"),
    pytest.param(["test", *TINY, *DIGITS, *CPU, "--ckpt_path=other_shape.ckpt"],
                 "image_size=(16, 16) from the checkpoint", id="checkpoint-of-other-data"),
    pytest.param(["fit", "--config", "mlc/mlc_convnet_digits.yaml", *CPU],
                 "`lit-methods fit --config mlc/tcr_convnet_digits.yaml` writes it", id="missing-tcr-checkpoint"),
    pytest.param(["fit", "--config", "adv-finetune/adv-finetune_convnet_digits.yaml", *CPU,
                  "--model.pretrained_checkpoint=logs/baseline_resnet18_cifar10/version_0/checkpoints/last.ckpt"],
                 "`lit-methods fit --config baseline/baseline_resnet18_cifar10.yaml` writes it",
                 id="missing-baseline-checkpoint"),
    pytest.param(["fit", *TINY, "--data=lit_methods.datamodules.CIFAR10DataModule", "--data.data_dir=nodata",
                  "--data.download=true", *CPU],
                 "the data is not in data_dir='nodata'", id="offline-download"),
]


@pytest.mark.parametrize("argv,message", CASES)
def test_a_bad_input_ends_in_one_short_message_and_writes_nothing(argv, message, in_tmp_dir, capsys, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network in this test")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.delenv("LIT_METHODS_TRACEBACK", raising=False)
    _write_checkpoints(in_tmp_dir)
    before = {p for p in in_tmp_dir.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "(set LIT_METHODS_TRACEBACK=1 to see the traceback)"
    assert err[-2].startswith("lit-methods: error: ") and message in err[-2], err[-2]
    assert len(err[-2]) < 400 and "Given value" not in err[-2]
    written = {p for p in in_tmp_dir.rglob("*") if p.is_file()} - before
    assert not written, written


@pytest.mark.parametrize("name", ["clip_norm", "noise_multiplier", "delta"])
def test_error_feedback_dp_refuses_a_number_given_as_text(name):
    from lit_methods.callbacks import ErrorFeedbackDP

    kwargs = {"clip_norm": 1.0, "noise_multiplier": 1.0, name: "1.0"}
    with pytest.raises(TypeError, match=f"{name} must be a number, got '1.0' \\(str\\)"):
        ErrorFeedbackDP(**kwargs)
