"""Book-keeping per-sample gradient norms and weighted sums against opacus' per-sample gradients and the ordinary
gradient, the layers book-keeping supports and refuses, and the torch.func per-sample gradients against a loop of
one-sample backwards (float64 throughout the equality checks)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lit_methods.privacy import BookKeeping, unsupported_trainable_layers, vmap_per_sample_gradients
from tests.privacy.helpers import batches, mixed_layers, resnet20

opacus = pytest.importorskip("opacus")


@pytest.mark.parametrize("make_net", [resnet20, mixed_layers], ids=["resnet20", "mixed"])
def test_per_sample_norms_equal_opacus_grad_sample_module(make_net):
    from opacus import GradSampleModule

    torch.manual_seed(0)
    net = make_net().double()
    reference = GradSampleModule(copy.deepcopy(net))  # loss_reduction="mean": grad_sample is per sample
    book_keeping = BookKeeping(net)
    ((images, targets),) = batches(1, size=5)
    F.cross_entropy(reference(images), targets).backward()
    F.cross_entropy(net(images), targets).backward()
    expected = torch.stack([p.grad_sample.flatten(1).norm(dim=1) for p in reference.parameters()]).norm(dim=0)
    norms = book_keeping.per_sample_norms()
    torch.testing.assert_close(norms, expected, rtol=1e-10, atol=0)
    assert norms.std() > 0.01 * norms.mean(), "the samples' norms must differ for the check to mean something"
    # the per-parameter rules also reproduce the ordinary gradient: the mean of the per-sample gradients
    batch, terms = book_keeping.terms()
    for name, param in net.named_parameters():
        ones = torch.ones(1, batch, dtype=torch.float64)
        torch.testing.assert_close(terms[name].weighted_sums(ones)[0] / batch, param.grad)


def test_unsupported_conv_variants_and_reparametrized_weights_are_listed():
    grouped = nn.Conv2d(4, 4, 3, groups=2)
    reflect = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")
    pruned = torch.nn.utils.prune.identity(nn.Linear(3, 3), "weight")  # trains "weight_orig"
    model = nn.Sequential(grouped, reflect, pruned, nn.Conv2d(4, 4, 3), nn.Linear(3, 3))
    assert unsupported_trainable_layers(model) == ["'0' (Conv2d)", "'1' (Conv2d)", "'2' (Linear)"]
    with pytest.raises(TypeError, match=r"unsupported: '0' \(Conv2d\), '1' \(Conv2d\), '2' \(Linear\)"):
        BookKeeping(model)
    model.requires_grad_(False)  # frozen layers need no per-sample gradients
    assert unsupported_trainable_layers(model) == []


def test_tied_weights_are_listed_and_refused_by_book_keeping():
    first, second = nn.Linear(4, 4), nn.Linear(4, 4)
    second.weight = first.weight  # one parameter, two layers' per-sample terms
    model = nn.Sequential(first, nn.Tanh(), second)
    shared = "Linear, shares a parameter with another layer"
    assert unsupported_trainable_layers(model) == [f"'0' ({shared})", f"'2' ({shared})"]
    with pytest.raises(TypeError, match="shares a parameter"):
        BookKeeping(model)


class SharedLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.tanh(self.linear(x)))


def test_a_layer_run_twice_in_one_step_raises_naming_it():
    model = SharedLinear()
    book_keeping = BookKeeping(model)
    model(torch.randn(3, 4)).sum().backward()
    with pytest.raises(RuntimeError, match=r"'linear' ran 2 times.*vmap"):
        book_keeping.per_sample_norms()
    book_keeping.remove()
    model(torch.randn(3, 4)).sum().backward()
    with pytest.raises(RuntimeError, match="recorded no training forward"):
        book_keeping.per_sample_norms()


def test_without_parameter_gradients_in_place_ops_work_and_a_failed_forward_leaves_the_parameters_trainable():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(144, 3)).double()
    reference = copy.deepcopy(net)
    book_keeping = BookKeeping(net, parameter_gradients=False)
    images, targets = torch.randn(5, 1, 8, 8, dtype=torch.float64), torch.randint(0, 3, (5,))
    F.cross_entropy(net(images), targets).backward()  # the first layer's output is a non-leaf: ReLU may act in place
    F.cross_entropy(reference(images), targets).backward()
    batch, terms = book_keeping.terms()
    ones = torch.ones(1, batch, dtype=torch.float64)
    for name, param in reference.named_parameters():
        assert dict(net.named_parameters())[name].grad is None
        torch.testing.assert_close(terms[name].weighted_sums(ones)[0] / batch, param.grad)
    with pytest.raises(RuntimeError, match="shape"):
        net(torch.randn(5, 1, 9, 9, dtype=torch.float64))  # the Linear gets 196 features, not 144
    assert all(p.requires_grad for p in net.parameters())


def test_vmap_per_sample_gradients_equal_one_backward_per_sample_and_skip_frozen_parameters():
    torch.manual_seed(0)
    net = mixed_layers().double()
    net[1].requires_grad_(False)  # a frozen GroupNorm: no per-sample gradient of its parameters
    ((images, targets),) = batches(1, size=5)
    per_sample = vmap_per_sample_gradients(net, F.cross_entropy, images, targets, chunk_size=2)
    trainable = {name: p for name, p in net.named_parameters() if p.requires_grad}
    assert list(per_sample) == list(trainable) and "1.weight" not in per_sample
    for i in range(len(images)):
        loss = F.cross_entropy(net(images[i : i + 1]), targets[i : i + 1])
        expected = torch.autograd.grad(loss, list(trainable.values()))
        for (name, value), gradient in zip(per_sample.items(), expected):
            torch.testing.assert_close(value[i], gradient, rtol=1e-10, atol=1e-14, msg=name)
    norms = torch.cat([g.flatten(1) for g in per_sample.values()], dim=1).norm(dim=1)
    assert norms.std() > 0.01 * norms.mean(), "the samples' gradients must differ for the check to mean something"
    with pytest.raises(ValueError, match="chunk_size must be None or >= 1, got 0"):
        vmap_per_sample_gradients(net, F.cross_entropy, images, targets, chunk_size=0)
