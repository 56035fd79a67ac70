"""The federated platform: client update and server aggregation as plain functions over state dicts, and the
in-process runner that drives them round after round (the Flower apps in :mod:`lit_methods.federated.flower` wrap
the same functions).

A federated method is a LightningModule with :class:`FederatedMethod` mixed in. Its state dict splits in two by key
prefix: the **global** state (shared and aggregated by the server) and the **client-private** state
(:attr:`FederatedMethod.private_prefixes`: FedLoGe's local head, FedoSSL's local centroids and memory), which never
leaves its client. A client's local training is an ordinary Lightning fit of the module on its shard
(:func:`client_update`); the server combines the clients' global states with the method's
:meth:`FederatedMethod.aggregate` (FedAvg weighted by sample counts by default, plus the method's server-side
extras) in :func:`server_update`.

Randomness is derived, never carried: client ``k``'s fit in round ``r`` is seeded from ``(seed, r, k)`` and the
clients of round ``r`` are sampled from ``(seed, r)``, so one round gives the same weights in process, under Flower,
and after resuming a saved :class:`FederationState`.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import Logger
from torch import Tensor

from lit_methods.datamodules.federated import FederatedDataModule

__all__ = [
    "ClientResult",
    "FederatedMethod",
    "Federation",
    "FederationState",
    "client_seed",
    "client_update",
    "fedavg",
    "server_update",
]

StateDict = dict[str, Tensor]
#: Trainer arguments every client fit gets (no logging, checkpoints or progress bars inside a round).
QUIET_TRAINER = {
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "num_sanity_val_steps": 0,
    "limit_val_batches": 0,
}


def fedavg(states: Sequence[Mapping[str, Tensor]], weights: Sequence[float]) -> StateDict:
    """Weighted average of state dicts (McMahan et al., FedAvg, arXiv:1602.05629), key by key.

    Floating-point tensors are averaged with ``weights`` (normalised to sum 1); integer tensors (BatchNorm's
    ``num_batches_tracked``) take the first state's value. The states must share their keys.
    """
    if not states or len(states) != len(weights):
        raise ValueError(f"fedavg needs one weight per state, got {len(states)} states and {len(weights)} weights")
    if any(not (w >= 0 and math.isfinite(w)) for w in weights) or sum(weights) <= 0:
        raise ValueError(f"fedavg weights must be finite, >= 0 and not all 0, got {list(weights)}")
    keys = set(states[0])
    for state in states[1:]:
        if set(state) != keys:
            raise ValueError(f"the states to average differ in keys: {sorted(keys ^ set(state))}")
    total = float(sum(weights))
    averaged: StateDict = {}
    for key, first in states[0].items():
        if first.is_floating_point():
            acc = torch.zeros_like(first, dtype=torch.float64)
            for state, weight in zip(states, weights):
                acc += state[key].to(torch.float64) * (weight / total)
            averaged[key] = acc.to(first.dtype)
        else:
            averaged[key] = first.clone()
    return averaged


@dataclass
class ClientResult:
    """What one client hands back after its local update: its new global state (to aggregate), its new private
    state (kept on the client), its sample count (the FedAvg weight) and its training metrics."""

    client: int
    global_state: StateDict
    client_state: StateDict
    num_samples: int
    metrics: dict[str, float] = field(default_factory=dict)


class FederatedMethod:
    """Mixin of the LightningModules that train in a federation (see the module doc).

    Subclasses set :attr:`private_prefixes` and may override :meth:`aggregate` (server-side extras),
    :meth:`client_metrics` and :meth:`federation_metrics`.
    """

    #: state-dict key prefixes of the client-private state
    private_prefixes: ClassVar[tuple[str, ...]] = ()

    def is_private(self, key: str) -> bool:
        return key.startswith(self.private_prefixes) if self.private_prefixes else False

    def split_state(self) -> tuple[StateDict, StateDict]:
        """``(global, private)`` copies of this module's state dict."""
        state = self.state_dict()  # type: ignore[attr-defined]
        shared = {k: v.detach().clone() for k, v in state.items() if not self.is_private(k)}
        private = {k: v.detach().clone() for k, v in state.items() if self.is_private(k)}
        return shared, private

    def load_states(self, global_state: Mapping[str, Tensor], client_state: Mapping[str, Tensor]) -> None:
        """Load a global and a private state; together they must cover the whole state dict."""
        self.load_state_dict({**global_state, **client_state}, strict=True)  # type: ignore[attr-defined]

    def aggregate(self, results: Sequence[ClientResult], round_index: int) -> StateDict:
        """The server's new global state from the clients' results: FedAvg weighted by sample counts."""
        return fedavg([r.global_state for r in results], [float(r.num_samples) for r in results])

    def client_metrics(self, datamodule: FederatedDataModule, client: int) -> dict[str, float]:
        """Metrics of this module (loaded with the client's states) on the client's local test set; none here."""
        return {}

    def federation_metrics(self, datamodule: FederatedDataModule) -> dict[str, float]:
        """Metrics of the global model (loaded) after a round, e.g. balanced test accuracy; none here."""
        return {}


@contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Silence Lightning's per-fit banners (accelerators, 'max_epochs reached') for the many fits of a federation."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def client_seed(seed: int, round_index: int, client: int) -> int:
    """The seed of client ``client``'s fit in round ``round_index``."""
    return int(np.random.SeedSequence([seed, round_index, client]).generate_state(1)[0])


