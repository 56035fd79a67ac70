"""NAPA-VQ (arXiv:2308.09297): the card's unit invariants and its CPU check on digits (5 + 5 classes)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn

from lit_methods.continual import NAPAVQ
from lit_methods.continual.napa_vq import na_loss, neighbourhood_prototypes, rotate_with_labels, update_edges
from lit_methods.datamodules import ClassIncrementalDataModule, DigitsDataModule
from lit_methods.nets import ConvNet
from tests.helpers import cpu_trainer

EPOCHS = 5


class CodeVectorsAtTaskStart(L.Callback):
    """Copies the code vectors when task 1 starts (before its first step)."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: NAPAVQ) -> None:
        if trainer.current_epoch == EPOCHS:
            self.code_vectors = pl_module.code_vectors.detach().clone()


def digits_16x16_convnet() -> nn.Module:
    """The card's tiny CNN on 16x16 digits: the 8x8 images upsampled (bilinear) into a ConvNet-3 of width 8, whose
    2x2 maps give 32-d features (on the 8x8 images themselves a ConvNet-3 ends on 1x1 maps)."""
    convnet = ConvNet(num_classes=0, in_channels=1, depth=3, width=8, norm="batchnorm", image_size=16)
    return nn.Sequential(nn.Upsample(size=(16, 16), mode="bilinear", align_corners=False), convnet, nn.Flatten())


def run_digits(**kwargs) -> tuple[NAPAVQ, CodeVectorsAtTaskStart]:
    """Digits 0-4 then 5-9, 5 epochs each, the card's 16x16 tiny CNN with 32-d features, one thread."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    digits = DigitsDataModule(batch_size=64, crop_padding=0, num_workers=0)
    stream = ClassIncrementalDataModule(digits, classes_per_task=5, epochs_per_task=EPOCHS, class_order=list(range(10)))
    model = NAPAVQ(digits_16x16_convnet(), num_classes=10, num_features=32, image_size=(8, 8), mean=digits.mean,
                   std=digits.std, **kwargs)
    snapshot = CodeVectorsAtTaskStart()
    trainer = cpu_trainer(
        max_epochs=2 * EPOCHS,
        reload_dataloaders_every_n_epochs=1,
        check_val_every_n_epoch=EPOCHS,
        num_sanity_val_steps=0,
        callbacks=[snapshot],
    )
    trainer.fit(model, datamodule=stream)
    return model, snapshot


@pytest.fixture(scope="module")
def napa_and_finetune():
    # the paper's weights and rates (pa 10, kd 10, Adam 1e-3 then 1e-4, CVs SGD 5 then 0.5): the defaults. On the
    # 8x8 images with a ConvNet-3 of width 32 (1x1 maps) they keep 99% of the old digits but reach only 66% on the new
    # ones (fine-tuning: 98%), at 10 epochs and at 20 alike; the card's 16x16 input passes the check with them.
    napa, snapshot = run_digits()
    finetune, _ = run_digits(na_weight=0.0, pa_weight=0.0, kd_weight=0.0, incremental_lr_factor=1.0)
    return napa, snapshot, finetune


@pytest.mark.slow
def test_napa_vq_keeps_old_classes_that_finetuning_forgets(napa_and_finetune):
    """After task 1, fine-tuning with DCE only keeps < 30% of digits 0-4; NAPA-VQ with the paper's loss weights keeps
    >= 20 points more, with new-class accuracy within 15 points of fine-tuning's. Fails for a no-op NAPA-VQ (its
    losses switched off it is the fine-tuning run: no gap). Measured (5 epochs per task): fine-tuning old 15.9% /
    new 78.1%, NAPA-VQ 69.9% / 71.9%; at 10 epochs per task 36.3% / 94.2% vs 89.4% / 79.9% (fine-tuning then keeps
    more than the card's 30%, so the test runs 5)."""
    napa, _, finetune = napa_and_finetune
    napa_old, napa_new = napa.measured_matrix()[1].tolist()
    finetune_old, finetune_new = finetune.measured_matrix()[1].tolist()
    assert finetune_old < 0.30
    assert napa_old >= finetune_old + 0.20
    assert abs(napa_new - finetune_new) <= 0.15
    assert napa.stream_metrics()["forgetting"] < finetune.stream_metrics()["forgetting"]


def test_old_code_vectors_do_not_move_in_task_1(napa_and_finetune):
    """(c) every task-0 CV (20 = 5 classes x 4 rotations) is bit-identical after all of task 1's steps, while the
    task-1 CVs moved; the graph is symmetric with a unit diagonal."""
    napa, snapshot, _ = napa_and_finetune
    assert torch.equal(napa.code_vectors[:20], snapshot.code_vectors[:20])
    assert not torch.equal(napa.code_vectors[20:], snapshot.code_vectors[20:])
    assert torch.equal(napa.edges, napa.edges.T)
    assert torch.equal(napa.edges.diagonal(), torch.ones(40))


def naive_edges(edges, distances, k, decay, edge_min):
    """The graph rule with Python loops over samples and entries."""
    n, a = distances.shape
    nearest = [sorted(range(a), key=lambda j: distances[i, j].item())[:k] for i in range(n)]
    wins = [sum(1 for i in range(n) if nearest[i][0] == w) for w in range(a)]
    out = edges.clone()
    for w in range(a):
        for j in range(a):
            times_set = sum(1 for i in range(n) if nearest[i][0] == w and j in nearest[i])
            value = max(out[w, j].item(), 1.0 if times_set else 0.0) * decay ** max(wins[w] - times_set, 0)
            out[w, j] = value if value >= edge_min else 0.0
    return out


def test_graph_update_follows_the_rule_and_cuts_weak_edges():
    """(b) the vectorised update equals a loop over samples; no entry lies in (0, edge_min) after the cut; the
    graph starts as the identity and stays symmetric with a unit diagonal once symmetrised."""
    generator = torch.Generator().manual_seed(0)
    edges = torch.eye(8)
    for _ in range(6):
        distances = torch.rand(12, 8, generator=generator)
        updated = update_edges(edges, distances, neighbours=3, decay=0.5, edge_min=0.5**3)
        torch.testing.assert_close(updated, naive_edges(edges, distances, 3, 0.5, 0.5**3))
        assert not ((updated > 0) & (updated < 0.5**3)).any()
        edges = (updated + updated.T) / 2
        assert torch.equal(edges, edges.T) and torch.equal(edges.diagonal(), torch.ones(8))
    model = NAPAVQ(ConvNet(num_classes=10, in_channels=1, depth=3, width=8, image_size=8), num_classes=10)
    assert torch.equal(model.edges, torch.eye(40))


def test_na_loss_is_zero_when_samples_are_nearest_their_own_code_vector():
    """(a) features at their own CV are closer to it than to any neighbour: loss 0; features moved toward a
    neighbour give the hinge of a hand loop."""
    cvs = torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]])
    edges = torch.ones(3, 3)
    labels = torch.tensor([0, 1, 2])
    assert na_loss(cvs + 0.1, labels, cvs, edges) == 0
    features = torch.tensor([[3.5, 0.0], [4.0, 0.0], [0.0, 1.0]])
    expected = 0.0
    for f, y in zip(features, labels.tolist()):
        d = ((f - cvs) ** 2).sum(1)
        others = [j for j in range(3) if j != y]
        weights = torch.softmax(-0.001 * d[others], 0)
        expected += max(d[y] - (weights * d[others]).sum(), 0.0)
    assert na_loss(features, labels, cvs, edges).item() == pytest.approx(float(expected) / 3)
    no_neighbours = torch.eye(3)
    assert na_loss(features, labels, cvs, no_neighbours).item() == pytest.approx(((features - cvs) ** 2).sum(1).mean().item())


