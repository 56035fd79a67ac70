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
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentParser, Namespace
from lightning import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger

__all__ = [
    "DATA_FACTS",
    "LitMethodsCLI",
    "SaveAndLogConfig",
    "fill_data_facts",
    "main",
    "redact_namespace",
    "redact_secrets",
    "resolve_config_path",
]

DATA_FACTS = ("num_classes", "in_channels", "image_size", "mean", "std", "inputs_normalized", "num_subgroups")
_SECRET_KEY = re.compile(r"(api[_-]?key|token|secret|password)", re.IGNORECASE)
REDACTED = "<redacted>"
REGISTRY_COMMANDS = (
    "The method registry: `lit-methods list` prints one line per method (`--markdown`: the README table); "
    "`lit-methods show SLUG` prints a method's paper, classes, configs and status."
)
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
    """Saves the resolved config to the run's log dir and pushes it to wandb when a WandbLogger is attached.

    Values under secret-looking keys (``api_key``, ``token``, ``secret``, ``password``) are redacted in both.
    """

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.config = redact_namespace(self.config)
        super().setup(trainer, pl_module, stage)

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.config.update(self.config.as_dict(), allow_val_change=True)


class LitMethodsCLI(LightningCLI):
    """LightningCLI in subclass mode for models and datamodules, with data facts filled into the model config.

    Logs go to CSV files under ``logs/`` unless the config names another logger (or ``--trainer.logger=false``).
    """

    def __init__(self, args: Sequence[str] | None = None, run: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_callback", SaveAndLogConfig)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("trainer_defaults", {"logger": DEFAULT_LOGGER})
        kwargs["parser_kwargs"] = {"epilog": REGISTRY_COMMANDS, **kwargs.get("parser_kwargs", {})}
        super().__init__(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=None if args is None else resolve_args(args),
            run=run,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=False,
            help="fit only: run the test loop on the final weights when training ends",
        )

    def after_fit(self) -> None:
        if self.config[self.subcommand].get("test_after_fit"):
            self.trainer.test(self.model, datamodule=self.datamodule)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        fill_data_facts(config)


def fill_data_facts(config: Namespace) -> None:
    """Write the datamodule's facts (:data:`DATA_FACTS`) into the model config (see the module doc)."""
    if config.get("data") is None or config.get("model") is None:
        return
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(LightningDataModule, "data")
    datamodule = parser.instantiate_classes(Namespace(data=config.data)).data
    facts = {name: getattr(datamodule, name) for name in DATA_FACTS if hasattr(datamodule, name)}
    facts = {k: list(v) if isinstance(v, tuple) else v for k, v in facts.items()}
    targets = [config.model]
    init_args = config.model.get("init_args") or Namespace()
    targets += [v for v in vars(init_args).values() if isinstance(v, Namespace) and "class_path" in v]
    for target in targets:
        defaults = _parameter_defaults(_import_class(target.class_path))
        if target.get("init_args") is None:
            target.init_args = Namespace()
        for name, value in facts.items():
            if name not in defaults:
                continue
            given, default = target.init_args.get(name), defaults[name]
            if name == "image_size":
                given, default = _square(given), _square(default)
            if given is not None and _as_fact(given) not in (_as_fact(default), _as_fact(value)):
                raise ValueError(
                    f"{target.class_path} was given {name}={given!r} but the datamodule has {name}={value!r}; "
                    f"leave {name} out: the CLI fills it from the data"
                )
            target.init_args[name] = value


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
    """Resolve the paths of every ``--config`` argument with :func:`resolve_config_path`."""
    resolved: list[str] = []
    expect_path = False
    for arg in args:
        if expect_path:
            resolved.append(resolve_config_path(arg))
            expect_path = False
        elif arg == "--config":
            resolved.append(arg)
            expect_path = True
        elif arg.startswith("--config="):
            resolved.append("--config=" + resolve_config_path(arg.removeprefix("--config=")))
        else:
            resolved.append(arg)
    return resolved


def main(args: Sequence[str] | None = None) -> None:
    """Console entry point: ``lit-methods {fit,validate,test,predict} ...``, ``list [--markdown]`` and ``show SLUG``."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] in ("list", "show"):
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
    LitMethodsCLI(args=argv)
