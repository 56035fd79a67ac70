"""``lit-methods``: the one LightningCLI of the project.

``lit-methods fit --config experiments/<...>.yaml`` trains; ``validate``, ``test`` and ``predict`` work the same way;
``lit-methods list`` prints the method registry and ``lit-methods show SLUG`` one method. Configs compose with repeated
``--config``; a path that does not exist relative to the working directory is looked up under ``experiments/`` and
then among the configs shipped with the package.

Data facts are written into the model's config before anything is built: ``num_classes``, ``in_channels``,
``image_size``, the normalization ``mean`` and ``std`` (and ``num_subgroups`` where a datamodule has subgroups) of
the datamodule fill the parameters of the same names of the model and of every module given by ``class_path`` among
the model's arguments (the backbone, an augmentation), wherever the constructor accepts them. An explicit value
that disagrees with the data is an error. Because they are
filled into the config (not linked at instantiation), the saved ``config.yaml`` and the checkpoint's
hyper-parameters hold them, and ``load_from_checkpoint`` rebuilds the model without the datamodule.

Each run writes its resolved config into its own folder (:func:`run_directory`), with secret-looking values
redacted there and in the hyper-parameters (hence ``hparams.yaml``, checkpoints and loggers). :func:`main` prints an
error as one line (:func:`readable_error`; ``LIT_METHODS_TRACEBACK=1`` shows the traceback), and
:class:`LitMethodsCLI` checks checkpoints, first-stage files and the run's length before anything trains.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import shutil
import sys
import urllib.error
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from jsonargparse import ArgumentParser, Namespace
from lightning import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info

__all__ = [
    "COMMANDS",
    "DATA_FACTS",
    "DataFactMismatch",
    "LitMethodsCLI",
    "check_pretrained_checkpoints",
    "config_writing",
    "SaveAndLogConfig",
    "fill_data_facts",
    "main",
    "readable_error",
    "redact_hyperparameters",
    "redact_namespace",
    "redact_secrets",
    "resolve_config_path",
    "run_directory",
]

DATA_FACTS = ("num_classes", "in_channels", "image_size", "mean", "std", "inputs_normalized", "num_subgroups")
_SECRET_KEY = re.compile(r"(api[_-]?key|token|secret|password)", re.IGNORECASE)
REDACTED = "<redacted>"
DEFAULT_LOGGER = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "logs"}}


def redact_secrets(value: Any) -> Any:
    """A copy of a nested config with the values of secret-looking keys (api_key, token, ...) replaced."""
    if isinstance(value, dict):
        return {k: REDACTED if _SECRET_KEY.search(str(k)) else redact_secrets(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_secrets(v) for v in value)
    return value


def redact_namespace(config: Namespace) -> Namespace:
    """A copy of a parsed config with :func:`redact_secrets` applied to every leaf."""
    config = config.clone()
    for key, value in list(config.items()):
        if _SECRET_KEY.search(key.rsplit(".", 1)[-1]):
            config[key] = REDACTED
        elif isinstance(value, dict):
            config[key] = redact_secrets(value)
    return config


def redact_hyperparameters(module: LightningModule | LightningDataModule) -> None:
    """Redact secret-looking keys in ``module``'s hyper-parameters, so that ``hparams.yaml``, every logger and the
    checkpoints get them redacted (a reloaded module is given such values again)."""
    hparams = dict(module.hparams)
    redacted = redact_secrets(hparams)
    if redacted != hparams:
        module.save_hyperparameters(redacted)


def run_directory(trainer: Trainer) -> str:
    """The run's own folder: ``<save_dir>/<name>/<version>`` of the first logger (where Lightning's
    ``ModelCheckpoint`` puts ``checkpoints/``, e.g. ``logs/<project>/<run id>`` for wandb), else ``trainer.log_dir``."""
    if not trainer.loggers:
        return str(trainer.log_dir)
    logger = trainer.loggers[0]
    run_dir = None
    if trainer.is_global_zero:
        version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
        run_dir = os.path.join(logger.save_dir or trainer.default_root_dir, str(logger.name), version)
    return trainer.strategy.broadcast(run_dir)


def _import_class(class_path: str) -> type:
    module_name, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module_name), name)


def _parameter_defaults(cls: type) -> dict[str, Any]:
    """Constructor parameters of ``cls`` and their defaults, following ``**kwargs`` into the base classes."""
    defaults: dict[str, Any] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        for p in params:
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name != "self":
                defaults.setdefault(p.name, p.default)
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return defaults


def _as_fact(value: Any) -> Any:
    return tuple(value) if isinstance(value, (list, tuple)) else value


def _square(size: Any) -> Any:
    """An image size given as one int means a square image."""
    return (size, size) if isinstance(size, int) and not isinstance(size, bool) else size


class SaveAndLogConfig(SaveConfigCallback):
    """Saves the resolved config into the run's own folder (:func:`run_directory`) and pushes it to wandb when a
    WandbLogger is attached.

    Values under secret-looking keys (``api_key``, ``token``, ``secret``, ``password``) are redacted in the config
    and in the model's and datamodule's hyper-parameters (:func:`redact_hyperparameters`), hence in ``hparams.yaml``,
    the checkpoints and every logger. The run folder it creates is removed again when the run fails before its first
    optimizer step (:attr:`created_run_dir`, see :class:`LitMethodsCLI`).
    """

    created_run_dir: Path | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        self.config = redact_namespace(self.config)
        redact_hyperparameters(pl_module)
        if trainer.datamodule is not None:
            redact_hyperparameters(trainer.datamodule)
        run_dir = Path(run_directory(trainer))
        if trainer.is_global_zero:
            if self.save_to_log_dir:
                if not run_dir.exists() or not any(run_dir.iterdir()):  # new, or just made by its logger
                    self.created_run_dir = run_dir
                run_dir.mkdir(parents=True, exist_ok=True)
                config_path = str(run_dir / self.config_filename)
                self.parser.save(
                    self.config, config_path, skip_none=False, overwrite=self.overwrite, multifile=self.multifile
                )
            self.save_config(trainer, pl_module, stage)
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.config.update(self.config.as_dict(), allow_val_change=True)


class LitMethodsCLI(LightningCLI):
    """LightningCLI in subclass mode for models and datamodules, with data facts filled into the model config.

    Logs go to CSV files under ``logs/`` unless the config names another logger (or ``--trainer.logger=false``).
    Before anything trains it checks what would otherwise fail late or silently: the checkpoint of ``--ckpt_path``
    (readable, of the configured model class, trained on data of this shape), the stage-1 checkpoint of a two-stage
    method (``*_checkpoint`` arguments), and that ``validate``/``test`` have a step to run. ``fast_dev_run`` saves no
    checkpoint. A run that fails before its first optimizer step leaves no run folder behind, and a failed download
    says where the data was looked for.
    """

    def __init__(self, args: Sequence[str] | None = None, run: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_callback", SaveAndLogConfig)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("trainer_defaults", {"logger": DEFAULT_LOGGER})
        kwargs["parser_kwargs"] = {"prog": "lit-methods", **kwargs.get("parser_kwargs", {})}
        self.checkpoint_hyperparameters: dict[str, Any] = {}
        self.explicit_config: Namespace | None = None
        try:
            super().__init__(
                LightningModule,
                LightningDataModule,
                subclass_mode_model=True,
                subclass_mode_data=True,
                args=args,
                run=run,
                **kwargs,
            )
        except Exception as error:
            self.remove_unstarted_run()
            offline = _first_in_chain(error, (urllib.error.URLError, ConnectionError))
            if offline is not None:
                raise RuntimeError(self.missing_data_message(offline)) from error
            raise

    def parse_arguments(self, parser: Any, args: Any) -> None:
        """Parse ``args`` (by default the command line) with the ``--config``/``-c`` paths resolved
        (:func:`resolve_args`), then check the checkpoint of ``--ckpt_path``."""
        if isinstance(args, (dict, Namespace)):
            self.config = parser.parse_object(args)
        else:
            args = resolve_args(sys.argv[1:] if args is None else args)
            self.config = parser.parse_args(args)
            self.explicit_config = parser.parse_args(args, defaults=False)
        self.check_checkpoint()

    def check_checkpoint(self) -> None:
        """``--ckpt_path``, when given as a file, must be a readable Lightning checkpoint of the configured model
        class (LightningCLI would otherwise fail with torch's errors, or swap the model for the checkpoint's)."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or ckpt_path in ("last", "best", "hpc", "registry") or "://" in str(ckpt_path):
            return
        path = Path(ckpt_path)
        if not path.is_file():
            raise FileNotFoundError(f"--ckpt_path={ckpt_path!r}: no such file")
        if path.stat().st_size == 0:
            raise ValueError(f"--ckpt_path={ckpt_path!r} is an empty file (a run stopped while saving it?)")
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise ValueError(
                f"--ckpt_path={ckpt_path!r} is not a Lightning checkpoint: torch.load cannot read it "
                f"({type(error).__name__})"
            ) from error
        if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
            raise ValueError(
                f"--ckpt_path={ckpt_path!r} holds no 'state_dict': it is not a Lightning checkpoint (weights alone "
                "are loaded by a model argument such as pretrained_checkpoint)"
            )
        hparams = checkpoint.get("hyper_parameters") or {}
        saved_class = hparams.get("_class_path")
        model = self.config[subcommand].get("model")
        given_class = model.get("class_path") if isinstance(model, Namespace) else None
        if saved_class and given_class and saved_class != given_class:
            raise ValueError(
                f"--ckpt_path={ckpt_path!r} holds a {saved_class} but the model is {given_class}: give the config "
                "the checkpoint was trained with"
            )
        self.checkpoint_hyperparameters = hparams

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=False,
            help="fit only: run the test loop on the final weights when training ends",
        )

    def after_fit(self) -> None:
        if self.trainer.global_step == 0 and not self.trainer.interrupted:
            data = (self.config.fit.get("data") or Namespace()).get("init_args") or Namespace()
            raise ValueError(
                f"fit ran no training step: max_steps={self.trainer.max_steps}, or the training set gives no batch "
                f"(batch_size={data.get('batch_size')} larger than the training set with "
                f"drop_last={data.get('drop_last')})"
            )
        if self.config[self.subcommand].get("test_after_fit"):
            self.trainer.test(self.model, datamodule=self.datamodule)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        explicit = self.explicit_config
        if explicit is not None and self.subcommand:
            explicit = explicit.get(self.subcommand)
        try:
            fill_data_facts(config, explicit)
        except DataFactMismatch as error:
            if not _has_key(self.checkpoint_hyperparameters, error.name):
                raise
            raise ValueError(
                f"{error.given_by} has {error.name}={error.given!r} from the checkpoint of --ckpt_path="
                f"{config.ckpt_path!r}, but the datamodule has {error.name}={error.value!r}: the checkpoint was "
                "trained on other data"
            ) from error
        if self.subcommand:  # a run, not only building the classes (run=False), reads them
            check_pretrained_checkpoints(config)
        if self.subcommand in SUBCOMMAND_STEPS and config.get("model") is not None:
            step = SUBCOMMAND_STEPS[self.subcommand]
            model_class = _import_class(config.model.class_path)
            if getattr(model_class, step) is getattr(LightningModule, step):
                raise ValueError(
                    f"{config.model.class_path} defines no {step}, so `lit-methods {self.subcommand}` has nothing to "
                    "run (self-supervised methods are evaluated by their linear_eval or knn configs)"
                )
        trainer = config.get("trainer")
        if self.subcommand == "fit" and trainer is not None and trainer.get("fast_dev_run"):
            callbacks = trainer.get("callbacks") or []
            trainer.callbacks = [c for c in callbacks if not _is_checkpoint_callback(c)]
            trainer.enable_checkpointing = False
            rank_zero_info("fast_dev_run: no checkpoint is saved (ModelCheckpoint callbacks left out)")

    def remove_unstarted_run(self) -> None:
        """Remove the run folder this run created when it failed before its first optimizer step."""
        trainer = getattr(self, "trainer", None)
        if trainer is None or trainer.global_step > 0:
            return
        for callback in trainer.callbacks:
            run_dir = getattr(callback, "created_run_dir", None)
            if isinstance(callback, SaveAndLogConfig) and run_dir is not None and run_dir.is_dir():
                shutil.rmtree(run_dir)
                rank_zero_info(f"removed {run_dir}: the run failed before its first step")

    def missing_data_message(self, error: BaseException) -> str:
        """What to do when a datamodule tried to download its data and could not."""
        subcommand = self.config.get("subcommand")
        data = (self.config[subcommand] if subcommand else self.config).get("data")
        data_dir = data.init_args.get("data_dir") if data is not None and data.get("init_args") else None
        reason = getattr(error, "reason", error)
        where = f"data_dir={data_dir!r} ({Path(data_dir).resolve()})" if data_dir else "its data_dir"
        return (
            f"the data is not in {where} and downloading it failed ({reason}); put the dataset's files there, or "
            "run once where the network can be reached"
        )


