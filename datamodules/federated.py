"""Federated client partitions of an in-memory dataset: Dirichlet (non-IID) or IID shards, local test sets that mirror
each client's class mix, and the per-round client sampling of a federation.

The Dirichlet split is the per-class one of Hsu et al. ("Measuring the Effects of Non-Identical Data Distribution for
Federated Visual Classification", arXiv:1909.06335) as FedLoGe (arXiv:2401.08977) uses it: for every class a share
vector ``p ~ Dir(alpha * 1_K)`` over the ``K`` clients, then each image of that class goes to a client drawn from
``p``. A long-tailed federation (Fed-LT) is this split of a long-tailed training split (the wrapped datamodule's
``imbalance_factor``). Everything is seeded: the same seed gives the same shards on every machine.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from lit_methods.datamodules.base import InMemoryVisionDataModule, WrappingDataModule
from lit_methods.datamodules.fast import InMemoryBatchLoader, ShardedEpochSampler

__all__ = [
    "FederatedDataModule",
    "OpenWorldFederatedDataModule",
    "dirichlet_partition",
    "iid_partition",
    "local_test_indices",
    "open_world_partition",
    "sample_round_clients",
]

MAX_DIRICHLET_DRAWS = 1000


def _check_clients(num_samples: int, num_clients: int) -> None:
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if num_clients > num_samples:
        raise ValueError(f"num_clients={num_clients} is more than the {num_samples} training samples to share")


def iid_partition(num_samples: int, num_clients: int, seed: int) -> list[Tensor]:
    """A seeded permutation of ``range(num_samples)`` cut into ``num_clients`` shards of sizes differing by <= 1."""
    _check_clients(num_samples, num_clients)
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))
    return [shard.sort().values for shard in order.tensor_split(num_clients)]


def dirichlet_partition(
    labels: Tensor, num_clients: int, alpha: float, seed: int, min_client_samples: int = 1
) -> list[Tensor]:
    """Per-class Dirichlet shards: each class's images go to clients drawn from ``p ~ Dir(alpha * 1)``.

    Every index of ``labels`` lands in exactly one shard. Draws that leave a client with fewer than
    ``min_client_samples`` images are redrawn (from the same seeded generator); a ``ValueError`` names ``alpha`` when
    no draw in :data:`MAX_DIRICHLET_DRAWS` gives every client enough.
    """
    _check_clients(len(labels), num_clients)
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0 (the Dirichlet concentration), got {alpha}")
    if min_client_samples < 0 or min_client_samples * num_clients > len(labels):
        raise ValueError(
            f"min_client_samples={min_client_samples} cannot hold for {num_clients} clients of {len(labels)} samples"
        )
    rng = np.random.default_rng(seed)
    labels_np = labels.cpu().numpy()
    classes = np.unique(labels_np)
    for _ in range(MAX_DIRICHLET_DRAWS):
        owner = np.empty(len(labels_np), dtype=np.int64)
        for c in classes:
            positions = np.flatnonzero(labels_np == c)
            shares = rng.dirichlet(np.full(num_clients, alpha))
            owner[positions] = rng.choice(num_clients, size=len(positions), p=shares)
        counts = np.bincount(owner, minlength=num_clients)
        if counts.min() >= min_client_samples:
            return [torch.from_numpy(np.flatnonzero(owner == k)) for k in range(num_clients)]
    raise ValueError(
        f"alpha={alpha} left some of the {num_clients} clients with fewer than {min_client_samples} samples in "
        f"{MAX_DIRICHLET_DRAWS} draws: raise alpha or lower num_clients or min_client_samples"
    )


def local_test_indices(
    client_labels: Tensor, num_train: int, test_labels: Tensor, num_classes: int, seed: int
) -> Tensor:
    """A client's local test set drawn from the balanced test split, mirroring its share and class mix (FedLoGe):
    ``int(n_kc / num_train * len(test_labels))`` test images of each class ``c`` the client holds ``n_kc`` of,
    without replacement when the class has enough test images, with replacement otherwise."""
    generator = torch.Generator().manual_seed(seed)
    counts = torch.bincount(client_labels, minlength=num_classes)
    chosen = []
    for c in range(num_classes):
        wanted = int(counts[c].item() / num_train * len(test_labels))
        pool = torch.nonzero(test_labels == c).flatten()
        if wanted == 0 or len(pool) == 0:
            continue
        if wanted <= len(pool):
            chosen.append(pool[torch.randperm(len(pool), generator=generator)[:wanted]])
        else:
            chosen.append(pool[torch.randint(len(pool), (wanted,), generator=generator)])
    return torch.cat(chosen) if chosen else torch.zeros(0, dtype=torch.int64)


def sample_round_clients(num_clients: int, clients_per_round: int | float, seed: int, round_index: int) -> list[int]:
    """The clients that train in round ``round_index``: ``clients_per_round`` of them (a count, or a fraction of
    ``num_clients``, at least 1), drawn without replacement from ``(seed, round_index)`` alone, so a resumed
    federation samples what the uninterrupted one would; sorted."""
    count = clients_per_round if isinstance(clients_per_round, int) else max(1, int(clients_per_round * num_clients))
    if count >= num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng([seed, round_index])
    return sorted(int(k) for k in rng.choice(num_clients, size=count, replace=False))


class FederatedDataModule(WrappingDataModule):
    """A federation over an in-memory dataset: client shards, local test sets and per-round client sampling.

    Training yields the batches of one client's shard (:attr:`client`, set by :meth:`select`), or of every shard
    pooled when ``client`` is ``None`` (a centralised baseline; batches carry the ``client`` field either way).
    Validation and testing use the wrapped datamodule's balanced test split (the generic model's metric); a client's
    local test set is :meth:`local_test_loader`. ``num_classes``, ``in_channels``, ``image_size``, ``mean``, ``std``
    and ``inputs_normalized`` are those of ``dataset``.

    Args:
        dataset: the data, an :class:`~lit_methods.datamodules.base.InMemoryVisionDataModule` with ``fast_loader=True``
            (its ``imbalance_factor`` makes the union long-tailed, its augment and normalization are used).
        num_clients: number of clients ``K``.
        partition: ``"dirichlet"`` (per-class ``Dir(alpha)``) or ``"iid"``.
        alpha: Dirichlet concentration (> 0; FedLoGe: 0.5 or 1.0).
        min_client_samples: the least images a client may hold (Dirichlet draws are redrawn until all do).
        clients_per_round: clients sampled per round, a count or a fraction of ``num_clients`` (FedLoGe: 0.3).
        rounds: rounds of the federation (read by the federated runners).
        client: the client whose shard ``train_dataloader`` yields (``None``: all shards pooled).
        batch_size: local training batch size.
        seed: seed of the partition, of the client sampling and of the shards' shuffling.
    """

    def __init__(
        self,
        dataset: InMemoryVisionDataModule,
        num_clients: int = 5,
        partition: Literal["dirichlet", "iid"] = "dirichlet",
        alpha: float = 0.5,
        min_client_samples: int = 1,
        clients_per_round: int | float = 1.0,
        rounds: int = 10,
        client: int | None = None,
        batch_size: int = 32,
        seed: int = 0,
    ) -> None:
        super().__init__(dataset)
        if not dataset.fast_loader:
            raise ValueError(f"FederatedDataModule needs a datamodule with fast_loader=True, got {dataset!r}")
        if num_clients < 1:
            raise ValueError(f"num_clients must be >= 1, got {num_clients}")
        if partition not in ("dirichlet", "iid"):
            raise ValueError(f"partition must be 'dirichlet' or 'iid', got {partition!r}")
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0 (the Dirichlet concentration), got {alpha}")
        if isinstance(clients_per_round, float) and not 0.0 < clients_per_round <= 1.0:
            raise ValueError(f"clients_per_round as a fraction must lie in (0, 1], got {clients_per_round}")
        if isinstance(clients_per_round, int) and not 1 <= clients_per_round <= num_clients:
            raise ValueError(f"clients_per_round must lie in [1, num_clients={num_clients}], got {clients_per_round}")
        if rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {rounds}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.num_clients = num_clients
        self.partition = partition
        self.alpha = alpha
        self.min_client_samples = min_client_samples
        self.clients_per_round = clients_per_round
        self.rounds = rounds
        self.batch_size = batch_size
        self.seed = seed
        self.client: int | None = None
        self.round_index = 0
        self.shards: list[Tensor] | None = None
        self.select(client, 0)

    @property
    def dataset(self) -> InMemoryVisionDataModule:
        """The wrapped dataset (``datamodule`` of :class:`~lit_methods.datamodules.base.WrappingDataModule`)."""
        return self.datamodule

    # -- the federation -----------------------------------------------------------------------------------------
    def select(self, client: int | None, round_index: int) -> None:
        """Make ``train_dataloader`` yield ``client``'s shard (``None``: all pooled), shuffled for ``round_index``."""
        if client is not None and not 0 <= client < self.num_clients:
            raise ValueError(f"client must lie in [0, {self.num_clients}) or be None, got {client}")
        if round_index < 0:
            raise ValueError(f"round_index must be >= 0, got {round_index}")
        self.client = client
        self.round_index = round_index

    def round_clients(self, round_index: int) -> list[int]:
        """The clients sampled in ``round_index`` (:func:`sample_round_clients` with this module's seed)."""
        return sample_round_clients(self.num_clients, self.clients_per_round, self.seed, round_index)

    def client_indices(self, client: int) -> Tensor:
        """Positions of ``client``'s images in the (long-tailed) training split."""
        if self.shards is None:
            raise RuntimeError("FederatedDataModule.setup('fit') has not partitioned the training split yet")
        return self.shards[client]

    def client_labels(self, client: int) -> Tensor:
        return self._train_labels()[self.client_indices(client)]

    def client_class_counts(self, client: int) -> Tensor:
        return torch.bincount(self.client_labels(client), minlength=self.num_classes)

    def local_test_indices(self, client: int) -> Tensor:
        """Positions in the test split of ``client``'s local test set (:func:`local_test_indices`)."""
        self.dataset.setup("test")
        seed = int(np.random.SeedSequence([self.seed, client, 1]).generate_state(1)[0])
        return local_test_indices(
            self.client_labels(client), len(self._train_labels()), self.dataset.test_labels, self.num_classes, seed
        )

    def local_test_loader(self, client: int) -> InMemoryBatchLoader:
        """Batches (uint8 images, labels) of ``client``'s local test set; turn images into inputs with
        ``on_after_batch_transfer`` (or ``dataset.to_inputs``)."""
        index = self.local_test_indices(client)
        return self._loader(self.dataset.test_images[index], self.dataset.test_labels[index], train=False)

    def _train_labels(self) -> Tensor:
        if self.dataset.train_labels is None:
            raise RuntimeError("FederatedDataModule.setup('fit') has not loaded the training split yet")
        return self.dataset.train_labels

    def _loader(
        self, images: Tensor, labels: Tensor, train: bool, extras: dict[str, Tensor] | None = None
    ) -> InMemoryBatchLoader:
        rank, world_size = self.dataset.rank_and_world_size()
        seed = int(np.random.SeedSequence([self.seed, self.num_clients if self.client is None else self.client,
                                           self.round_index]).generate_state(1)[0])
        sampler = ShardedEpochSampler(
            len(labels),
            self.batch_size if train else self.dataset.eval_batch_size,
            shuffle=train,
            seed=seed,
            rank=rank,
            world_size=world_size,
        )
        return InMemoryBatchLoader(images, labels, sampler, pin_memory=self.dataset.pin_memory, extras=extras)

    # -- Lightning hooks ----------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if self.shards is None and self.dataset.train_labels is not None:
            labels = self.dataset.train_labels
            if self.partition == "iid":
                self.shards = iid_partition(len(labels), self.num_clients, self.seed)
            else:
                self.shards = dirichlet_partition(
                    labels, self.num_clients, self.alpha, self.seed, self.min_client_samples
                )

    def train_dataloader(self) -> InMemoryBatchLoader:
        if self.shards is None:
            raise RuntimeError("FederatedDataModule.setup('fit') has not partitioned the training split yet")
        clients = range(self.num_clients) if self.client is None else [self.client]
        index = torch.cat([self.shards[k] for k in clients])
        owner = torch.cat([torch.full((len(self.shards[k]),), k) for k in clients])
        images, labels = self.dataset.train_images, self._train_labels()
        return self._loader(images[index], labels[index], train=True, extras={"client": owner})



