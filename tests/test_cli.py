"""The lit-methods CLI: configs, data facts, saved configs, downstream subclasses, sweeps and wandb."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback

from lit_methods.cli import (
    LitMethodsCLI,
    main,
    redact_namespace,
    redact_secrets,
    resolve_args,
    resolve_config_path,
)
from lit_methods.registry import METHODS, format_table
from tests.downstream_project.augments import ConstantPixels
from tests.downstream_project.focal import FocalLossClassifier

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "experiments"
QUICKSTART = str(EXPERIMENTS / "quickstart.yaml")
CPU = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.num_nodes=1", "--trainer.precision=32-true"]
TINY_FIT = [
    "--trainer.max_steps=2",
    "--trainer.limit_val_batches=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]
DIGITS = ["--data=lit_methods.datamodules.DigitsDataModule", "--data.batch_size=32"]
TINY_CONVNET = ["--model.backbone=lit_methods.nets.ConvNet", "--model.backbone.width=8", "--model.backbone.depth=2"]


def experiment_configs() -> list[Path]:
    return sorted(p for p in EXPERIMENTS.rglob("*.yaml") if "sweeps" not in p.parts)


@pytest.mark.parametrize("path", experiment_configs(), ids=lambda p: str(p.relative_to(EXPERIMENTS)))
def test_every_experiment_config_parses(path, capsys):
    """Full configs parse alone; fragments (data/, trainer/, logger/) parse composed onto the quickstart."""
    content = yaml.safe_load(path.read_text())
    args = ["fit", "--config", str(path)] if "model" in content else ["fit", "--config", QUICKSTART, "--config", str(path)]
    with pytest.raises(SystemExit) as exit_info:
        LitMethodsCLI(args=[*args, "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    for key, value in content.items():
        if isinstance(value, dict) and "class_path" in value:
            assert printed[key]["class_path"] == value["class_path"]


def test_registry_configs_exist():
    for entry in METHODS.values():
        for config in entry.configs:
            assert (REPO / config).is_file(), f"{entry.slug}: {config}"


@pytest.mark.parametrize(
    "config", ["baseline/baseline_resnet18_cifar10.yaml", "baseline/baseline_resnet18_cifar100.yaml"]
)
def test_cifar_baselines_instantiate_with_the_data_facts(config, in_tmp_dir):
    cli = LitMethodsCLI(args=["--config", str(EXPERIMENTS / config), *CPU], run=False)
    classes = 10 if "cifar10." in config else 100
    assert cli.model.num_classes == cli.model.backbone.num_classes == classes
    assert cli.model.backbone.in_channels == 3 and cli.model.image_size == (32, 32)


def test_data_facts_fill_the_model_and_its_backbone(in_tmp_dir):
    cli = LitMethodsCLI(args=["--config", QUICKSTART, *CPU], run=False)
    assert (cli.model.num_classes, cli.model.in_channels, cli.model.image_size) == (10, 1, (28, 28))
    backbone = cli.model.backbone
    assert (backbone.num_classes, backbone.in_channels, backbone.image_size) == (10, 1, (28, 28))
    init_args = cli.config.model.init_args
    assert init_args.num_classes == 10 and init_args.backbone.init_args.in_channels == 1


def test_data_facts_fill_only_parameters_a_backbone_accepts(in_tmp_dir):
    args = ["--model=lit_methods.ImageClassifier", "--model.backbone=tests.downstream_project.plain_mlp.PlainMLP"]
    cli = LitMethodsCLI(args=[*args, *DIGITS, *CPU], run=False)
    assert cli.model.backbone.net[-1].out_features == 10
    assert "in_channels" not in cli.config.model.init_args.backbone.init_args


def test_downstream_subclass_trains_by_class_path_and_reloads(in_tmp_dir):
    model_args = ["--model=tests.downstream_project.focal.FocalLossClassifier", "--model.gamma=1.5", "--model.lr=0.07"]
    logger = ["--trainer.logger=lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir=logs"]
    main(["fit", *model_args, *TINY_CONVNET, *DIGITS, *CPU, *TINY_FIT, *logger])
    (run_dir,) = (in_tmp_dir / "logs" / "lightning_logs").iterdir()
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"]["init_args"]["num_classes"] == 10
    assert saved["model"]["init_args"]["backbone"]["init_args"]["in_channels"] == 1
    (checkpoint,) = (run_dir / "checkpoints").glob("*.ckpt")
    restored = FocalLossClassifier.load_from_checkpoint(checkpoint)
    assert (restored.gamma, restored.lr, restored.num_classes, restored.backbone.width) == (1.5, 0.07, 10, 8)
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    for name, value in restored.state_dict().items():
        assert torch.equal(value, state[name]), name


def test_validate_test_and_predict_subcommands_run(in_tmp_dir, capsys):
    for subcommand in ("validate", "test", "predict"):
        main([subcommand, "--model=lit_methods.ImageClassifier", *TINY_CONVNET, *DIGITS, *CPU, "--trainer.logger=false"])
    assert "test/acc" in capsys.readouterr().out


def test_config_paths_resolve_from_anywhere(in_tmp_dir):
    for given in ("quickstart.yaml", "experiments/quickstart.yaml", "data/cifar10.yaml"):
        resolved = Path(resolve_config_path(given))
        assert resolved.is_file() and resolved.read_text() == (EXPERIMENTS / given.removeprefix("experiments/")).read_text()
    assert resolve_config_path("no/such.yaml") == "no/such.yaml"


def test_secret_looking_keys_are_redacted():
    config = {"trainer": {"logger": {"init_args": {"api_key": "abc", "project": "p", "settings": {"token": "t"}}}}}
    redacted = redact_secrets(config)
    assert redacted["trainer"]["logger"]["init_args"] == {"api_key": "<redacted>", "project": "p", "settings": {"token": "<redacted>"}}
    cli = LitMethodsCLI(args=["--config", QUICKSTART, *CPU, "--trainer.logger=false"], run=False)
    namespace = cli.config.clone()
    namespace["model.init_args.backbone.init_args.secret"] = "s3cr3t"
    assert redact_namespace(namespace)["model.init_args.backbone.init_args.secret"] == "<redacted>"
    assert cli.config.model.init_args.backbone.init_args.get("secret") is None


def test_list_prints_every_registered_method(capsys):
    main(["list"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[1:]] == list(METHODS)
    assert all(len(line) <= 80 for line in lines)
    main(["list", "--markdown"])
    assert capsys.readouterr().out.strip() == format_table()


def test_show_prints_a_method_and_an_unknown_slug_exits_with_close_matches(capsys):
    main(["show", "simclr"])
    out = capsys.readouterr().out
    assert METHODS["simclr"].url in out and "experiments/ssl/simclr_convnet_digits.yaml" in out
    with pytest.raises(SystemExit) as exit_info:
        main(["show", "simclrr"])
    assert exit_info.value.code != 0 and "did you mean simclr" in str(exit_info.value.code)


@pytest.mark.parametrize("argv", [[], ["--help"], ["-h"]])
def test_top_level_help_lists_every_command_in_whole_sentences_on_80_columns(argv, capsys):
    """LightningCLI's own listing cut the test/predict descriptions mid-sentence and left out list/show."""
    main(argv)
    lines = capsys.readouterr().out.splitlines()
    for command in ("fit", "validate", "test", "predict", "list", "show"):
        assert any(line.split()[:1] == [command] for line in lines), command
    assert max(map(len, lines)) <= 80


