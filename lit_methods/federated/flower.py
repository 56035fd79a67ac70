"""Flower apps of the federated methods (flwr 1.4x Message API; ``pip install lit-methods[federated]``).

The same client update and server aggregation as the in-process runner (:mod:`lit_methods.federated.core`), wrapped:

* :data:`client_app`: a ``ClientApp`` whose ``train`` handler loads the global arrays into the method, fits it on
  the node's shard (``context.node_config["partition-id"]``) with :func:`~lit_methods.federated.core.client_update`
  and replies with the new global arrays; the client-private state (FedLoGe's local head, FedoSSL's centroids)
  lives in the node's ``context.state`` and so survives between rounds of the run.
* :class:`MethodStrategy`: a ``FedAvg`` subclass whose ``aggregate_train`` is the method's server update
  (:func:`~lit_methods.federated.core.server_update`: FedAvg weighted by sample counts plus the method's extras).
* :func:`make_server_app` / :data:`server_app`: a ``ServerApp`` that builds the method and the strategy from a
  lit-methods config, runs the rounds and saves the global state (with the rounds done) after every round; started
  again with the same ``state-path`` it continues from the saved global state and round (client-private state of a
  Flower run lives on the nodes for that run; the in-process runner's state file holds it too).

The config travels to the clients in the train ``ConfigRecord`` (``lit-config``: the YAML path, ``lit-overrides``:
CLI-style overrides), so ``flwr run`` needs only ``[tool.flwr.app.config] lit-config = "..."`` (see
``experiments/fedloge/flower/pyproject.toml``), and :func:`flwr.simulation.run_simulation` runs a whole federation on
one machine: ``run_simulation(make_server_app("experiments/fedloge/fedloge_convnet_digits.yaml"), client_app,
num_supernodes=5)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import lru_cache
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from lit_methods.federated.core import ClientResult, FederatedMethod, Federation, FederationState, client_update, server_update

__all__ = ["MethodStrategy", "client_app", "make_server_app", "run_server", "server_app"]

PARTITION_KEY = "partition-id"
NUM_EXAMPLES_KEY = "num-examples"
CLIENT_STATE_KEY = "lit-client-state"


def _state_dict(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in record.to_torch_state_dict().items()}


def _record(state: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in state.items()})


@lru_cache(maxsize=4)
def _federation(config: str, overrides: tuple[str, ...]) -> Federation:
    """The method, data and client trainer settings of a config, built once per process (a node's ClientApp is
    called anew every round)."""
    from lit_methods.federated.__main__ import build_federation

    return build_federation(config, overrides, state_path=None, keep_state=False)


class MethodStrategy(FedAvg):
    """FedAvg whose aggregation is the federated method's server update (sorted by partition id, so the sum runs in
    the same order as in process); every other FedAvg argument (fractions, minimum nodes) is FedAvg's."""

    def __init__(self, module: FederatedMethod, **kwargs: Any) -> None:
        if not isinstance(module, FederatedMethod):
            raise TypeError(f"MethodStrategy needs a FederatedMethod, got {type(module).__name__}")
        super().__init__(**kwargs)
        self.module = module
        self.round_offset = 0

    def valid_replies(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """The replies without an error, each checked to carry the arrays and the two metrics the server update
        reads; every error reply is logged with its node and reason (FedAvg aggregates over the rest, as Flower's
        own strategies do), and a reply without those records is refused with an error naming the node."""
        valid = []
        for message in replies:
            node = message.metadata.src_node_id
            if message.has_error():
                log(WARNING, "round %d: node %d replied with an error (left out of the aggregation): %s",
                    server_round, node, message.error.reason)
                continue
            content = message.content
            if self.arrayrecord_key not in content.array_records:
                raise ValueError(f"round {server_round}: node {node}'s reply has no ArrayRecord "
                                 f"{self.arrayrecord_key!r} (it has {list(content.array_records)})")
            metrics = content.metric_records.get("metrics")
            missing = [k for k in (PARTITION_KEY, NUM_EXAMPLES_KEY) if metrics is None or k not in metrics]
            if missing:
                raise ValueError(f"round {server_round}: node {node}'s reply has no metrics {missing}")
            valid.append(message)
        log(INFO, "round %d: %d client updates to aggregate", server_round, len(valid))
        return valid

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid = self.valid_replies(server_round, replies)
        if not valid:
            return None, None
        results = []
        for message in valid:
            metrics = message.content["metrics"]
            results.append(
                ClientResult(
                    client=int(metrics[PARTITION_KEY]),
                    global_state=_state_dict(message.content[self.arrayrecord_key]),
                    client_state={},
                    num_samples=int(metrics[NUM_EXAMPLES_KEY]),
                )
            )
        new_state = server_update(self.module, results, self.round_offset + server_round - 1)
        metrics = self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)
        return _record(new_state), metrics


