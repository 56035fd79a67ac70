"""FYI: flip invariance of the doubled matching losses, the gradient through the doubling, and the asymmetry the
paper claims it preserves (the card's checks)."""

from __future__ import annotations

import pytest
import torch

from lit_methods.distillation import DCC, FYI, DataDAM, DistributionMatching, flip_doubled
from tests.distillation.helpers import attached, digits, distill


def _flip_one(module, index: int) -> None:
    with torch.no_grad():
        module.image_syn[index] = module.image_syn[index].flip(-1)


def _dm_loss(module) -> torch.Tensor:
    return module.matching_loss()


def _gm_loss(module) -> torch.Tensor:
    return module.gradient_matching_loss(module.random_net(), contrastive=True) + module.gradient_matching_loss(
        module.random_net(), contrastive=False
    )


@pytest.mark.parametrize(
    ("cls", "loss_of"),
    [(DistributionMatching, _dm_loss), (DataDAM, _dm_loss), (DCC, _gm_loss)],
    ids=["dm", "datadam", "dcc"],
)
def test_loss_is_invariant_to_flipping_one_image_only_with_fyi(cls, loss_of):
    """With a fixed net and real batches (one step's seeds, DSA off), mirroring one synthetic image leaves the loss
    over S and flip(S) unchanged (to 1e-6); without FYI it changes."""
    for fyi in (True, False):
        module = attached(cls, ipc=2, batch_real=8, dsa=False, fyi=fyi)
        before = loss_of(module)
        _flip_one(module, 3)
        after = loss_of(module)
        if fyi:
            torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-6)
        else:
            assert (after - before).abs() > 1e-4


def test_image_gradient_is_the_sum_over_the_image_and_its_mirror():
    """d loss / d S has the shape of S (not 2x) and equals g1 + flip(g2), g1 and g2 the gradients of the two halves of
    the doubled batch (autograd on the doubled tensor as the reference)."""
    module = attached(FYI, ipc=3, batch_real=8, dsa=False)
    (grad,) = torch.autograd.grad(module.matching_loss(), module.image_syn)
    assert grad.shape == module.image_syn.shape
    net = module.random_net().requires_grad_(False)
    generator = module.generator(0)
    real = [module.real_images(c, 8, generator) for c in range(10)]
    doubled = [flip_doubled(module.image_syn[module.class_slice(c)].detach())[0].requires_grad_() for c in range(10)]
    halves = torch.autograd.grad(module.embedding_matching_loss(net, real, doubled), doubled)
    expected = torch.cat([g[:3] + g[3:].flip(-1) for g in halves])
    torch.testing.assert_close(grad, expected, atol=1e-6, rtol=1e-5)


def _asymmetry(images: torch.Tensor) -> float:
    return float(((images - images.flip(-1)).flatten(1).norm(dim=1) / images.flatten(1).norm(dim=1)).mean())


@pytest.mark.slow
def test_fyi_keeps_the_images_asymmetric_where_dm_makes_them_symmetric():
    """DM on digits whose real set holds every image and its mirror (bilateral equivalence forced), IPC 1 from real
    images: plain DM pulls each image towards its mirror (asymmetry drops); FYI matches S and flip(S) together, so
    it has no such pull and the images stay more asymmetric. Replacing FYI by a no-op (fyi=False) makes the two runs
    identical, and the test fails."""
    datamodule = digits()
    images = torch.cat([datamodule.train_images, datamodule.train_images.flip(-1)])
    labels = torch.cat([datamodule.train_labels, datamodule.train_labels])
    results = {}
    for fyi in (False, True):
        module = DistributionMatching(
            ipc=1, batch_real=64, fyi=fyi, num_classes=10, in_channels=1, image_size=8, net_depth=2, net_width=16
        )
        module.attach_real_data(images, labels, datamodule.to_inputs)
        initial = _asymmetry(module.image_syn.detach())
        distill(module, 150)
        results[fyi] = (initial, _asymmetry(module.image_syn.detach()))
    print("asymmetry (initial, final): DM", results[False], "FYI", results[True])
    assert results[False][1] < results[False][0]
    assert results[True][1] > results[False][1]
