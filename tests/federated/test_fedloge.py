"""FedLoGe (arXiv:2401.08977): the card's checks on a long-tailed federation of digits (5 clients, Dirichlet 0.5,
imbalance factor 10), run by the in-process runner; plus exact resume of an interrupted federation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from lit_methods.datamodules import DigitsDataModule, FederatedDataModule
from lit_methods.federated import FedLoGe, Federation, gla_fr_realign, sparse_equiangular_classifier
from lit_methods.nets import ConvNet

TAIL = (7, 8, 9)


def make_federation(num_clients: int = 5, state_path=None, local_epochs: int = 2) -> Federation:
    dm = FederatedDataModule(
        DigitsDataModule(num_workers=0, imbalance_factor=10.0, crop_padding=0),
        num_clients=num_clients,
        alpha=0.5,
        batch_size=32,
    )
    torch.manual_seed(0)  # the initial global weights (the CLI seeds them with seed_everything)
    backbone = ConvNet(num_classes=10, in_channels=1, depth=2, width=16, norm="batchnorm", image_size=8)
    module = FedLoGe(
        backbone, num_classes=10, in_channels=1, image_size=(8, 8), sse_steps=50, lr=0.1, mean=dm.mean, std=dm.std
    )
    trainer = {"max_epochs": local_epochs, "accelerator": "cpu", "devices": 1}
    return Federation(module, dm, trainer, seed=0, state_path=state_path)


@pytest.fixture(scope="module")
def trained():
    """10 rounds of every client, 2 local epochs (about 15 s on a busy 2-core CPU)."""
    torch.set_num_threads(1)
    federation = make_federation()
    initial_sse = federation.module.sse_classifier.clone()
    federation.run(10)
    return federation, initial_sse


def test_sse_classifier_is_sparse_equiangular_and_frozen(trained):
    federation, initial_sse = trained
    weight = federation.module.sse_classifier
    assert torch.equal(weight, initial_sse), "the SSE-C changed in training"
    assert (weight == 0).float().mean().item() >= 0.6
    cosine = F.normalize(weight, dim=1) @ F.normalize(weight, dim=1).T
    assert cosine[~torch.eye(10, dtype=torch.bool)].mean().item() < 0
    assert "sse_classifier" not in dict(federation.module.named_parameters())


def test_sse_classifier_refinement_keeps_zeros_and_spreads_the_nearest_classes():
    """The Adam refinement keeps the zeroed entries at 0 and raises the smallest angle between class vectors (fails
    if the gradient mask or the angle term is dropped)."""
    raw = sparse_equiangular_classifier(10, 32, steps=0, seed=3)
    refined = sparse_equiangular_classifier(10, 32, steps=300, lr=1e-3, seed=3)
    assert torch.equal(raw == 0, refined == 0)

    def max_cosine(w):
        c = F.normalize(w, dim=1) @ F.normalize(w, dim=1).T
        return c[~torch.eye(10, dtype=torch.bool)].max().item()

    assert max_cosine(refined) < max_cosine(raw)
    with pytest.raises(ValueError, match="must be >= num_classes"):
        sparse_equiangular_classifier(10, 8)


def test_gla_fr_equalises_the_aux_norms_that_follow_the_class_counts_and_lifts_the_tail(trained):
    """Before GLA-FR the g_aux row norms rank like the long-tailed class counts (Spearman > 0.5); after it all are
    tau, and the balanced-test accuracy on the tail classes rises. Checked by hand: with gla_fr_realign replaced by
    the identity the tail accuracy stays equal and the test fails; the untrained g_aux's norms give Spearman 0.2."""
    federation, _ = trained
    module, dm = federation.module, federation.datamodule
    counts = torch.bincount(dm.dataset.train_labels, minlength=10)
    norms = module.g_aux.weight.detach().norm(dim=1)
    assert spearmanr(norms, counts).statistic > 0.5
    torch.testing.assert_close(module.realigned_aux_weight().norm(dim=1), torch.full((10,), module.tau))
    logits, labels = module.collect_logits(dm.dataset.test_dataloader(), dm)
    tail = torch.isin(labels, torch.tensor(TAIL))
    raw_tail = (logits["aux"].argmax(1)[tail] == labels[tail]).float().mean()
    realigned_tail = (logits["generic"].argmax(1)[tail] == labels[tail]).float().mean()
    assert realigned_tail > raw_tail


def test_local_models_beat_the_generic_model_on_their_own_data(trained):
    """Mean local-test accuracy of l_head + g_aux (absent classes masked) over the clients exceeds the generic
    model's on the same images (0.90 against 0.88). Checked by hand: with the local heads averaged like g_aux
    (``private_prefixes = ()``) the local models score 0.84 against the generic 0.85 and the test fails."""
    federation, _ = trained
    last = federation.state.history[-1]
    local = [v for k, v in last.items() if k.endswith("/local_acc")]
    generic = [v for k, v in last.items() if k.startswith("client_") and k.endswith("/generic_acc")]
    assert len(local) == len(generic) == 5
    assert sum(local) / 5 > sum(generic) / 5
    assert last["global/generic_acc"] > 0.3  # the federation learned (chance is 0.1)


def test_local_heads_stay_private(trained):
    federation, _ = trained
    heads = [s["local_head.weight"] for s in federation.state.client_states.values()]
    assert all(not torch.equal(heads[0], h) for h in heads[1:])
    assert not any(k.startswith("local_head.") for k in federation.state.global_state)


def test_gla_fr_scales_rows_not_columns():
    weight = torch.tensor([[3.0, 4.0], [0.0, 2.0], [1.0, 0.0]])
    torch.testing.assert_close(gla_fr_realign(weight, 2.0), torch.tensor([[1.2, 1.6], [0.0, 2.0], [2.0, 0.0]]))


def test_an_interrupted_federation_resumes_exactly(tmp_path):
    """Two rounds uninterrupted equal one round, a fresh process-like restart from the saved state, one more."""
    torch.set_num_threads(1)
    uninterrupted = make_federation(num_clients=2, local_epochs=1).run(2)
    path = tmp_path / "state.pt"
    make_federation(num_clients=2, state_path=path, local_epochs=1).run(1)
    resumed_federation = make_federation(num_clients=2, state_path=path, local_epochs=1)
    assert resumed_federation.state.rounds_done == 1
    resumed = resumed_federation.run(2)
    for name, value in uninterrupted.global_state.items():
        assert torch.equal(resumed.global_state[name], value), name
    for client, state in uninterrupted.client_states.items():
        for name, value in state.items():
            assert torch.equal(resumed.client_states[client][name], value), (client, name)