def client_update(
    module: L.LightningModule,
    global_state: Mapping[str, Tensor],
    client_state: Mapping[str, Tensor],
    datamodule: FederatedDataModule,
    client: int,
    round_index: int,
    trainer_kwargs: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> ClientResult:
    """One client's local update: load the states, fit the module on the client's shard (an ordinary Lightning fit
    with ``trainer_kwargs``, e.g. ``max_epochs`` = local epochs), return its new states and sample count."""
    if not isinstance(module, FederatedMethod):
        raise TypeError(f"{type(module).__name__} is not a FederatedMethod (mix lit_methods.federated.FederatedMethod in)")
    module.load_states(global_state, client_state)
    datamodule.select(client, round_index)
    L.seed_everything(client_seed(seed, round_index, client), verbose=False)
    with _quiet_lightning():
        trainer = L.Trainer(**{**dict(trainer_kwargs or {}), **QUIET_TRAINER})
        trainer.fit(module, datamodule=datamodule)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    new_global, new_private = module.split_state()
    num_samples = len(datamodule.client_indices(client))
    return ClientResult(client, new_global, new_private, num_samples, metrics)


def server_update(module: FederatedMethod, results: Sequence[ClientResult], round_index: int) -> StateDict:
    """The new global state: the method's aggregation of the results, taken in client order (so the sum is the same
    whatever order the replies arrived in)."""
    if not results:
        raise ValueError(f"round {round_index}: no client result to aggregate")
    return module.aggregate(sorted(results, key=lambda r: r.client), round_index)


@dataclass
class FederationState:
    """All a federation needs to resume exactly: the rounds done, the global state, every client's private state
    and the metric history. Random states are not needed: every draw derives from ``(seed, round, client)``."""

    rounds_done: int
    global_state: StateDict
    client_states: dict[int, StateDict]
    history: list[dict[str, float]] = field(default_factory=list)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(path.suffix + ".partial")
        torch.save(
            {
                "rounds_done": self.rounds_done,
                "global_state": self.global_state,
                "client_states": {str(k): v for k, v in self.client_states.items()},
                "history": json.dumps(self.history),
            },
            partial,
        )
        partial.replace(path)  # an interrupted save leaves the previous state intact

    @classmethod
    def load(cls, path: str | Path) -> FederationState:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        return cls(
            rounds_done=int(saved["rounds_done"]),
            global_state=saved["global_state"],
            client_states={int(k): v for k, v in saved["client_states"].items()},
            history=json.loads(saved["history"]),
        )


class Federation:
    """The in-process runner: every round samples clients, runs :func:`client_update` for each in turn and
    :func:`server_update`, logs per-client and global metrics, and saves a :class:`FederationState`.

    Args:
        module: the federated method (its initial weights are the initial global state and every client's initial
            private state).
        datamodule: the federation's data (clients, rounds and client sampling).
        trainer_kwargs: arguments of each client's ``Trainer`` (``max_epochs``: local epochs).
        seed: seed of the client fits (the client sampling uses ``datamodule.seed``).
        state_path: where the federation state is saved after every round and resumed from when it exists.
        logger: a Lightning logger receiving ``log_metrics(metrics, step=round)`` every round.
        evaluate_clients: also compute each trained client's local-test metrics every round.
    """

    def __init__(
        self,
        module: L.LightningModule,
        datamodule: FederatedDataModule,
        trainer_kwargs: Mapping[str, Any] | None = None,
        seed: int = 0,
        state_path: str | Path | None = None,
        logger: Logger | None = None,
        evaluate_clients: bool = True,
    ) -> None:
        if not isinstance(module, FederatedMethod):
            raise TypeError(f"{type(module).__name__} is not a FederatedMethod")
        if not isinstance(datamodule, FederatedDataModule):
            raise TypeError(f"the data must be a FederatedDataModule, got {type(datamodule).__name__}")
        self.module = module
        self.datamodule = datamodule
        self.trainer_kwargs = dict(trainer_kwargs or {})
        self.seed = seed
        self.state_path = None if state_path is None else Path(state_path)
        self.logger = logger
        self.evaluate_clients = evaluate_clients
        datamodule.prepare_data()
        datamodule.setup("fit")
        if self.state_path is not None and self.state_path.is_file():
            self.state = FederationState.load(self.state_path)
        else:
            global_state, private = module.split_state()
            self.state = FederationState(0, global_state, {k: private for k in range(datamodule.num_clients)})

    def run_round(self) -> dict[str, float]:
        """Run the next round, save the state and return its metrics."""
        state, module, dm = self.state, self.module, self.datamodule
        round_index = state.rounds_done
        results, metrics = [], {"round": float(round_index)}
        for client in dm.round_clients(round_index):
            result = client_update(
                module, state.global_state, state.client_states[client], dm, client, round_index,
                self.trainer_kwargs, self.seed,
            )
            results.append(result)
            state.client_states[client] = result.client_state
            metrics |= {f"client_{client}/{k}": v for k, v in result.metrics.items()}
        state.global_state = server_update(module, results, round_index)
        if self.evaluate_clients:
            for result in results:
                module.load_states(state.global_state, state.client_states[result.client])
                client_metrics = module.client_metrics(dm, result.client)
                metrics |= {f"client_{result.client}/{k}": v for k, v in client_metrics.items()}
        module.load_states(state.global_state, state.client_states[results[0].client])
        metrics |= {f"global/{k}": v for k, v in module.federation_metrics(dm).items()}
        state.rounds_done = round_index + 1
        state.history.append(metrics)
        if self.logger is not None:
            self.logger.log_metrics(metrics, step=round_index)
        if self.state_path is not None:
            state.save(self.state_path)
        return metrics

    def run(self, rounds: int | None = None) -> FederationState:
        """Run until ``rounds`` rounds are done (default: ``datamodule.rounds``), resuming from the saved state."""
        rounds = self.datamodule.rounds if rounds is None else rounds
        while self.state.rounds_done < rounds:
            self.run_round()
        if self.logger is not None:
            self.logger.save()
        return self.state