def open_world_partition(
    labels: Tensor, num_clients: int, num_seen: int, unseen_clients: dict[int, list[int]], labelled_fraction: float,
    seed: int,
) -> tuple[list[Tensor], Tensor]:
    """Open-world semi-supervised shards (FedoSSL, arXiv:2305.00771): the images of every seen class
    (``0 .. num_seen - 1``) are dealt evenly to all clients and a ``labelled_fraction`` of each client's share is
    labelled; the images of unseen class ``c`` are dealt evenly to the clients ``unseen_clients[c]`` and stay
    unlabelled. Classes neither seen nor listed are left out. Returns the shards and the labelled mask over
    ``labels``."""
    _check_clients(len(labels), num_clients)
    if not 0.0 < labelled_fraction <= 1.0:
        raise ValueError(f"labelled_fraction must lie in (0, 1], got {labelled_fraction}")
    bad = {c: ks for c, ks in unseen_clients.items() if c < num_seen or not ks or any(not 0 <= k < num_clients for k in ks)}
    if bad:
        raise ValueError(
            f"unseen_clients maps each unseen class (>= num_seen={num_seen}) to clients in [0, {num_clients}), got {bad}"
        )
    generator = torch.Generator().manual_seed(seed)
    owner = torch.full((len(labels),), -1, dtype=torch.long)
    labelled = torch.zeros(len(labels), dtype=torch.bool)
    holders = {c: list(range(num_clients)) for c in range(num_seen)} | {c: list(ks) for c, ks in unseen_clients.items()}
    for c, clients in holders.items():
        positions = torch.nonzero(labels == c).flatten()
        if len(positions) < len(clients):
            raise ValueError(f"class {c} has {len(positions)} images for its {len(clients)} clients")
        positions = positions[torch.randperm(len(positions), generator=generator)]
        for client, part in zip(clients, positions.tensor_split(len(clients))):
            owner[part] = client
            if c < num_seen:
                labelled[part[: round(labelled_fraction * len(part))]] = True
    shards = [torch.nonzero(owner == k).flatten() for k in range(num_clients)]
    return shards, labelled


