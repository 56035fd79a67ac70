"""MLC and its TCR stage: the training losses (rate reduction of the averaged views under the averaged Sinkhorn
membership; total coding rate) plus the probe, the start from a TCR module or checkpoint (backbone and feature head
copied, the feature head also into the cluster head; mismatches rejected), clustering accuracy/NMI against brute
force and scikit-learn, and the epoch-level clustering metric under a 2-process DDP run."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import normalized_mutual_info_score
from torch.utils.data import DataLoader

from lit_methods.losses.mcr2 import MCR2MembershipLoss, sinkhorn_membership
from lit_methods.losses.total_coding_rate import TotalCodingRateLoss
from lit_methods.nets import ConvNet
from lit_methods.ssl.clustering_metrics import (
    MembershipSpectralClustering,
    clustering_accuracy,
    normalized_mutual_information,
)
from lit_methods.ssl.mlc import MLC
from lit_methods.ssl.moco import MoCoV2
from lit_methods.ssl.tcr import TCRPretrain
from tests.ddp_helpers import init_gloo, run_distributed
from tests.helpers import cpu_trainer


def _net(width: int = 8) -> ConvNet:
    return ConvNet(num_classes=10, in_channels=1, depth=2, width=width, norm="batchnorm", image_size=8)


def _mlc(**kwargs) -> MLC:
    torch.manual_seed(0)
    return MLC(_net(), **({"hidden_dim": 16, "feature_dim": 8, "eta": 0.2, "sinkhorn_iterations": 5} | kwargs))


def _tcr(seed: int = 1, **kwargs) -> TCRPretrain:
    torch.manual_seed(seed)
    return TCRPretrain(_net(), **({"hidden_dim": 16, "feature_dim": 8, "invariance_weight": 2.0} | kwargs))


def _two_view_batch(seed: int = 0, n: int = 10) -> tuple[list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 1, 8, 8, generator=g) for _ in range(2)], torch.randint(0, 10, (n,), generator=g)


def test_training_loss_is_the_rate_reduction_of_averaged_views_under_the_averaged_membership_plus_the_probe():
    model = _mlc()
    views, labels = _two_view_batch()
    total = model.training_step((views, labels), 0)
    features = [model(v) for v in views]
    z = F.normalize(sum(F.normalize(model.feature_head(f), dim=1) for f in features) / 2, dim=1)
    membership = sum(sinkhorn_membership(F.normalize(model.cluster_head(f), dim=1), 0.2, 5) for f in features) / 2
    probe_loss, _ = model.probe(features[0], labels)
    expected = MCR2MembershipLoss(0.5**0.5)(z, membership) + probe_loss
    torch.testing.assert_close(total, expected)


def test_tcr_training_loss_is_the_total_coding_rate_of_the_feature_head_outputs_plus_the_probe():
    model = _tcr()
    views, labels = _two_view_batch()
    total = model.training_step((views, labels), 0)
    features = [model(v) for v in views]
    probe_loss, _ = model.probe(features[0], labels)
    expected = TotalCodingRateLoss(0.5**0.5, 2.0)([model.feature_head(f) for f in features]) + probe_loss
    torch.testing.assert_close(total, expected)


def _assert_started_from(mlc: MLC, tcr: TCRPretrain) -> None:
    """Same backbone and feature head weights (and BN statistics) as ``tcr``, the cluster head a copy of them, and
    no storage shared with ``tcr`` or between the heads."""
    tcr_state = tcr.state_dict()
    for key, value in mlc.state_dict().items():
        if key.startswith(("backbone.", "feature_head.")):
            torch.testing.assert_close(value, tcr_state[key], msg=key)
        if key.startswith("cluster_head."):
            torch.testing.assert_close(value, tcr_state[key.replace("cluster_head.", "feature_head.")], msg=key)
    pointers = {p.data_ptr() for p in tcr.parameters()}
    assert not pointers & {p.data_ptr() for p in mlc.parameters()}
    assert mlc.feature_head[0].weight.data_ptr() != mlc.cluster_head[0].weight.data_ptr()


def _trained_tcr() -> TCRPretrain:
    """A TCR module after two optimizer steps (its weights and BN statistics differ from any fresh init)."""
    tcr = _tcr()
    batches = DataLoader([_two_view_batch(seed) for seed in range(2)], batch_size=None)  # already batched
    cpu_trainer(max_steps=2).fit(tcr, train_dataloaders=batches)
    return tcr


def test_from_pretrained_starts_from_the_tcr_backbone_and_feature_head_in_both_heads():
    tcr = _trained_tcr()
    mlc = MLC.from_pretrained(tcr, eta=0.3, sinkhorn_iterations=5)
    assert (mlc.feature_head[0].out_features, mlc.feature_head[-1].out_features) == (16, 8)
    _assert_started_from(mlc, tcr)
    mlc.eval(), tcr.eval()
    images = _two_view_batch(seed=5)[0][0]
    torch.testing.assert_close(mlc.cluster_head(mlc(images)), tcr.feature_head(tcr(images)))
    with pytest.raises(TypeError, match="Linear has no backbone"):
        MLC.from_pretrained(torch.nn.Linear(2, 2))


def test_pretrained_checkpoint_of_a_tcr_run_starts_mlc_at_setup_once_and_mismatches_are_rejected(tmp_path):
    tcr = _trained_tcr()
    path = tmp_path / "tcr.ckpt"
    tcr.trainer.save_checkpoint(path)
    torch.manual_seed(7)  # MLC's own random init differs from the TCR's
    mlc = MLC(_net(), hidden_dim=16, feature_dim=8, pretrained_checkpoint=str(path))
    assert not torch.equal(mlc.feature_head[0].weight, tcr.feature_head[0].weight)  # read at setup, not before
    mlc.setup("fit")
    _assert_started_from(mlc, tcr)
    # a restored MLC state (load_from_checkpoint, resume) has the weights and does not read the TCR file again
    path.unlink()
    restored = MLC(_net(), hidden_dim=16, feature_dim=8, pretrained_checkpoint=str(path))
    restored.load_state_dict(mlc.state_dict())
    restored.setup("fit")
    _assert_started_from(restored, tcr)
    with pytest.raises(FileNotFoundError, match="tcr.ckpt"):
        MLC(_net(), hidden_dim=16, feature_dim=8, pretrained_checkpoint=str(path)).setup("fit")

    tcr.trainer.save_checkpoint(path)
    with pytest.raises(ValueError, match=r"shapes.*feature_head.3.weight.*\(4, 16\), \(8, 16\)"):
        MLC(_net(), hidden_dim=16, feature_dim=4, pretrained_checkpoint=str(path)).setup("fit")
    # a checkpoint whose head has another name (SimCLR's projector): the feature head is missing
    renamed = {key.replace("feature_head.", "projector."): value for key, value in tcr.state_dict().items()}
    torch.save({"state_dict": renamed}, tmp_path / "projector.ckpt")
    with pytest.raises(ValueError, match=r"missing \['feature_head.0.bias', .*'feature_head.3.weight'\]"):
        MLC(_net(), hidden_dim=16, feature_dim=8).load_pretrained_checkpoint(str(tmp_path / "projector.ckpt"))
    torch.save(tcr.state_dict(), tmp_path / "bare.pt")
    with pytest.raises(ValueError, match="no 'state_dict'"):
        MLC(_net(), hidden_dim=16, feature_dim=8).load_pretrained_checkpoint(str(tmp_path / "bare.pt"))


def test_a_moco_v2_checkpoint_starts_mlc_with_heads_that_compute_the_projector(tmp_path):
    """MLC-MoCoV2 (the paper's best CIFAR start): the online backbone and the projector of a trained MoCo v2 run
    become MLC's backbone and both heads, which then give exactly the projector's outputs (a head that kept its
    BatchNorm, or copied the wrong layers, would not); the momentum encoder and the queue are not read."""
    torch.manual_seed(3)
    moco = MoCoV2(_net(), projection_hidden_dim=16, projection_dim=8, queue_size=32)
    batches = DataLoader([_two_view_batch(seed) for seed in range(2)], batch_size=None)
    cpu_trainer(max_steps=2).fit(moco, train_dataloaders=batches)
    path = tmp_path / "moco.ckpt"
    moco.trainer.save_checkpoint(path)
    torch.manual_seed(7)
    mlc = MLC(
        _net(), hidden_dim=16, feature_dim=8, head_batch_norm=False, pretrained_source="moco_v2",
        pretrained_checkpoint=str(path),
    )
    mlc.setup("fit")
    moco.eval(), mlc.eval()
    images = _two_view_batch(seed=5)[0][0]
    projected = moco.projector(moco(images))
    torch.testing.assert_close(mlc(images), moco(images))
    torch.testing.assert_close(mlc.feature_head(mlc(images)), projected)
    torch.testing.assert_close(mlc.cluster_head(mlc(images)), projected)
    from_module = MLC.from_pretrained(moco, pretrained_source="moco_v2")
    from_module.eval()
    torch.testing.assert_close(from_module.cluster_head(from_module(images)), projected)
    with pytest.raises(ValueError, match="head_batch_norm=True"):
        MLC(_net(), hidden_dim=16, feature_dim=8, pretrained_source="moco_v2")
    with pytest.raises(ValueError, match="'simclr'"):
        MLC(_net(), hidden_dim=16, feature_dim=8, pretrained_source="simclr")


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


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"hidden_dim": 0}, "hidden_dim=0"),
        ({"invariance_weight": -1.0}, "invariance_weight.*-1.0"),
        ({"eps": 0.0}, "0.0"),
    ],
)
def test_bad_tcr_arguments_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _tcr(**kwargs)


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
