"""ErrorFeedbackDP's book-keeping per-sample method against its vmap method and opacus' per-sample gradients,
the choice and refusals of the method, and the layers book-keeping supports (float64 throughout the equality checks:
in float32 a ReLU input that rounds to the other side of 0 in the batched and the one-sample forward changes that
sample's gradient, so the two methods agree to float32 rounding only most of the time)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lit_methods.callbacks.error_feedback_dp import ErrorFeedbackDP
from lit_methods.callbacks.per_sample_clipping import BookKeeping, unsupported_trainable_layers
from lit_methods.datamodules import DigitsDataModule
from lit_methods import ImageClassifier
from lit_methods.nets import ConvNet, ResNet20
from tests.helpers import cpu_trainer

opacus = pytest.importorskip("opacus")


def conv_net() -> ConvNet:
    return ConvNet(num_classes=10, in_channels=1, depth=2, width=8, norm="groupnorm", image_size=8)


def resnet20() -> ResNet20:
    return ResNet20(num_classes=10, in_channels=1, norm="groupnorm")


class Tokens(nn.Module):
    """(B, C, H, W) -> (B, H*W, C): a sequence for LayerNorm and a Linear on 3-D inputs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2)


class MeanOverTokens(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(1)


def mixed_layers() -> nn.Sequential:
    """Every supported layer kind and both weight rules on 8x8 inputs (T output positions; ghost norm when
    2 T (d_in + d_out) < d_in d_out): strided dilated padded conv T=16, d_in=9, d_out=8: materialized; strided
    bias-free conv T=4, 72 -> 32: ghost; Linear on tokens T=4, 32 -> 10: materialized; Linear on vectors T=1: ghost."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, stride=2, padding=2, dilation=2),
        nn.GroupNorm(2, 8),
        nn.ReLU(),
        nn.Conv2d(8, 32, 3, stride=2, padding=1, bias=False),
        Tokens(),
        nn.LayerNorm(32),
        nn.Linear(32, 10),
        nn.Tanh(),
        MeanOverTokens(),
        nn.Linear(10, 10, bias=False),
    )


def batches(count: int, size: int = 6, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(size, 1, 8, 8, generator=generator, dtype=torch.float64),
            torch.randint(0, 10, (size,), generator=generator),
        )
        for _ in range(count)
    ]


@pytest.mark.parametrize("parameter_gradients", [False, True], ids=["input-grads-only", "with-param-grads"])
@pytest.mark.parametrize("error_feedback", [True, False], ids=["DiceSGD", "DPSGD-GC"])
@pytest.mark.parametrize("make_net", [conv_net, resnet20, mixed_layers], ids=["convnet", "resnet20", "mixed"])
def test_book_keeping_direction_equals_the_vmap_direction_over_several_steps(
    make_net, error_feedback, parameter_gradients
):
    torch.manual_seed(0)
    model = ImageClassifier(make_net(), num_classes=10).double()
    steps = batches(3, size=4)
    probe = copy.deepcopy(model)
    probe_norms = BookKeeping(probe)
    probe.compute_loss(probe(steps[0][0]), steps[0][1]).backward()
    clip_norm = probe_norms.per_sample_norms().median().item()  # clips some samples of the batch, not all
    kwargs = {"clip_norm": clip_norm, "noise_multiplier": 0.7, "error_feedback": error_feedback, "seed": 4}
    fast = ErrorFeedbackDP(per_sample_method="book_keeping", **kwargs)
    reference = ErrorFeedbackDP(per_sample_method="vmap", **kwargs)
    fast_model, reference_model = model, copy.deepcopy(model)
    fast.attach_book_keeping(fast_model, parameter_gradients=parameter_gradients)
    clipped_and_not = set()
    for images, targets in steps:
        fast_model.zero_grad(set_to_none=True)
        fast_model.compute_loss(fast_model(images), targets).backward()
        # without parameter gradients the backward leaves p.grad unset and the parameters trainable again
        assert all((p.grad is None) != parameter_gradients and p.requires_grad for p in fast_model.parameters())
        norms = fast._book_keeping.per_sample_norms()
        clipped_and_not |= set((norms > kwargs["clip_norm"]).tolist())
        update = fast.privatized_gradients_from_backward(fast_model)
        expected = reference.privatized_gradients(reference_model, images, targets)
        assert update.keys() == expected.keys() == {n for n, _ in model.named_parameters()}
        for name, value in expected.items():
            torch.testing.assert_close(update[name], value, rtol=1e-9, atol=1e-12, msg=name)
        for name, value in reference.error.items():
            torch.testing.assert_close(fast.error[name], value, rtol=1e-9, atol=1e-12, msg=name)
        with torch.no_grad():  # both models take the same SGD step
            for (name, fast_param), reference_param in zip(fast_model.named_parameters(), reference_model.parameters()):
                fast_param -= 0.2 * update[name]
                reference_param -= 0.2 * update[name]
        fast.steps += 1
        reference.steps += 1
    assert clipped_and_not == {True, False}, "the check needs clipped and unclipped samples"
    if error_feedback:  # the compared buffer is far from zero (it was written, and fed back in steps 2 and 3)
        assert torch.cat([e.flatten() for e in fast.error.values()]).norm() > 1e-3


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


class Float64Classifier(ImageClassifier):
    """Runs in float64 (Lightning's precision="64-true" does not convert this datamodule's batches)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.double())


