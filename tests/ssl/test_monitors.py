"""Online SSL monitors: weighted kNN against a naive loop and scikit-learn, DDP sync; the detached linear probe."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from lit_methods.ssl import OnlineLinearProbe, WeightedKNNClassifier
from tests.ddp_helpers import init_gloo, run_distributed


def naive_knn_accuracy(bank, bank_targets, queries, targets, k, temperature, num_classes) -> float:
    bank, queries = F.normalize(bank, dim=1), F.normalize(queries, dim=1)
    correct = 0
    for query, target in zip(queries, targets):
        similarities = [(float(query @ b), int(t)) for b, t in zip(bank, bank_targets)]
        similarities.sort(key=lambda pair: -pair[0])
        votes = [0.0] * num_classes
        for similarity, label in similarities[:k]:
            votes[label] += float(torch.tensor(similarity / temperature).exp())
        correct += int(max(range(num_classes), key=votes.__getitem__) == int(target))
    return correct / len(queries)


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(4, 8, generator=g)
    bank_targets = torch.randint(0, 4, (120,), generator=g)
    targets = torch.randint(0, 4, (40,), generator=g)
    bank = centres[bank_targets] + 0.8 * torch.randn(120, 8, generator=g)
    queries = centres[targets] + 0.8 * torch.randn(40, 8, generator=g)
    return bank, bank_targets, queries, targets


@pytest.mark.parametrize("k", [1, 5, 200])
def test_knn_accuracy_equals_a_naive_loop(k):
    bank, bank_targets, queries, targets = _data()
    knn = WeightedKNNClassifier(num_classes=4, k=k, temperature=0.1, chunk_size=7)
    knn.update(bank_features=bank[:50], bank_targets=bank_targets[:50])
    knn.update(bank_features=bank[50:], bank_targets=bank_targets[50:], test_features=queries, test_targets=targets)
    expected = naive_knn_accuracy(bank, bank_targets, queries, targets, k, 0.1, 4)
    assert knn.compute().item() == pytest.approx(expected)


def test_one_neighbour_agrees_with_scikit_learn_on_real_digits():
    from sklearn.datasets import load_digits
    from sklearn.neighbors import KNeighborsClassifier

    x, y = load_digits(return_X_y=True)
    jitter = 1e-3 * torch.randn(len(x), 64, generator=torch.Generator().manual_seed(0))  # no exact ties
    x = torch.tensor(x, dtype=torch.float32) + jitter
    y = torch.tensor(y)
    reference = KNeighborsClassifier(n_neighbors=1, metric="cosine").fit(x[:1400].numpy(), y[:1400].numpy())
    expected = (torch.tensor(reference.predict(x[1400:].numpy())) == y[1400:]).float().mean().item()
    knn = WeightedKNNClassifier(num_classes=10, k=1)
    knn.update(x[:1400], y[:1400], x[1400:], y[1400:])
    assert knn.compute().item() == pytest.approx(expected) and expected > 0.9


def _knn_on_my_half() -> float:
    init_gloo()
    rank = int(os.environ["RANK"])
    bank, bank_targets, queries, targets = _data()
    knn = WeightedKNNClassifier(num_classes=4, k=5)
    knn.update(bank[rank::2], bank_targets[rank::2], queries[rank::2], targets[rank::2])
    return knn.compute().item()


@pytest.mark.ddp
def test_knn_votes_against_the_global_bank_under_ddp():
    bank, bank_targets, queries, targets = _data()
    single = WeightedKNNClassifier(num_classes=4, k=5)
    single.update(bank, bank_targets, queries, targets)
    assert run_distributed(_knn_on_my_half) == pytest.approx([single.compute().item()] * 2)


def test_linear_probe_trains_on_detached_features_only():
    probe = OnlineLinearProbe(num_features=6, num_classes=3)
    features = torch.randn(5, 6, requires_grad=True)
    targets = torch.tensor([0, 1, 2, 0, 1])
    loss, logits = probe(features, targets)
    torch.testing.assert_close(loss, F.cross_entropy(probe.classifier(features), targets))
    loss.backward()
    assert features.grad is None and probe.classifier.weight.grad is not None
    torch.testing.assert_close(logits, probe.classifier(features))


@pytest.mark.parametrize(
    "kwargs,match",
    [(dict(k=0), "k must be >= 1, got 0"), (dict(temperature=0.0), "temperature.*0.0"), (dict(num_classes=1), "1")],
)
def test_bad_arguments_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WeightedKNNClassifier(**(dict(num_classes=4) | kwargs))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_features_vote_in_float32(dtype):
    """Mixed-precision backbones give fp16/bf16 features. Features that share a strong common direction (cosines
    near 1, as a briefly trained backbone gives) make every neighbour's vote exp(cos / 0.1) about 1e4, so summed
    per class they overflow fp16 (max 65504) when kept in the features' dtype and the classes tie at inf: the
    accuracy falls to chance (checked: 0.25 in fp16 with the votes in the features' dtype). It must equal fp32's."""
    g = torch.Generator().manual_seed(0)
    common, centres = torch.randn(16, generator=g), torch.randn(4, 16, generator=g)
    bank_targets = torch.arange(4).repeat_interleave(100)
    targets = torch.arange(4).repeat_interleave(20)
    bank = 4.0 * common + centres[bank_targets] + 0.5 * torch.randn(400, 16, generator=g)
    queries = 4.0 * common + centres[targets] + 0.5 * torch.randn(80, 16, generator=g)
    accuracies = []
    for features_dtype in (torch.float32, dtype):
        knn = WeightedKNNClassifier(num_classes=4, k=200, temperature=0.1)
        knn.update(bank_features=bank.to(features_dtype), bank_targets=bank_targets)
        knn.update(test_features=queries.to(features_dtype), test_targets=targets)
        accuracies.append(knn.compute().item())
    assert accuracies[0] > 0.9
    assert accuracies[1] == pytest.approx(accuracies[0], abs=0.02)  # the features themselves were rounded to 16 bits
