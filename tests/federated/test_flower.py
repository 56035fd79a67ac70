"""The Flower apps against the in-process runner: one simulated round gives the same global weights.

Ray starts worker processes (seconds to tens of seconds on 2 cores), so this is the only Flower simulation test;
everything else runs the in-process runner on the same functions.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

flwr = pytest.importorskip("flwr")

from lit_methods.federated.__main__ import build_federation  # noqa: E402
from lit_methods.federated.core import FederationState  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "experiments" / "fedloge" / "fedloge_convnet_digits.yaml"
# two clients, one round, a tiny SSE-C refinement: the federation of the equivalence check
TINY = ["--data.num_clients=2", "--data.rounds=1", "--model.sse_steps=5", "--trainer.logger=false"]


@pytest.mark.slow  # Flower simulation (Ray); the lead may add a `flower` marker
def test_one_flower_round_gives_the_in_process_global_weights(in_tmp_dir):
    """Same config and seeds: FedAvg of two FedLoGe clients through Flower's simulation engine (Ray workers, Message
    API, per-node context state) equals the in-process runner's round to float tolerance; a Flower round that skipped
    a client or averaged without sample-count weights would not (the clients' shards differ in size)."""
    from flwr.simulation import run_simulation

    from lit_methods.federated.flower import client_app, make_server_app

    in_process = build_federation(CONFIG, TINY, state_path=in_tmp_dir / "in_process.pt")
    initial = {k: v.clone() for k, v in in_process.state.global_state.items()}
    expected = in_process.run(1).global_state

    flower_state = in_tmp_dir / "flower.pt"
    server_app = make_server_app(CONFIG, overrides=TINY, state_path=flower_state)
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=2,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    assert flower_state.is_file(), "the Flower ServerApp saved no federation state"
    state = FederationState.load(flower_state)
    assert state.rounds_done == 1
    assert any(not torch.equal(initial[k], expected[k]) for k in expected), "the round changed nothing"
    for name, value in expected.items():
        torch.testing.assert_close(state.global_state[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_a_server_app_without_a_strategy_is_refused():
    from lit_methods.federated.flower import make_server_app

    with pytest.raises(ValueError, match="needs a strategy"):
        make_server_app(CONFIG, strategy_class=None)
