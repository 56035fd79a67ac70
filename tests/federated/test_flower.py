"""The Flower apps against the in-process runner: one simulated round gives the same global weights.

Ray starts worker processes (seconds to tens of seconds on 2 cores), so this is the only Flower simulation test
(marked ``flower``); everything else runs the in-process runner on the same functions. ``flwr run`` of the example
app (experiments/fedloge/flower) takes minutes (a SuperLink, a simulation process and Ray): it was run by hand and
its command and output are in the README.
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


@pytest.mark.slow
@pytest.mark.flower
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


class _Reply:
    """The parts of a reply ``Message`` the strategy reads (a real one needs a running Flower run to be built)."""

    def __init__(self, node: int, content=None, error: str | None = None):
        from types import SimpleNamespace

        self.metadata = SimpleNamespace(src_node_id=node)
        self.content = content
        self.error = SimpleNamespace(reason=error)

    def has_error(self) -> bool:
        return self.error.reason is not None


def test_the_strategy_leaves_out_error_replies_loudly_and_refuses_incomplete_ones(caplog):
    """The strategy's own reply check (not FedAvg's private one): an error reply is dropped with its node and
    reason logged, a reply without the sample count is refused naming the node; a check that passed every reply
    through would fail the first assertion, one that dropped silently the log assertion."""
    import logging

    from flwr.app import ArrayRecord, MetricRecord, RecordDict

    from lit_methods.federated import FedLoGe
    from lit_methods.federated.flower import MethodStrategy
    from lit_methods.nets import ConvNet

    backbone = ConvNet(num_classes=10, in_channels=1, depth=1, width=4, image_size=8)
    strategy = MethodStrategy(FedLoGe(backbone, num_classes=10, in_channels=1, image_size=(8, 8), sse_steps=1))

    def content(metrics):
        return RecordDict({"arrays": ArrayRecord({"w": torch.zeros(2)}), "metrics": MetricRecord(metrics)})

    good = _Reply(3, content({"partition-id": 0, "num-examples": 10}))
    failed = _Reply(4, error="client ran out of memory")
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.addHandler(caplog.handler)
    try:
        assert strategy.valid_replies(1, [good, failed]) == [good]
    finally:
        flwr_logger.removeHandler(caplog.handler)
    assert "node 4" in caplog.text and "client ran out of memory" in caplog.text
    with pytest.raises(ValueError, match=r"node 5.*num-examples"):
        strategy.valid_replies(1, [_Reply(5, content({"partition-id": 1}))])
    with pytest.raises(ValueError, match=r"node 6.*ArrayRecord"):
        strategy.valid_replies(1, [_Reply(6, RecordDict({"metrics": MetricRecord({"num-examples": 1})}))])


def test_a_missing_lit_config_is_named_with_the_directory_it_was_resolved_against(in_tmp_dir):
    from lit_methods.federated.flower import run_server

    with pytest.raises(FileNotFoundError, match="no_such.yaml.*working directory"):
        run_server(grid=None, config="no_such.yaml")


def test_a_server_app_without_a_strategy_is_refused():
    from lit_methods.federated.flower import make_server_app

    with pytest.raises(ValueError, match="needs a strategy"):
        make_server_app(CONFIG, strategy_class=None)
