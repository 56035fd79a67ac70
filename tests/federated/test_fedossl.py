"""FedoSSL (arXiv:2305.00771): unit invariants of its clustering pieces and the card's open-world check on digits
(3 clients; seen 0-5; unseen 6 everywhere, 7 at clients 0-1, 8 at client 2 only), run by the in-process runner."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lit_methods.datamodules import DigitsDataModule, OpenWorldFederatedDataModule
from lit_methods.datamodules.federated import open_world_partition
from lit_methods.federated import FedoSSL, Federation, calibrate_centroids, cluster_accuracy, sinkhorn
from lit_methods.nets import ConvNet

UNSEEN = {6: [0, 1, 2], 7: [0, 1], 8: [2]}


def test_sinkhorn_balances_the_clusters():
    """Columns (clusters) of the assignment sum to N / K within 5% even for scores that favour one cluster, rows to
    1."""
    generator = torch.Generator().manual_seed(0)
    scores = F.normalize(torch.randn(300, 16, generator=generator), dim=1) @ F.normalize(
        torch.randn(12, 16, generator=generator), dim=1
    ).T
    scores[:, 0] += 0.5
    assignment = sinkhorn(scores)
    torch.testing.assert_close(assignment.sum(dim=1), torch.ones(300), rtol=1e-4, atol=1e-4)
    columns = assignment.sum(dim=0)
    assert ((columns - 300 / 12).abs() / (300 / 12)).max() < 0.05


def test_cluster_accuracy_is_invariant_to_relabelling():
    labels = torch.randint(0, 5, (200,), generator=torch.Generator().manual_seed(0))
    permutation = torch.tensor([3, 0, 4, 1, 2])
    assert cluster_accuracy(permutation[labels], labels) == 1.0
    assert cluster_accuracy(torch.zeros_like(labels), labels) < 0.5


def test_calibration_puts_seen_class_i_in_slot_i():
    generator = torch.Generator().manual_seed(0)
    classes = F.normalize(torch.randn(6, 32, generator=generator), dim=1)
    labelled = classes + 0.05 * torch.randn(6, 32, generator=generator)
    shuffled = classes[torch.tensor([4, 2, 5, 0, 3, 1])]
    calibrated = calibrate_centroids(shuffled, labelled, num_seen=4)
    torch.testing.assert_close(calibrated[:4], classes[:4])
    assert {tuple(row.tolist()) for row in calibrated[4:]} == {tuple(classes[4].tolist()), tuple(classes[5].tolist())}


def test_open_world_partition_hides_unseen_labels_and_places_unseen_classes():
    labels = torch.arange(10).repeat_interleave(60)
    shards, labelled = open_world_partition(labels, 3, num_seen=6, unseen_clients=UNSEEN, labelled_fraction=0.5, seed=0)
    held = torch.cat(shards)
    assert len(held) == len(set(held.tolist())) == 9 * 60  # class 9 left out, nothing twice
    assert not labelled[labels >= 6].any()
    assert labelled[labels < 6].float().mean().item() == 0.5
    for c, clients in UNSEEN.items():
        assert {k for k in range(3) if (labels[shards[k]] == c).any()} == set(clients)
    with pytest.raises(ValueError, match="unseen_clients maps"):
        open_world_partition(labels, 3, num_seen=6, unseen_clients={7: [5]}, labelled_fraction=0.5, seed=0)
    with pytest.raises(ValueError, match="labelled_fraction"):
        open_world_partition(labels, 3, num_seen=6, unseen_clients=UNSEEN, labelled_fraction=0.0, seed=0)


def test_client_batches_carry_no_unseen_label():
    dm = OpenWorldFederatedDataModule(DigitsDataModule(num_workers=0), num_seen=6, unseen_clients=UNSEEN, num_clients=3)
    dm.setup("fit")
    dm.select(2, 0)
    targets = torch.cat([b["targets"] for b in dm.train_dataloader()])
    assert targets.max().item() < 6 and (targets == -1).any()


def make_federation(seed: int = 0, calibrate: bool = True) -> Federation:
    dm = OpenWorldFederatedDataModule(
        DigitsDataModule(num_workers=0, crop_padding=1), num_seen=6, unseen_clients=UNSEEN, num_clients=3,
        batch_size=64, seed=seed,
    )
    torch.manual_seed(seed)
    backbone = ConvNet(num_classes=10, in_channels=1, depth=2, width=16, norm="batchnorm", image_size=8)
    module = FedoSSL(
        backbone, num_classes=10, in_channels=1, image_size=(8, 8), num_seen=6, local_clusters=10, memory_size=256,
        server_steps=100, cluster_start_round=2, pseudo_label_start_round=4, calibrate=calibrate, lr=0.05,
        mean=dm.mean, std=dm.std,
    )
    trainer = {"max_epochs": 1, "accelerator": "cpu", "devices": 1}
    return Federation(module, dm, trainer, seed=seed, evaluate_clients=False)


SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def federations() -> dict[tuple[int, bool], dict[str, float]]:
    """The last round's global metrics of 8-round federations for seeds 0-2, calibration on and off, plus the
    untrained network's metrics (seed 0) under ``"untrained"``: six federations of 24 one-epoch client fits (about
    5 s each on a quiet 2-core CPU, 10-20 s when it is busy)."""
    torch.set_num_threads(1)
    results: dict = {}
    for seed in SEEDS:
        for calibrate in (True, False):
            federation = make_federation(seed=seed, calibrate=calibrate)
            if seed == 0 and calibrate:
                results["untrained"] = federation.module.federation_metrics(federation.datamodule)
            federation.run(8)
            results[seed, calibrate] = federation.state.history[-1]
    return results


@pytest.mark.slow
def test_the_federation_clusters_unseen_classes_beyond_chance_and_beyond_its_untrained_start(federations):
    """After 8 rounds the Hungarian accuracy on the unseen classes (6, 7, 8) exceeds 1.5 x chance (1/3) and the
    untrained network's: random convolutional features already group digits (the untrained network scores 0.53 on
    seed 0), so beating chance alone would not show the method works; the trained federation scores 0.68. Seen
    classes are learned from labels (argmax accuracy > 0.8)."""
    trained = federations[0, True]
    assert trained["global/unseen_acc"] > 1.5 / 3
    assert trained["global/unseen_acc"] > federations["untrained"]["unseen_acc"] + 0.05
    assert trained["global/seen_acc"] > 0.8


@pytest.mark.slow
def test_calibration_helps_the_globally_unseen_class_over_three_seeds(federations):
    """The card's check: with the server's calibration on, the cluster accuracy of class 8 (held by client 2 only)
    averaged over seeds 0-2 is above its average with calibration off (measured: 0.387 vs 0.294; per seed 0.581 /
    0.116 / 0.465 vs 0.302 / 0.116 / 0.465, so seed 0 carries the mean and seeds 1-2 tie). The card asks for >=; the
    test asks for >, because calibration replaced by a no-op gives the same federation both ways (deterministic
    seeds: checked by hand by making ``calibrate_centroids`` return its input, after which both means are 0.294 and
    the test fails). Calibration also lifts the unseen classes together on every seed (0.684 / 0.647 / 0.639 vs
    0.556 / 0.579 / 0.571)."""
    on = [federations[seed, True] for seed in SEEDS]
    off = [federations[seed, False] for seed in SEEDS]
    mean_on = sum(m["global/class_8_acc"] for m in on) / len(SEEDS)
    mean_off = sum(m["global/class_8_acc"] for m in off) / len(SEEDS)
    assert mean_on > mean_off, (mean_on, mean_off)
    for seed, with_calibration, without in zip(SEEDS, on, off):
        assert with_calibration["global/unseen_acc"] > without["global/unseen_acc"], seed


def test_simclr_checkpoint_becomes_the_backbone_and_only_the_named_layers_train(tmp_path):
    """The paper's start: a SimCLR checkpoint of ours (a Lightning checkpoint of 2 training steps) loads into FedoSSL's
    backbone exactly (every tensor equal; a FedoSSL built without it differs), so the federation's initial global
    weights are SimCLR's; with ``trainable_backbone_prefixes`` only those backbone parameters move in a local update
    and the frozen ones stay bit-identical."""
    from lit_methods.ssl.simclr import SimCLR
    from tests.helpers import cpu_trainer

    torch.set_num_threads(1)

    def convnet() -> ConvNet:
        return ConvNet(num_classes=10, in_channels=1, depth=2, width=8, norm="batchnorm", image_size=8)

    torch.manual_seed(1)
    simclr = SimCLR(convnet(), projection_hidden_dim=16, projection_dim=8, lr=0.1)
    trainer = cpu_trainer(max_steps=2, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(simclr, datamodule=DigitsDataModule(batch_size=64, ssl_views=2, num_workers=0))
    checkpoint = str(tmp_path / "simclr.ckpt")
    trainer.save_checkpoint(checkpoint)
    ssl_backbone = {k: v for k, v in simclr.state_dict().items() if k.startswith("backbone.")}

    def fedossl(**kwargs) -> FedoSSL:
        torch.manual_seed(0)
        return FedoSSL(convnet(), num_classes=10, in_channels=1, image_size=(8, 8), num_seen=6, local_clusters=4,
                       memory_size=64, server_steps=1, **kwargs)

    scratch = fedossl().state_dict()
    module = fedossl(pretrained_checkpoint=checkpoint, trainable_backbone_prefixes=["features.4"])
    own = module.state_dict()
    assert any(not torch.equal(scratch[k], v) for k, v in ssl_backbone.items())
    for name, value in ssl_backbone.items():
        assert torch.equal(own[name], value), name
    torch.testing.assert_close(own["head.weight"], scratch["head.weight"])  # the head keeps its own init

    trainable = {n for n, p in module.backbone.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("features.4") for n in trainable)
    dm = OpenWorldFederatedDataModule(DigitsDataModule(num_workers=0), num_seen=6, unseen_clients=UNSEEN,
                                      num_clients=3, batch_size=64)
    federation = Federation(module, dm, {"max_epochs": 1, "accelerator": "cpu", "devices": 1}, seed=0,
                            evaluate_clients=False)
    assert all(torch.equal(federation.state.global_state[k], v) for k, v in ssl_backbone.items())
    before = {n: p.detach().clone() for n, p in module.backbone.named_parameters()}
    federation.run(1)
    after = federation.state.global_state
    for name, value in before.items():
        moved = not torch.equal(after[f"backbone.{name}"], value)
        assert moved == (name in trainable), name
    with pytest.raises(ValueError, match="layer4"):
        fedossl(trainable_backbone_prefixes=["layer4"])
