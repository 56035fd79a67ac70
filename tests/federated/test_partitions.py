"""Client partitions, local test sets, client sampling and FedAvg of the federated platform."""

from __future__ import annotations

import pytest
import torch

from lit_methods.datamodules import DigitsDataModule, FederatedDataModule
from lit_methods.datamodules.federated import (
    dirichlet_partition,
    iid_partition,
    local_test_indices,
    sample_round_clients,
)
from lit_methods.datamodules.subsets import long_tailed_counts
from lit_methods.federated import fedavg


def test_dirichlet_partition_assigns_every_index_once_and_is_seeded():
    labels = torch.arange(10).repeat_interleave(30)
    shards = dirichlet_partition(labels, num_clients=7, alpha=0.3, seed=1)
    assert torch.equal(torch.cat(shards).sort().values, torch.arange(len(labels)))
    assert all(len(s) >= 1 for s in shards)
    again = dirichlet_partition(labels, num_clients=7, alpha=0.3, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(shards, again))
    other = dirichlet_partition(labels, num_clients=7, alpha=0.3, seed=2)
    assert any(not torch.equal(a, b) for a, b in zip(shards, other))


def test_small_alpha_skews_the_class_mix_and_large_alpha_evens_it():
    """Mean over clients of the largest class share: near 1 for alpha=0.05, near 1/C for alpha=1000."""
    labels = torch.arange(10).repeat_interleave(100)

    def top_share(alpha: float) -> float:
        shards = dirichlet_partition(labels, num_clients=5, alpha=alpha, seed=0)
        return sum(torch.bincount(labels[s], minlength=10).max().item() / len(s) for s in shards) / len(shards)

    assert top_share(0.05) > 0.5
    assert top_share(1000.0) < 0.2


def test_iid_partition_sizes_differ_by_at_most_one():
    shards = iid_partition(103, 4, seed=0)
    assert sorted(len(s) for s in shards) == [25, 26, 26, 26]
    assert torch.equal(torch.cat(shards).sort().values, torch.arange(103))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_clients": 11, "alpha": 0.5}, "num_clients=11 is more than the 10 training samples"),
        ({"num_clients": 2, "alpha": 0.0}, "alpha must be > 0"),
        ({"num_clients": 2, "alpha": -1.0}, "alpha must be > 0"),
        ({"num_clients": 0, "alpha": 0.5}, "num_clients must be >= 1"),
    ],
)
def test_dirichlet_partition_refuses_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        dirichlet_partition(torch.arange(10) % 2, seed=0, **kwargs)


def test_federated_datamodule_refuses_bad_input():
    digits = DigitsDataModule(num_workers=0)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        FederatedDataModule(digits, alpha=0.0)
    with pytest.raises(ValueError, match="clients_per_round must lie in"):
        FederatedDataModule(digits, num_clients=3, clients_per_round=4)
    with pytest.raises(ValueError, match="client must lie in"):
        FederatedDataModule(digits, num_clients=3, client=3)
    with pytest.raises(ValueError, match="fast_loader=True"):
        FederatedDataModule(DigitsDataModule(num_workers=0, fast_loader=False))
    too_many = FederatedDataModule(digits, num_clients=5000)
    with pytest.raises(ValueError, match="num_clients=5000 is more than the 1347 training samples"):
        too_many.setup("fit")


def test_long_tailed_federation_keeps_the_lt_counts_and_shards_them_exactly_once():
    """Fed-LT on digits (imbalance factor 10): the union of the shards is the long-tailed split, class counts follow
    the LT formula, and the client batches carry their client id."""
    dm = FederatedDataModule(DigitsDataModule(num_workers=0, imbalance_factor=10.0), num_clients=5, alpha=0.5)
    dm.setup("fit")
    labels = dm.dataset.train_labels
    balanced = DigitsDataModule(num_workers=0)
    balanced.setup("fit")
    head = torch.bincount(balanced.train_labels).min().item()
    assert torch.bincount(labels).tolist() == long_tailed_counts(head, 10, 10.0)
    assert torch.equal(torch.cat(dm.shards).sort().values, torch.arange(len(labels)))
    dm.select(3, round_index=0)
    batches = list(dm.train_dataloader())
    assert sum(len(b["targets"]) for b in batches) == len(dm.client_indices(3))
    assert all((b["client"] == 3).all() for b in batches)
    assert torch.equal(torch.cat([b["targets"] for b in batches]).sort().values, dm.client_labels(3).sort().values)


def test_local_test_set_mirrors_the_client_class_mix():
    client_labels = torch.tensor([0] * 30 + [1] * 10)
    test_labels = torch.arange(3).repeat_interleave(50)
    index = local_test_indices(client_labels, num_train=100, test_labels=test_labels, num_classes=3, seed=0)
    assert torch.bincount(test_labels[index], minlength=3).tolist() == [45, 15, 0]


def test_round_clients_are_a_seeded_function_of_the_round():
    first = sample_round_clients(10, 0.3, seed=0, round_index=4)
    assert len(first) == 3 and first == sorted(set(first))
    assert first == sample_round_clients(10, 0.3, seed=0, round_index=4)
    assert any(sample_round_clients(10, 0.3, seed=0, round_index=r) != first for r in range(5))
    assert sample_round_clients(4, 1.0, seed=0, round_index=0) == [0, 1, 2, 3]


def test_fedavg_is_the_sample_weighted_mean():
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([4.0, 8.0]), "n": torch.tensor(5)}
    averaged = fedavg([a, b], [1.0, 2.0])
    torch.testing.assert_close(averaged["w"], torch.tensor([3.0, 6.0]))
    assert averaged["n"].item() == 3
    with pytest.raises(ValueError, match="one weight per state"):
        fedavg([a, b], [1.0])
    with pytest.raises(ValueError, match="differ in keys"):
        fedavg([a, {"w": b["w"]}], [1.0, 1.0])
