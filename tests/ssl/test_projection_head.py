"""The projection-head study: the fixed reweighting head's maths, "no head" training the backbone features directly,
the NT-Xent and spectral objectives on the head's output, the per-depth features, their kNN evaluation and effective
rank against direct computations, and pre- vs post-projection features (kNN accuracy, effective rank) on digits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lit_methods.datamodules import DigitsDataModule
from lit_methods.losses import NTXentLoss
from lit_methods.losses.spectral_contrastive import SpectralContrastiveLoss
from lit_methods.nets import ConvNet, FixedReweightHead
from lit_methods.ssl.projection_head import ProjectionHeadStudy, effective_rank, knn_accuracy_by_depth
from tests.helpers import cpu_trainer


def _study(head: str, width: int = 8, **kwargs) -> ProjectionHeadStudy:
    torch.manual_seed(0)
    net = ConvNet(num_classes=10, in_channels=1, depth=2, width=width, norm="batchnorm", image_size=8)
    return ProjectionHeadStudy(net, head=head, **({"projection_hidden_dim": 16, "projection_dim": 8} | kwargs))


def _views(n: int = 6) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(n, 1, 8, 8, generator=g), torch.randn(n, 1, 8, 8, generator=g)]


def test_reweight_head_multiplies_dimension_i_by_kappa_to_the_minus_i_and_has_nothing_to_train():
    head = FixedReweightHead(6, kappa=1.5)
    assert list(head.parameters()) == [] and "weights" in head.state_dict()
    for i in range(6):
        assert head.weights[i].item() == pytest.approx(1.5**-i, rel=1e-6)
    x = torch.randn(3, 6)
    expected = torch.tensor([[float(x[r, i]) * 1.5**-i for i in range(6)] for r in range(3)])
    torch.testing.assert_close(head(x), expected)
    assert torch.equal(FixedReweightHead(6, kappa=1.0)(x), x)  # kappa = 1 is exactly the identity
    # NT-Xent normalises its inputs, so only the relative weights matter: kappa reweights, a common scale does not
    a, b = torch.randn(4, 6), torch.randn(4, 6)
    loss = NTXentLoss(0.5)
    torch.testing.assert_close(loss(head(a) * 7.0, head(b) * 7.0), loss(head(a), head(b)))
    assert not torch.allclose(loss(head(a), head(b)), loss(a, b))


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="kappa must be >= 1, got 0.5"):
        FixedReweightHead(4, kappa=0.5)
    with pytest.raises(ValueError, match="dim must be >= 1, got 0"):
        FixedReweightHead(0, kappa=1.1)
    with pytest.raises(ValueError, match="kappa=2.0 underflows float32 for dim=512"):
        FixedReweightHead(512, kappa=2.0)
    with pytest.raises(ValueError, match="head must be one of .*got 'deep'"):
        _study("deep")
    with pytest.raises(ValueError, match="projection widths must be >= 1, got 0, 8"):
        _study("mlp", projection_hidden_dim=0)
    with pytest.raises(ValueError, match="loss must be one of .*got 'infonce'"):
        _study("mlp", loss="infonce")
    with pytest.raises(ValueError, match="mu must be > 0.*got -1.0"):
        _study("mlp", loss="spectral", mu=-1.0)
    with pytest.raises(ValueError, match=r"shape \(5,\)"):
        effective_rank(torch.ones(5))
    with pytest.raises(ValueError, match="all-zero"):
        effective_rank(torch.zeros(4, 3))


def test_no_head_trains_the_backbone_features_directly_with_the_loss():
    model = _study("none")
    assert list(model.projector.parameters()) == []
    views, labels = _views(), torch.randint(0, 10, (6,))
    total = model.training_step((views, labels), 0)
    features = [model(v) for v in views]
    direct = NTXentLoss(0.5)(model.backbone.forward_features(views[0]), model.backbone.forward_features(views[1]))
    probe_loss, _ = model.probe(features[0], labels)
    assert torch.equal(total, direct + probe_loss)
    backbone = list(model.backbone.parameters())
    for ours, theirs in zip(torch.autograd.grad(total, backbone), torch.autograd.grad(direct, backbone)):
        assert torch.equal(ours, theirs)
    # the reweighting head with kappa = 1 is the same training, bit for bit
    identity = _study("reweight", kappa=1.0)
    assert torch.equal(identity.training_step((views, labels), 0), total)


def test_heads_apply_the_loss_to_their_own_output():
    views = _views()
    for head in ("mlp", "linear", "reweight"):
        model = _study(head, kappa=1.2)
        f1, f2 = model(views[0]), model(views[1])
        loss = model.ssl_loss(views, [f1, f2])
        if head == "reweight":
            weights = torch.tensor([1.2**-i for i in range(model.num_features)])
            expected = NTXentLoss(0.5)(f1 * weights, f2 * weights)
        else:
            expected = NTXentLoss(0.5)(model.projector(f1), model.projector(f2))
        torch.testing.assert_close(loss, expected)
        assert not torch.allclose(loss, NTXentLoss(0.5)(f1, f2))


def test_spectral_option_applies_the_spectral_loss_to_the_head_output():
    views = _views()
    assert isinstance(_study("mlp").loss_fn, NTXentLoss)  # the default objective is unchanged
    spectral_loss = _study("mlp", loss="spectral", mu=None).loss_fn
    assert isinstance(spectral_loss, SpectralContrastiveLoss) and spectral_loss.gather_distributed  # DDP default
    assert spectral_loss.mu is None
    for head in ("mlp", "reweight"):
        for mu in (None, 1.0):
            model = _study(head, loss="spectral", mu=mu, kappa=1.2)
            f1, f2 = model(views[0]), model(views[1])
            z1, z2 = model.projector(f1), model.projector(f2)
            loss = model.ssl_loss(views, [f1, f2])
            torch.testing.assert_close(loss, SpectralContrastiveLoss(mu)(z1, z2))
            assert not torch.allclose(loss, NTXentLoss(0.5)(z1, z2))
    # mu only bounds the norms: the bounded and unbounded losses differ once the head's outputs are long
    bounded, unbounded = _study("linear", loss="spectral", mu=1.0), _study("linear", loss="spectral", mu=None)
    features = [10 * bounded(v) for v in views]
    assert bounded.projector(features[0]).norm(dim=1).min() > 1.0
    assert not torch.allclose(bounded.ssl_loss(views, features), unbounded.ssl_loss(views, features))


def test_effective_rank_is_the_exponential_of_the_singular_value_entropy():
    torch.manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(20, 20))
    rotation, _ = torch.linalg.qr(torch.randn(5, 5))
    for singular_values in ([1.0, 1.0, 1.0, 0.0, 0.0], [4.0, 2.0, 1.0, 0.5, 0.25], [3.0, 0.0, 0.0, 0.0, 0.0]):
        # a (20, 5) matrix with exactly these singular values
        features = basis[:, :5] @ torch.diag(torch.tensor(singular_values)) @ rotation
        total = sum(singular_values)
        expected = math.exp(-sum(v / total * math.log(v / total) for v in singular_values if v > 0))
        assert effective_rank(features) == pytest.approx(expected, rel=1e-4)
        assert effective_rank(7.0 * features) == pytest.approx(expected, rel=1e-4)  # scale-free
    assert effective_rank(basis[:, :5]) == pytest.approx(5.0, rel=1e-5)  # 5 equal directions
    # weighting the directions unequally (the reweighting head with kappa > 1) lowers it
    assert effective_rank(FixedReweightHead(5, kappa=2.0)(basis[:, :5])) < 4.0


def test_features_by_depth_follow_the_head_stages():
    x = torch.randn(5, 1, 8, 8)
    mlp = _study("mlp").eval()
    depths = mlp.features_by_depth(x)
    assert list(depths) == mlp.depth_names == ["pre_projection", "head_layer_1", "post_projection"]
    first, second = mlp.projector[0][0], mlp.projector[1]
    pre = mlp.backbone.forward_features(x)
    hidden = (pre @ first.weight.T + first.bias).clamp_min(0)
    torch.testing.assert_close(depths["pre_projection"], pre)
    torch.testing.assert_close(depths["head_layer_1"], hidden)
    torch.testing.assert_close(depths["post_projection"], hidden @ second.weight.T + second.bias)
    for head, width in (("linear", 8), ("reweight", mlp.num_features), ("none", mlp.num_features)):
        model = _study(head).eval()
        depths = model.features_by_depth(x)
        assert list(depths) == ["pre_projection", "post_projection"]
        assert depths["post_projection"].shape == (5, width)
        torch.testing.assert_close(depths["post_projection"], model.projector(model(x)))
    assert torch.equal(depths["pre_projection"], depths["post_projection"])  # "none": the loss sees the features


def _naive_knn_accuracy(bank, bank_labels, queries, query_labels, k, temperature) -> float:
    correct = 0
    for query, label in zip(queries, query_labels):
        similarities = [float(F.cosine_similarity(query, b, dim=0)) for b in bank]
        nearest = sorted(range(len(bank)), key=lambda j: -similarities[j])[:k]
        votes = [0.0] * 10
        for j in nearest:
            votes[int(bank_labels[j])] += math.exp(similarities[j] / temperature)
        correct += int(max(range(10), key=lambda c: votes[c]) == int(label))
    return correct / len(queries)


def test_knn_accuracy_by_depth_equals_a_direct_computation():
    dm = DigitsDataModule(fast_loader=False, val_split=0.5, batch_size=64, num_workers=0, seed=0)
    dm.setup("fit")
    dm.setup("test")
    model = _study("mlp")
    model.train()
    bank_loader = [batch for i, batch in enumerate(dm.val_dataloader()) if i < 3]  # 192 labelled digits
    query_loader = [batch for i, batch in enumerate(dm.test_dataloader()) if i < 1]  # 64 test digits
    accuracies = knn_accuracy_by_depth(model, bank_loader, query_loader, k=10, temperature=0.1)
    assert model.training  # the mode is restored
    model.eval()
    with torch.no_grad():
        bank = [model.features_by_depth(batch["inputs"]) for batch in bank_loader]
        queries = model.features_by_depth(query_loader[0]["inputs"])
    bank_labels = torch.cat([batch["targets"] for batch in bank_loader])
    for name in model.depth_names:
        bank_features = torch.cat([b[name] for b in bank])
        expected = _naive_knn_accuracy(bank_features, bank_labels, queries[name], query_loader[0]["targets"], 10, 0.1)
        assert accuracies[name] == pytest.approx(expected, abs=1e-6), name
    assert set(accuracies) == {"pre_projection", "head_layer_1", "post_projection"}
    assert all(0.2 < acc <= 1.0 for acc in accuracies.values())  # well above chance (0.1) on digits


@pytest.mark.slow
def test_on_digits_pre_projection_features_beat_and_outrank_post_projection_features(tmp_path):
    """Seed 0, digits, ConvNet-2 of width 16 (64 features), SimCLR (NT-Xent): the MLP head 3 epochs, the reweighting
    head (kappa 1.05) 1 epoch; the MLP head with the spectral contrastive loss 2 epochs. kNN accuracy and effective
    rank on the un-augmented test digits, by depth."""
    torch.set_num_threads(1)  # tiny nets: threads only contend on a loaded machine (conftest restores the count)
    evaluation = DigitsDataModule(fast_loader=False, val_split=0.5, batch_size=256, num_workers=0, seed=0)
    evaluation.setup("fit")
    evaluation.setup("test")
    bank, queries = evaluation.val_dataloader(), evaluation.test_dataloader()  # un-augmented images
    test_images = torch.cat([batch["inputs"] for batch in queries])

    def ranks(model: ProjectionHeadStudy) -> dict[str, float]:
        model.eval()
        with torch.no_grad():
            return {name: effective_rank(f) for name, f in model.features_by_depth(test_images).items()}

    def fit(model: ProjectionHeadStudy, epochs: int) -> None:
        torch.manual_seed(0)
        trainer = cpu_trainer(max_epochs=epochs, limit_val_batches=0, default_root_dir=tmp_path)
        trainer.fit(model, datamodule=DigitsDataModule(batch_size=128, fast_loader=False, ssl_views=2, num_workers=0))

    mlp = _study("mlp", width=16, projection_hidden_dim=64, projection_dim=32, lr=0.3)
    before = knn_accuracy_by_depth(mlp, bank, queries, k=20)
    fit(mlp, 3)
    after = knn_accuracy_by_depth(mlp, bank, queries, k=20)
    mlp_ranks = ranks(mlp)
    print("kNN accuracy (k=20) by depth, random init:", {k: round(v, 3) for k, v in before.items()})
    print("kNN accuracy (k=20) by depth, trained:    ", {k: round(v, 3) for k, v in after.items()})
    print("effective rank by depth, MLP head:        ", {k: round(v, 2) for k, v in mlp_ranks.items()})
    assert after["pre_projection"] > after["head_layer_1"] > after["post_projection"]
    assert after["pre_projection"] > after["post_projection"] + 0.05
    assert after["pre_projection"] > 0.5  # no collapse (chance is 0.1)
    assert mlp_ranks["pre_projection"] > mlp_ranks["post_projection"] * 1.2

    reweight = _study("reweight", width=16, kappa=1.05, lr=0.3)
    fit(reweight, 1)
    reweight_ranks = ranks(reweight)
    print("effective rank by depth, reweight head:   ", {k: round(v, 2) for k, v in reweight_ranks.items()})
    assert reweight_ranks["pre_projection"] > reweight_ranks["post_projection"] * 1.1

    # the loss of the paper's theory: the spectral contrastive loss through the MLP head (official mu = 1)
    spectral = _study("mlp", width=16, projection_hidden_dim=64, projection_dim=32, loss="spectral", lr=0.05)
    fit(spectral, 2)
    spectral_knn = knn_accuracy_by_depth(spectral, bank, queries, k=20)
    spectral_ranks = ranks(spectral)
    print("kNN accuracy (k=20) by depth, spectral:   ", {k: round(v, 3) for k, v in spectral_knn.items()})
    print("effective rank by depth, spectral:        ", {k: round(v, 2) for k, v in spectral_ranks.items()})
    assert spectral_knn["pre_projection"] > spectral_knn["post_projection"]
    assert spectral_knn["pre_projection"] > 0.5
    assert spectral_ranks["pre_projection"] > spectral_ranks["post_projection"] * 1.2

    # without a head the loss sees the pre-projection features: one representation, one effective rank
    no_head_ranks = ranks(_study("none", width=16))
    assert no_head_ranks["pre_projection"] == no_head_ranks["post_projection"]