def test_an_unknown_command_names_every_command():
    with pytest.raises(SystemExit) as exit_info:
        main(["lsit"])
    assert "unknown command 'lsit'; choose from fit, validate, test, predict, list, show" in str(exit_info.value.code)


def test_module_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "lit_methods", "list"], capture_output=True, text=True, check=True)
    assert "baseline" in result.stdout


def _sweep_argv(sweep_file: Path) -> tuple[list[str], dict]:
    """The argv that `wandb agent` runs for the first value of every parameter of a sweep file."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    sweep = yaml.safe_load(sweep_file.read_text())
    chosen = {}
    for name, spec in sweep["parameters"].items():
        chosen[name] = spec["values"][0] if "values" in spec else spec["min"]
    flags = create_sweep_command_args({"args": {k: {"value": v} for k, v in chosen.items()}})["args"]
    argv = []
    for chunk in sweep["command"]:
        if chunk == "${args}":
            argv += flags
        elif chunk not in ("${env}", "lit-methods", sweep["program"]):
            argv.append(chunk)
    return argv, chosen


@pytest.mark.parametrize("sweep_file", sorted((EXPERIMENTS / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_sweep_parameters_are_cli_keys(sweep_file, capsys):
    sweep = yaml.safe_load(sweep_file.read_text())
    assert sweep["command"][:3] == ["${env}", "lit-methods", "fit"] and sweep["metric"]["name"] in ("val/acc", "val/loss", "val/knn_acc")
    argv, chosen = _sweep_argv(sweep_file)
    with pytest.raises(SystemExit):
        LitMethodsCLI(args=[*[resolve_config_path(a) for a in argv], *CPU, "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    for key, value in chosen.items():
        node = printed
        for part in key.split("."):
            node = node[part]
        assert node == value


def test_sweep_run_fits_and_pushes_the_config_to_offline_wandb(in_tmp_dir, monkeypatch):
    fake_key = "0123456789abcdef0123456789abcdef01234567"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", fake_key)
    monkeypatch.setenv("WANDB_DIR", str(in_tmp_dir))
    argv, chosen = _sweep_argv(EXPERIMENTS / "sweeps" / "quickstart_lr_batch.yaml")
    assert argv[0] == "fit"
    cli = LitMethodsCLI(args=[*argv, *TINY_CONVNET, "--data=lit_methods.datamodules.DigitsDataModule", *CPU, *TINY_FIT])
    assert cli.model.lr == chosen["model.init_args.lr"]
    assert cli.datamodule.batch_size == chosen["data.init_args.batch_size"]
    assert cli.trainer.global_step == 2
    files = [p for p in in_tmp_dir.rglob("*") if p.is_file()]
    assert not any(fake_key.encode() in p.read_bytes() for p in files)
    run_files = [p for p in files if "offline-run" in str(p)]
    # trainer settings reach wandb only through the full-config push (model hyper-parameters are logged anyway)
    assert any(b"limit_val_batches" in p.read_bytes() for p in run_files), "the config did not reach the wandb run"


def test_runs_log_to_csv_by_default(in_tmp_dir):
    main(["fit", "--model=lit_methods.ImageClassifier", *TINY_CONVNET, *DIGITS, *CPU, *TINY_FIT])
    (metrics,) = (in_tmp_dir / "logs").rglob("metrics.csv")
    assert "train/acc" in metrics.read_text().splitlines()[0]
    assert (metrics.parent / "config.yaml").is_file()


def test_an_explicit_data_fact_that_disagrees_with_the_data_is_an_error(in_tmp_dir):
    with pytest.raises(ValueError, match="num_classes=7 but the datamodule has num_classes=10"):
        LitMethodsCLI(args=["--config", QUICKSTART, *CPU, "--model.backbone.num_classes=7"], run=False)
    # agreeing values (an int image size for a square image) are accepted
    cli = LitMethodsCLI(args=["--config", QUICKSTART, *CPU, "--model.backbone.image_size=28"], run=False)
    assert cli.model.backbone.image_size == (28, 28)


class RecordInputs(Callback):
    def __init__(self) -> None:
        self.train: list[torch.Tensor] = []
        self.val: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.train.append(batch["inputs"].clone())

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.val.append(batch["inputs"].clone())


def test_an_augment_given_by_class_path_transforms_training_batches_only(in_tmp_dir):
    augment = ["--data.augment=tests.downstream_project.augments.ConstantPixels", "--data.augment.value=200"]
    model = ["--model=lit_methods.ImageClassifier", *TINY_CONVNET]
    cli = LitMethodsCLI(args=[*model, *DIGITS, *augment, *CPU, *TINY_FIT, "--trainer.logger=false"], run=False)
    data = cli.datamodule
    assert isinstance(data.augment, ConstantPixels) and data.augment.value == 200
    record = RecordInputs()
    cli.trainer.callbacks.append(record)
    cli.trainer.fit(cli.model, datamodule=data)
    mean, std = data.mean[0], data.std[0]
    assert len(record.train) == 2
    for inputs in record.train:  # the augment's constant image, then normalization
        torch.testing.assert_close(inputs, torch.full_like(inputs, (200 / 255 - mean) / std))
    assert record.val  # the sanity check's batches: evaluation skips the augment, the normalized test images in order
    torch.testing.assert_close(torch.cat(record.val), data.to_inputs(data.test_images[: 32 * len(record.val)]))
    seed = np.random.SeedSequence([data.seed, 0, 0]).generate_state(1)[0]
    assert data.augment.generator.initial_seed() == seed  # re-seeded from (seed, rank, epoch)
    with pytest.raises(ValueError, match=r"give either augment=.* or the flags of the default augment.*'cutout_size'"):
        LitMethodsCLI(args=[*model, *DIGITS, *augment, "--data.cutout_size=2", *CPU], run=False)
SECRET = "tok-5ecret-0123456789"


def test_secrets_are_redacted_in_every_file_a_run_writes(in_tmp_dir, monkeypatch):
    import wandb

    wandb.finish()  # a run left open by an earlier test would be reused by the WandbLogger
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(in_tmp_dir))
    config = {
        "model": {
            "class_path": "tests.downstream_project.remote_eval.RemoteEvalClassifier",
            "init_args": {"service_token": SECRET, "backbone": {"class_path": "lit_methods.nets.ConvNet",
                                                               "init_args": {"width": 8, "depth": 2}}},
        },
        "trainer": {
            "logger": [
                {"class_path": "lightning.pytorch.loggers.WandbLogger",
                 "init_args": {"save_dir": str(in_tmp_dir / "logs"), "project": "secrets"}},
                {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "logs"}},
            ],
            "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                           "init_args": {"save_last": True}}],
        },
    }
    (in_tmp_dir / "secret.yaml").write_text(yaml.safe_dump(config))
    cli = LitMethodsCLI(args=["fit", "--config", "secret.yaml", *DIGITS, *CPU, *TINY_FIT])
    wandb.finish()
    assert cli.model.service_token == SECRET  # the run itself gets the value
    files = [p for p in in_tmp_dir.rglob("*") if p.is_file() and p.name != "secret.yaml"]
    (hparams,) = (p for p in files if p.name == "hparams.yaml")
    assert yaml.safe_load(hparams.read_text())["service_token"] == "<redacted>"
    checkpoints = [p for p in files if p.suffix == ".ckpt"]
    assert len(checkpoints) == 2 and any("offline-run" in str(p) for p in files), files
    for checkpoint in checkpoints:
        assert torch.load(checkpoint, weights_only=True)["hyper_parameters"]["service_token"] == "<redacted>"
    leaking = [p for p in files if SECRET.encode() in p.read_bytes()]
    assert not leaking, leaking
    # the resolved config lives in the wandb run's own folder (next to its checkpoints), not shared in logs/
    run_id = cli.trainer.loggers[0].version
    assert (in_tmp_dir / "logs" / "secrets" / run_id / "config.yaml").is_file()
    assert (in_tmp_dir / "logs" / "secrets" / run_id / "checkpoints" / "last.ckpt").is_file()
    assert not (in_tmp_dir / "logs" / "config.yaml").exists()


def test_fast_dev_run_saves_no_checkpoint(in_tmp_dir):
    main(["fit", "--config", "quickstart.yaml", *DIGITS, *TINY_CONVNET, *CPU, "--trainer.fast_dev_run=true",
          "--test_after_fit=false"])
    assert not list(in_tmp_dir.rglob("*.ckpt"))


def test_short_config_flag_is_looked_up_like_config(in_tmp_dir):
    expected = str(EXPERIMENTS / "quickstart.yaml")
    for args in (["-c", "quickstart.yaml"], ["-c=quickstart.yaml"], ["--config", "quickstart.yaml"]):
        resolved = resolve_args(args)
        assert Path(resolved[-1].removeprefix("-c=")).read_text() == Path(expected).read_text(), args


def test_the_command_line_is_parsed_without_the_args_parameter_warning(in_tmp_dir, monkeypatch, capsys, recwarn):
    monkeypatch.setattr(sys, "argv", ["lit-methods", "fit", "-c", "quickstart.yaml", *CPU, "--print_config"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 0
    assert yaml.safe_load(capsys.readouterr().out)["model"]["class_path"] == "lit_methods.ImageClassifier"
    assert not [w for w in recwarn if "args parameter is intended" in str(w.message)]