def run_server(
    grid: Grid,
    config: str | Path,
    strategy_class: type[MethodStrategy] | None = MethodStrategy,
    overrides: Sequence[str] = (),
    rounds: int | None = None,
    state_path: str | Path | None = None,
) -> FederationState:
    """Run a federation of the config's method over ``grid`` with ``strategy_class`` (fraction and minimum nodes
    from the config's data), saving and resuming its global state at ``state_path``."""
    if strategy_class is None:
        raise ValueError(
            "a Flower ServerApp needs a strategy: give strategy_class (lit_methods.federated.flower.MethodStrategy "
            "or a subclass)"
        )
    config_path = Path(config).resolve()
    if not config_path.is_file():
        raise FileNotFoundError(
            f"lit-config {str(config)!r} is not a file (resolved to {config_path}; a relative path is resolved against "
            f"the ServerApp's working directory {Path.cwd()}, for `flwr run` the SuperLink's)"
        )
    config = str(config_path)
    federation = _federation(config, tuple(overrides))
    module, dm = federation.module, federation.datamodule
    fraction = dm.clients_per_round if isinstance(dm.clients_per_round, float) else dm.clients_per_round / dm.num_clients
    strategy = strategy_class(
        module,
        fraction_train=fraction,
        fraction_evaluate=0.0,
        min_train_nodes=1,
        min_available_nodes=dm.num_clients,
    )
    state = federation.state
    if state_path is not None and Path(state_path).is_file():
        state = FederationState.load(state_path)
    rounds = dm.rounds if rounds is None else rounds
    strategy.round_offset = state.rounds_done
    remaining = rounds - state.rounds_done
    if remaining <= 0:
        return state
    train_config = ConfigRecord(
        {"lit-config": config, "lit-overrides": list(overrides) or [""], "round-offset": state.rounds_done}
    )

    def after_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return None
        state.global_state = _state_dict(arrays)
        state.rounds_done = strategy.round_offset + server_round
        module.load_states(state.global_state, state.client_states[0])
        metrics = {f"global/{k}": v for k, v in module.federation_metrics(dm).items()}
        state.history.append({"round": float(state.rounds_done - 1), **metrics})
        if state_path is not None:
            state.save(state_path)
        return MetricRecord(metrics) if metrics else None

    strategy.start(
        grid=grid,
        initial_arrays=_record(state.global_state),
        num_rounds=remaining,
        train_config=train_config,
        evaluate_fn=after_round,
    )
    return state


def make_server_app(
    config: str | Path,
    strategy_class: type[MethodStrategy] | None = MethodStrategy,
    overrides: Sequence[str] = (),
    rounds: int | None = None,
    state_path: str | Path | None = None,
) -> ServerApp:
    """A ``ServerApp`` running :func:`run_server` on the given config (for ``run_simulation`` or a Python entry)."""
    if strategy_class is None:
        raise ValueError(
            "a Flower ServerApp needs a strategy: give strategy_class (lit_methods.federated.flower.MethodStrategy "
            "or a subclass)"
        )
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, config, strategy_class, overrides, rounds, state_path)

    return app


server_app = ServerApp()


@server_app.main()
def _main_from_run_config(grid: Grid, context: Context) -> None:
    """``flwr run``'s ServerApp: the config path and options come from ``[tool.flwr.app.config]``."""
    run_config = context.run_config
    if "lit-config" not in run_config:
        raise ValueError("[tool.flwr.app.config] must set lit-config, the path of a lit-methods federated config")
    overrides = [o for o in str(run_config.get("lit-overrides", "")).split() if o]
    rounds = int(run_config["rounds"]) if "rounds" in run_config else None
    state_path = run_config.get("state-path") or None
    run_server(grid, str(run_config["lit-config"]), MethodStrategy, overrides, rounds, state_path)


client_app = ClientApp()


@client_app.train()
def _train(message: Message, context: Context) -> Message:
    """One round of this node's client: the global arrays in, the local update's global arrays out; its private
    state kept in ``context.state``."""
    config = message.content["config"]
    overrides = tuple(o for o in config["lit-overrides"] if o)
    federation = _federation(str(config["lit-config"]), overrides)
    module, dm = federation.module, federation.datamodule
    partition = int(context.node_config[PARTITION_KEY])
    num_partitions = int(context.node_config.get("num-partitions", dm.num_clients))
    if num_partitions != dm.num_clients:
        raise ValueError(f"the federation runs {num_partitions} nodes but the config's data has {dm.num_clients} clients")
    round_index = int(config["round-offset"]) + int(config["server-round"]) - 1
    if CLIENT_STATE_KEY in context.state:
        client_state = _state_dict(context.state[CLIENT_STATE_KEY])
    else:
        client_state = federation.state.client_states[partition]
    result = client_update(
        module, _state_dict(message.content["arrays"]), client_state, dm, partition, round_index,
        federation.trainer_kwargs, federation.seed,
    )
    if result.client_state:
        context.state[CLIENT_STATE_KEY] = _record(result.client_state)
    metrics = MetricRecord({NUM_EXAMPLES_KEY: result.num_samples, PARTITION_KEY: partition,
                            **{k.replace("/", "-"): v for k, v in result.metrics.items()}})
    return Message(RecordDict({"arrays": _record(result.global_state), "metrics": metrics}), reply_to=message)
