"""MLC: the training loss is the rate reduction of the averaged views under the averaged Sinkhorn membership plus
the probe, the cluster head starts as the feature head, clustering accuracy/NMI against brute force and
scikit-learn, and the epoch-level clustering metric under a 2-process DDP run."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import normalized_mutual_info_score

from lit_methods.losses.mcr2 import MCR2MembershipLoss, sinkhorn_membership
from lit_methods.nets import ConvNet
from lit_methods.ssl.clustering_metrics import (
    MembershipSpectralClustering,
    clustering_accuracy,
    normalized_mutual_information,
)
from lit_methods.ssl.mlc import MLC
from tests.ddp_helpers import init_gloo, run_distributed


def _mlc(**kwargs) -> MLC:
    torch.manual_seed(0)
    net = ConvNet(num_classes=10, in_channels=1, depth=2, width=8, norm="batchnorm", image_size=8)
    return MLC(
        net,
        **({"hidden_dim": 16, "feature_dim": 8, "eta": 0.2, "sinkhorn_iterations": 5} | kwargs),
    )


def test_training_loss_is_the_rate_reduction_of_averaged_views_under_the_averaged_membership_plus_the_probe():
    model = _mlc()
    g = torch.Generator().manual_seed(0)
    views, labels = (
        [torch.randn(10, 1, 8, 8, generator=g) for _ in range(2)],
        torch.randint(0, 10, (10,)),
    )
    total = model.training_step((views, labels), 0)
    features = [model(v) for v in views]
    z = F.normalize(sum(F.normalize(model.feature_head(f), dim=1) for f in features) / 2, dim=1)
    membership = sum(sinkhorn_membership(F.normalize(model.cluster_head(f), dim=1), 0.2, 5) for f in features) / 2
    probe_loss, _ = model.probe(features[0], labels)
    expected = MCR2MembershipLoss(0.5**0.5)(z, membership) + probe_loss
    torch.testing.assert_close(total, expected)


def test_cluster_head_starts_as_a_copy_of_the_feature_head():
    model = _mlc()
    for (name, a), (_, b) in zip(model.feature_head.state_dict().items(), model.cluster_head.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)
    assert model.feature_head[0].weight.data_ptr() != model.cluster_head[0].weight.data_ptr()  # not shared


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"eta": 0.0}, "eta=0.0"),
        ({"sinkhorn_iterations": 0}, "0"),
        ({"feature_dim": 0}, "feature_dim=0"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _mlc(**kwargs)


def test_clustering_accuracy_equals_the_best_permutation_by_brute_force_and_nmi_is_sklearns():
    rng = np.random.default_rng(0)
    targets, predictions = rng.integers(0, 4, 60), rng.integers(0, 4, 60)
    predictions[:30] = (targets[:30] + 1) % 4  # half the points follow a relabelling
    best = max(np.mean(np.array(p)[predictions] == targets) for p in itertools.permutations(range(4)))
    assert clustering_accuracy(targets, predictions) == pytest.approx(best)
    assert clustering_accuracy(targets, (targets + 2) % 4) == 1.0
    assert normalized_mutual_information(targets, predictions) == normalized_mutual_info_score(targets, predictions)
    with pytest.raises(ValueError, match=r"\(3,\) vs \(2,\)"):
        clustering_accuracy([0, 1, 2], [0, 1])


def _three_blobs(n_per: int = 20, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(6)[:3] * 3
    labels = torch.arange(3).repeat(n_per)
    return centres[labels] + 0.3 * torch.randn(3 * n_per, 6, generator=g), labels


def test_epoch_clustering_recovers_separated_clusters_from_every_update():
    features, labels = _three_blobs()
    metric = MembershipSpectralClustering(3, eta=0.1)
    for chunk, chunk_labels in zip(features.split(7), labels.split(7)):  # accumulated over the whole epoch
        metric.update(chunk, chunk_labels)
    scores = metric.compute()
    assert scores["acc"].item() == 1.0 and scores["nmi"].item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="3 clusters got only 2"):
        too_few = MembershipSpectralClustering(3)
        too_few.update(features[:2], labels[:2])
        too_few.compute()


def _rank_clustering() -> dict[str, float]:
    init_gloo()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    features, labels = _three_blobs(n_per=30, seed=1)
    features = features + 1.5 * torch.randn(features.shape, generator=torch.Generator().manual_seed(3))
    metric = MembershipSpectralClustering(3, eta=0.1)
    metric.update(features.chunk(world)[rank], labels.chunk(world)[rank])
    return {name: value.item() for name, value in metric.compute().items()}


@pytest.mark.ddp
def test_clustering_metric_under_ddp_equals_the_single_process_one_on_all_samples():
    results = run_distributed(_rank_clustering)
    features, labels = _three_blobs(n_per=30, seed=1)
    features = features + 1.5 * torch.randn(features.shape, generator=torch.Generator().manual_seed(3))
    single = MembershipSpectralClustering(3, eta=0.1)
    single.update(features, labels)
    expected = {name: value.item() for name, value in single.compute().items()}
    assert expected["acc"] < 1.0  # noisy enough that clustering only part of the samples would differ
    assert results == [pytest.approx(expected)] * len(results)
