"""Run a whole federation in process from a lit-methods config:

    python -m lit_methods.federated --config experiments/fedloge/fedloge_convnet_digits.yaml [--rounds 20]

The config is the one ``lit-methods fit`` reads (``model``: the federated method, ``data``: a
:class:`~lit_methods.datamodules.FederatedDataModule` holding the clients, the rounds and the client sampling,
``trainer``: each client's local training, ``max_epochs`` being the local epochs). ``lit-methods fit`` with the same
file trains one client's local update (``--data.client=k``, or every shard pooled), this runner the federation. The
state (global weights, every client's private state, the rounds done) is saved to ``--state_path`` after every round
and a run started again with the same path resumes where it stopped. Metrics go to the config's logger, one step per
round. The same config runs on Flower with ``flwr run`` (see :mod:`lit_methods.federated.flower`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lit_methods.cli import LitMethodsCLI
from lit_methods.datamodules.federated import FederatedDataModule
from lit_methods.federated.core import FederatedMethod, Federation

#: trainer settings a client fit takes from the config (logging, checkpoints and callbacks belong to the runner)
CLIENT_TRAINER_KEYS = (
    "accelerator", "devices", "precision", "max_epochs", "max_steps", "limit_train_batches",
    "gradient_clip_val", "gradient_clip_algorithm", "deterministic", "accumulate_grad_batches",
)


def build_federation(config: str | Path, overrides: Sequence[str] = (), state_path: str | Path | None = None,
                     seed: int | None = None, keep_state: bool = True) -> Federation:
    """The :class:`Federation` of a lit-methods config (plus CLI-style ``overrides``, e.g. ``--data.rounds=5``).

    Its state is saved to and resumed from ``state_path`` (default: ``federation_state.pt`` in the logger's root
    folder); ``keep_state=False`` neither reads nor writes one (a Flower node)."""
    cli = LitMethodsCLI(args=["--config", str(config), *overrides], run=False)
    module, datamodule = cli.model, cli.datamodule
    if not isinstance(module, FederatedMethod):
        raise ValueError(f"{config}: the model {type(module).__name__} is not a federated method")
    if not isinstance(datamodule, FederatedDataModule):
        raise ValueError(f"{config}: the data {type(datamodule).__name__} is not a FederatedDataModule")
    trainer_config = cli.config.get("trainer")
    trainer_kwargs: dict[str, Any] = {k: trainer_config.get(k) for k in CLIENT_TRAINER_KEYS
                                      if trainer_config.get(k) is not None}
    if seed is None:
        seed = cli.config.get("seed_everything") or 0
    logger = cli.trainer.logger
    if not keep_state:
        return Federation(module, datamodule, trainer_kwargs, seed=int(seed), state_path=None, logger=None)
    if state_path is None:
        # the logger's root (not its versioned log_dir), so a restarted run finds the state of the stopped one
        root = Path(logger.root_dir) if logger is not None and getattr(logger, "root_dir", None) else Path("logs")
        state_path = root / "federation_state.pt"
    return Federation(module, datamodule, trainer_kwargs, seed=int(seed), state_path=state_path, logger=logger)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lit_methods.federated", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="a lit-methods config with a federated model and data")
    parser.add_argument("--rounds", type=int, default=None, help="rounds to reach (default: data.rounds)")
    parser.add_argument("--state_path", default=None, help="federation state file (default: in the log dir)")
    args, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    federation = build_federation(args.config, overrides, args.state_path)
    print(f"federation state: {federation.state_path} ({federation.state.rounds_done} rounds done)")
    state = federation.run(args.rounds)
    last = state.history[-1] if state.history else {}
    print({k: round(v, 4) for k, v in last.items() if k.startswith("global/")})


if __name__ == "__main__":
    main()
