"""The FID command of the README run as a user runs it: ``lit-methods fit`` on the diffusion digits config, then
``lit-methods test`` with the FID config on that checkpoint, with a sampler and step count given on the command line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lit_methods.cli import LitMethodsCLI, main
from lit_methods.diffusion import PNDMSampler
from lit_methods.nets import ConvNet

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments" / "diffusion"
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
#: where fid-classifier_convnet_digits.yaml writes the classifier that diffusion_unet_digits_fid.yaml reads
CLASSIFIER = Path("logs/fid-classifier_convnet_digits/version_0/checkpoints/last.ckpt")


def test_fid_of_a_checkpoint_at_a_sampler_and_step_count_from_the_command_line(in_tmp_dir, capsys):
    """The run uses the command line's F-PNDM at 4 steps and the FID config's classifier features, logs a finite
    test/fid and writes fid_samples.png; a missing classifier checkpoint is an error naming the config that writes
    it. Checked by hand: with the sampling arguments saved in the checkpoint's hyper-parameters (as before), Lightning's
    CLI replaces the command line's and the FID config's values by the checkpoint's (DDIM-20, no FID features), and
    this test fails (no error for the missing classifier, no test/fid)."""
    main(["fit", "--config", str(EXPERIMENTS / "diffusion_unet_digits.yaml"), "--trainer.max_steps=2",
          "--trainer.limit_val_batches=1", "--model.num_grid_samples=4", "--model.sampling_steps=2", *QUIET])
    (checkpoint,) = Path("logs/diffusion_unet_digits/version_0/checkpoints").glob("*.ckpt")
    test_args = ["test", "--config", str(EXPERIMENTS / "diffusion_unet_digits_fid.yaml"), "--ckpt_path",
                 str(checkpoint), "--model.sampler=f-pndm", "--model.sampling_steps=4", "--model.fid_num_samples=16",
                 "--model.num_grid_samples=16", "--trainer.limit_test_batches=1", *QUIET]
    with pytest.raises(SystemExit):
        main(test_args)
    assert "fid-classifier_convnet_digits.yaml" in capsys.readouterr().err

    classifier = ConvNet(num_classes=10, in_channels=1, image_size=8, depth=2, width=32, norm="batchnorm")
    CLASSIFIER.parent.mkdir(parents=True)
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in classifier.state_dict().items()}}, CLASSIFIER)
    cli = LitMethodsCLI(args=test_args)
    assert isinstance(cli.model.sampler, PNDMSampler)
    assert (cli.model.sampler.method, cli.model.sampler.steps) == ("f-pndm", 4)
    assert torch.isfinite(cli.trainer.callback_metrics["test/fid"])
    assert Path(cli.trainer.log_dir, "fid_samples.png").is_file()