SUBCOMMAND_STEPS = {"validate": "validation_step", "test": "test_step"}


def _first_in_chain(error: BaseException, types: tuple[type[BaseException], ...]) -> BaseException | None:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, types):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _has_key(value: Any, key: str) -> bool:
    if isinstance(value, dict):
        return key in value or any(_has_key(v, key) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has_key(v, key) for v in value)
    return False


def _is_checkpoint_callback(callback: Any) -> bool:
    if isinstance(callback, ModelCheckpoint):
        return True
    class_path = callback.get("class_path") if isinstance(callback, (Namespace, dict)) else None
    return class_path is not None and issubclass(_import_class(class_path), ModelCheckpoint)


def _experiment_roots() -> list[Path]:
    return [Path("experiments"), Path(str(resources.files("lit_methods.experiments")))]


def config_writing(path: str) -> str | None:
    """The experiment config (relative to ``experiments/``) whose run writes ``path``: its name is one of the
    path's folders (``checkpoints/tcr_convnet_digits/last.ckpt`` <- ``mlc/tcr_convnet_digits.yaml``)."""
    parts = set(Path(path).parts)
    for root in _experiment_roots():
        if root.is_dir():
            for config in sorted(root.rglob("*.yaml")):
                if config.stem in parts:
                    return str(config.relative_to(root))
    return None