class OpenWorldFederatedDataModule(FederatedDataModule):
    """A federation for open-world semi-supervised learning (:func:`open_world_partition`): training batches carry
    ``targets == -1`` for unlabelled images, so unseen labels never reach training; evaluation uses the test split
    with its labels (of the classes the federation holds).

    Args:
        num_seen: the seen (partly labelled) classes are ``0 .. num_seen - 1`` (FedoSSL CIFAR-10: 6).
        unseen_clients: unseen class -> the clients holding it (FedoSSL CIFAR-10: ``{6: [0, 1, 2, 3, 4], 7: [0, 1],
            8: [2, 3], 9: [4]}``; a class at one client is globally unseen).
        labelled_fraction: labelled share of each client's seen-class images (FedoSSL: 0.5).
        **kwargs: the arguments of :class:`FederatedDataModule` (``partition`` and ``alpha`` do not apply).
    """

    def __init__(
        self,
        dataset: InMemoryVisionDataModule,
        num_seen: int = 6,
        unseen_clients: dict[int, list[int]] | None = None,
        labelled_fraction: float = 0.5,
        **kwargs: Any,
    ) -> None:
        super().__init__(dataset, partition="iid", **kwargs)
        if not 1 <= num_seen < dataset.num_classes:
            raise ValueError(f"num_seen must lie in [1, num_classes={dataset.num_classes}), got {num_seen}")
        if not 0.0 < labelled_fraction <= 1.0:
            raise ValueError(f"labelled_fraction must lie in (0, 1], got {labelled_fraction}")
        self.num_seen = num_seen
        self.unseen_clients = {int(c): [int(k) for k in ks] for c, ks in (unseen_clients or {}).items()}
        self.labelled_fraction = labelled_fraction
        self.labelled: Tensor | None = None

    def setup(self, stage: str | None = None) -> None:
        self.dataset.trainer = self.trainer
        self.dataset.setup(stage)
        if self.shards is None and self.dataset.train_labels is not None:
            self.shards, self.labelled = open_world_partition(
                self.dataset.train_labels, self.num_clients, self.num_seen, self.unseen_clients,
                self.labelled_fraction, self.seed,
            )

    def train_dataloader(self) -> InMemoryBatchLoader:
        if self.shards is None or self.labelled is None:
            raise RuntimeError("OpenWorldFederatedDataModule.setup('fit') has not partitioned the training split yet")
        clients = range(self.num_clients) if self.client is None else [self.client]
        index = torch.cat([self.shards[k] for k in clients])
        owner = torch.cat([torch.full((len(self.shards[k]),), k) for k in clients])
        targets = torch.where(self.labelled[index], self._train_labels()[index], torch.full_like(index, -1))
        return self._loader(self.dataset.train_images[index], targets, train=True, extras={"client": owner})
