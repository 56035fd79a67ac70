"""DeadNeuronRate and the ReLU hooks: counts on tensors with known zeros, what the hooks see, DDP sum states."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lit_methods.pruning import DeadNeuronRate, observe_relu_outputs
from tests.ddp_helpers import init_gloo, run_distributed


def test_rates_on_tensors_with_known_zeros():
    first = torch.tensor([[0.0, 1.0, 0.0, 2.0], [0.0, 0.0, 0.0, 3.0]])  # 5 of 8 zero
    second = torch.tensor([[[0.5, 0.0]], [[1.0, 2.0]]])  # 1 of 4 zero
    pooled, per_layer = DeadNeuronRate(2, "global"), DeadNeuronRate(2, "layer")
    for metric in (pooled, per_layer):
        metric.update(first, 0)
        metric.update(second, 1)
        metric.update(first, 0)  # a second batch of layer 0: 10 of 16
    assert pooled.compute().item() == pytest.approx(11 / 20)
    assert per_layer.compute().item() == pytest.approx((10 / 16 + 1 / 4) / 2)
    pooled.reset()
    pooled.update(torch.zeros(3), 1)
    assert pooled.compute().item() == 1.0


def test_layer_mean_skips_layers_never_seen():
    metric = DeadNeuronRate(3, "layer")
    metric.update(torch.tensor([0.0, 1.0]), 2)
    assert metric.compute().item() == 0.5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [(dict(num_layers=0), "num_layers must be an int >= 1, got 0"), (dict(num_layers=1, average="max"), "'max'")],
)
def test_bad_arguments_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DeadNeuronRate(**kwargs)
    with pytest.raises(ValueError, match="layer must lie in \\[0, 2\\), got 2"):
        DeadNeuronRate(2).update(torch.zeros(1), 2)


class _Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 6)
        self.act = nn.ReLU(inplace=True)
        self.second = nn.Linear(6, 5)

    def forward(self, x):
        hidden = self.act(self.first(x))
        return F.relu(self.second(hidden))  # functional: not observed


def test_hooks_observe_each_relu_module_call_once_and_not_functional_relu():
    torch.manual_seed(0)
    net = _Mixed()
    seen: list[tuple[int, torch.Tensor]] = []
    handles = observe_relu_outputs(net, lambda out, layer: seen.append((layer, out.clone())))
    x = torch.randn(7, 4)
    net(x)
    assert len(seen) == 1
    layer, observed = seen[0]
    assert layer == 0
    assert torch.equal(observed, torch.relu(net.first(x)))
    for handle in handles:
        handle.remove()
    net(x)
    assert len(seen) == 1


def test_a_net_without_relu_modules_is_rejected():
    with pytest.raises(ValueError, match="Linear has no nn.ReLU module"):
        observe_relu_outputs(nn.Linear(2, 2), lambda out, layer: None)


def _synced_rate() -> float:
    init_gloo()
    rank = int(os.environ["RANK"])
    metric = DeadNeuronRate(1)
    metric.update(torch.zeros(2) if rank == 0 else torch.ones(6))  # 2 dead of 8 over both ranks
    return metric.compute().item()


@pytest.mark.ddp
def test_the_rate_is_pooled_over_ranks():
    assert run_distributed(_synced_rate) == [0.25, 0.25]