def check_pretrained_checkpoints(config: Namespace) -> None:
    """A model argument named ``*_checkpoint`` (the first stage of a two-stage method) must name an existing file;
    the error names the config that writes it."""
    model = config.get("model")
    init_args = model.get("init_args") if isinstance(model, Namespace) else None
    for key, value in vars(init_args or Namespace()).items():
        if key.endswith("checkpoint") and isinstance(value, str) and "://" not in value and not Path(value).is_file():
            writer = config_writing(value)
            first = f"`lit-methods fit --config {writer}` writes it: run that first" if writer else "train it first"
            raise FileNotFoundError(
                f"model {key}={value!r} does not exist; {first}, or set --model.{key}=null to start from scratch"
            )


def readable_error(error: BaseException) -> str:
    """``error`` as one short line for a person: jsonargparse's wrapping of a constructor's error (the union of
    subtypes tried and a dump of the whole config) is peeled off, leaving the constructor's own message."""
    while str(error).startswith("Does not validate against any of the Union subtypes") and error.__cause__:
        error = error.__cause__
    return f"{type(error).__name__}: {str(error).strip()}"


class DataFactMismatch(ValueError):
    """An explicit model argument that disagrees with the datamodule's fact of the same name."""

    def __init__(self, given_by: str, name: str, given: Any, value: Any) -> None:
        super().__init__(
            f"{given_by} was given {name}={given!r} but the datamodule has {name}={value!r}; "
            f"leave {name} out: the CLI fills it from the data"
        )
        self.given_by, self.name, self.given, self.value = given_by, name, given, value