def test_prototype_augmentation_lies_between_a_class_and_a_graph_neighbour():
    """(d) every NA-PA sample is gamma * p_c + (1 - gamma) * p_n for a neighbour n of c and gamma in [0.5, 1]."""
    generator = torch.Generator().manual_seed(0)
    prototypes = torch.randn(8, 5, generator=generator)
    edges = torch.eye(8)
    edges[0, 5] = edges[5, 0] = edges[4, 6] = edges[6, 4] = 0.7
    classes = torch.tensor([0, 4, 0, 4] * 8)
    gammas = torch.empty(len(classes)).uniform_(0.5, 1.0, generator=generator)
    samples, chosen = neighbourhood_prototypes(prototypes, edges, classes, gammas, generator)
    assert (edges[classes, chosen] > 0).all() and set(chosen.tolist()) == {0, 4, 5, 6}
    torch.testing.assert_close(samples, gammas[:, None] * prototypes[classes] + (1 - gammas[:, None]) * prototypes[chosen])


def test_rotations_label_each_quarter_turn():
    images = torch.arange(2 * 9, dtype=torch.float32).view(2, 1, 3, 3)
    rotated, labels = rotate_with_labels(images, torch.tensor([1, 2]))
    assert labels.tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    assert torch.equal(rotated[5], torch.rot90(images[1], 1, (1, 2)))


def test_bad_arguments_are_refused():
    backbone = ConvNet(num_classes=10, in_channels=1, depth=3, width=8, image_size=8)
    with pytest.raises(ValueError, match="must be square"):
        NAPAVQ(backbone, num_classes=10, image_size=(8, 16))
    with pytest.raises(ValueError, match="pa_weight must be >= 0"):
        NAPAVQ(backbone, num_classes=10, pa_weight=-1.0)
    with pytest.raises(ValueError, match="edge_decay must lie in"):
        NAPAVQ(backbone, num_classes=10, edge_decay=1.5)
