"""ErrorFeedbackDP's book-keeping per-sample method against its vmap method, and the choice and refusals of the
method; the per-sample engines themselves are tested in tests/privacy/test_per_sample.py (float64 throughout the
equality checks: in float32 a ReLU input that rounds to the other side of 0 in the batched and the one-sample
forward changes that sample's gradient, so the two methods agree to float32 rounding only most of the time)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from lit_methods.callbacks.error_feedback_dp import ErrorFeedbackDP
from lit_methods.datamodules import DigitsDataModule
from lit_methods import ImageClassifier
from lit_methods.nets import ConvNet
from lit_methods.privacy import BookKeeping, unsupported_trainable_layers
from tests.helpers import cpu_trainer
from tests.privacy.helpers import batches, mixed_layers, resnet20

opacus = pytest.importorskip("opacus")


def conv_net() -> ConvNet:
    return ConvNet(num_classes=10, in_channels=1, depth=2, width=8, norm="groupnorm", image_size=8)


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