def fill_data_facts(config: Namespace, explicit: Namespace | None = None) -> None:
    """Write the datamodule's facts (:data:`DATA_FACTS`) into the model config (see the module doc).

    ``explicit`` holds the values given explicitly (the config parsed without defaults): an explicit value that
    disagrees with the data is an error even when it equals the constructor's default. Without it, values other than
    the default are taken as explicit.
    """
    if config.get("data") is None or config.get("model") is None:
        return
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(LightningDataModule, "data")
    datamodule = parser.instantiate_classes(Namespace(data=config.data)).data
    facts = {name: getattr(datamodule, name) for name in DATA_FACTS if hasattr(datamodule, name)}
    facts = {k: list(v) if isinstance(v, tuple) else v for k, v in facts.items()}
    init_args = config.model.get("init_args") or Namespace()
    explicit_model = _explicit_init_args(explicit.get("model") if explicit else None, config.model.class_path)
    targets = [(config.model, explicit_model)]
    for key, value in vars(init_args).items():
        if isinstance(value, Namespace) and "class_path" in value:
            targets.append((value, _explicit_init_args(explicit_model.get(key), value.class_path)))
    for target, explicit_args in targets:
        defaults = _parameter_defaults(_import_class(target.class_path))
        if target.get("init_args") is None:
            target.init_args = Namespace()
        for name, value in facts.items():
            if name not in defaults:
                continue
            given, default, stated = target.init_args.get(name), defaults[name], explicit_args.get(name)
            if name == "image_size":
                given, default, stated = _square(given), _square(default), _square(stated)
            not_default = given is not None and _as_fact(given) != _as_fact(default)
            if (not_default or stated is not None) and _as_fact(given) != _as_fact(value):
                raise DataFactMismatch(target.class_path, name, given, value)
            target.init_args[name] = value