def _fit(tmp_path, make_net, per_sample_method: str, float64: bool = False, **trainer_kwargs):
    torch.manual_seed(0)
    model = (Float64Classifier if float64 else ImageClassifier)(make_net(), lr=0.05, lr_schedule="constant")
    model = model.double() if float64 else model
    dp = ErrorFeedbackDP(clip_norm=0.3, noise_multiplier=0.5, seed=2, per_sample_method=per_sample_method)
    trainer = cpu_trainer(
        default_root_dir=tmp_path,
        max_epochs=1,
        limit_train_batches=3,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[dp],
        **trainer_kwargs,
    )
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=16, seed=1))
    return model, dp


def test_auto_runs_book_keeping_under_the_trainer_and_trains_as_vmap(tmp_path):
    fast, fast_dp = _fit(tmp_path, conv_net, "auto", float64=True)
    slow, slow_dp = _fit(tmp_path, conv_net, "vmap", float64=True)
    assert fast_dp.active_per_sample_method == "book_keeping" and slow_dp.active_per_sample_method == "vmap"
    assert fast_dp.steps == slow_dp.steps == 3
    for (name, a), b in zip(fast.named_parameters(), slow.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=name)
    assert fast_dp._book_keeping is None, "the hooks are removed at teardown"


def prelu_net() -> ConvNet:
    net = conv_net()
    net.features[2] = nn.PReLU()  # a trainable layer that book-keeping does not handle
    return net


def test_unsupported_layer_falls_back_to_vmap_under_auto_and_is_refused_by_book_keeping(tmp_path):
    assert unsupported_trainable_layers(prelu_net()) == ["'features.2' (PReLU)"]
    auto, auto_dp = _fit(tmp_path, prelu_net, "auto")
    vmap, _ = _fit(tmp_path, prelu_net, "vmap")
    assert auto_dp.active_per_sample_method == "vmap"
    for (name, a), b in zip(auto.state_dict().items(), vmap.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(TypeError, match=r"book_keeping.*'backbone\.features\.2' \(PReLU\).*'vmap'"):
        _fit(tmp_path, prelu_net, "book_keeping")


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


def test_gradient_accumulation_is_refused_at_setup(tmp_path):
    with pytest.raises(ValueError, match="accumulate_grad_batches must be 1, got 2"):
        _fit(tmp_path, conv_net, "auto", accumulate_grad_batches=2)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"per_sample_method": "ghost"}, r"per_sample_method.*'ghost'"),
        ({"per_sample_method": "book_keeping", "chunk_size": 4}, r"chunk_size=4.*book_keeping"),
    ],
)
def test_bad_per_sample_method_arguments_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ErrorFeedbackDP(clip_norm=1.0, noise_multiplier=1.0, **kwargs)


def test_infinite_clip_without_noise_gives_the_ordinary_gradient():
    torch.manual_seed(0)
    model = ImageClassifier(resnet20()).double()
    dp = ErrorFeedbackDP(clip_norm=math.inf, noise_multiplier=0.0, per_sample_method="book_keeping")
    reference = copy.deepcopy(model)
    dp.attach_book_keeping(model)
    ((images, targets),) = batches(1)
    model.compute_loss(model(images), targets).backward()
    reference.compute_loss(reference(images), targets).backward()
    update = dp.privatized_gradients_from_backward(model)
    for name, param in reference.named_parameters():
        torch.testing.assert_close(update[name], param.grad, rtol=1e-10, atol=1e-14, msg=name)


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