def _explicit_init_args(explicit: Any, class_path: str) -> Namespace:
    """The explicitly given ``init_args`` of a ``class_path`` node (none when another class was given)."""
    if isinstance(explicit, Namespace) and explicit.get("class_path") in (None, class_path):
        return explicit.get("init_args") or Namespace()
    return Namespace()


def resolve_config_path(path: str) -> str:
    """``path`` as given if it exists, else under ./experiments/, else among the configs shipped with the package."""
    if Path(path).exists():
        return path
    relative = path.removeprefix("experiments/")
    local = Path("experiments") / relative
    if local.exists():
        return str(local)
    packaged = resources.files("lit_methods.experiments").joinpath(relative)
    if packaged.is_file():
        return str(packaged)
    return path


def resolve_args(args: Sequence[str]) -> list[str]:
    """Resolve the paths of every ``--config`` (or ``-c``) argument with :func:`resolve_config_path`."""
    resolved: list[str] = []
    expect_path = False
    for arg in args:
        if expect_path:
            resolved.append(resolve_config_path(arg))
            expect_path = False
        elif arg in ("--config", "-c"):
            resolved.append(arg)
            expect_path = True
        elif arg.startswith(("--config=", "-c=")):
            flag, _, path = arg.partition("=")
            resolved.append(f"{flag}={resolve_config_path(path)}")
        else:
            resolved.append(arg)
    return resolved


COMMANDS = {
    "fit": "train a model from a config (--test_after_fit true: then test it)",
    "validate": "evaluate a model on the validation split (--ckpt_path: weights)",
    "test": "evaluate a model on the test split (--ckpt_path: weights)",
    "predict": "run a model on the predict split, return class probabilities",
    "list": "the method registry, a line per method (--markdown: README table)",
    "show": "a method's paper, classes, configs and status: show SLUG",
}


def overview() -> str:
    """The top-level help of ``lit-methods``: every command with a whole-sentence description."""
    width = max(map(len, COMMANDS))
    lines = [
        "usage: lit-methods COMMAND [ARGS]",
        "",
        "Research methods evaluated on CIFAR: Lightning modules, datamodules, callbacks.",
        "",
        "commands:",
        *(f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()),
        "",
        "`lit-methods COMMAND --help` shows a command's options; e.g.",
        "  lit-methods fit --config experiments/quickstart.yaml",
    ]
    return "\n".join(lines)


def main(args: Sequence[str] | None = None) -> None:
    """Console entry point: ``lit-methods {fit,validate,test,predict} ...``, ``list [--markdown]`` and ``show SLUG``."""
    argv = list(sys.argv[1:] if args is None else args)
    if not argv or argv[0] in ("-h", "--help"):
        print(overview())
        return
    if not argv[0].startswith("-") and argv[0] not in COMMANDS:
        sys.exit(f"lit-methods: error: unknown command {argv[0]!r}; choose from {', '.join(COMMANDS)}")
    if argv[0] in ("list", "show"):
        from lit_methods import registry

        if argv[0] == "list" and argv[1:] in ([], ["--markdown"]):
            print(registry.format_table() if argv[1:] else registry.format_list())
        elif argv[0] == "show" and len(argv) == 2:
            try:
                print(registry.describe(argv[1]))
            except KeyError as error:
                sys.exit(error.args[0])
        else:
            sys.exit(f"usage: lit-methods list [--markdown] | lit-methods show SLUG; got {' '.join(argv)!r}")
        return
    try:
        LitMethodsCLI(args=argv)
    except Exception as error:
        if os.environ.get("LIT_METHODS_TRACEBACK"):
            raise
        print(f"lit-methods: error: {readable_error(error)}", file=sys.stderr)
        print("(set LIT_METHODS_TRACEBACK=1 to see the traceback)", file=sys.stderr)
        raise SystemExit(1) from None
