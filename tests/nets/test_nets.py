"""Tests of the backbones in ``lit_methods.nets``, parametrized over the registry (timm test_models style)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from lit_methods import nets
from lit_methods.nets import (
    VGG,
    WRN28_10,
    ConvNet,
    HeResNet,
    ResNet18,
    ResNet20,
    ResNet56,
    TimmModel,
    TorchvisionModel,
    VGG16BN,
    ViT,
    WideResNet,
    create_net,
    list_nets,
)

REGISTERED = list_nets()
BATCH = 2


@pytest.fixture(autouse=True)
def seed() -> None:
    torch.manual_seed(0)


def input_side(name: str) -> int:
    """Square input side used for a registered net: CIFAR's 32, or 64 for ConvNet-4 (built for 64x64)."""
    return 64 if name == "convnet4" else 32


def one_channel_kwargs(name: str) -> tuple[int, dict[str, Any]]:
    """Input side and extra kwargs for a 1-channel test: 28x28 (Fashion-MNIST) where the net supports it."""
    if name.startswith("vgg"):
        return 32, {}
    if name.startswith("convnet"):
        return 28, {"image_size": 28}
    if name.startswith("spectformer"):  # spectral filters are sized for one token grid
        return 28, {"image_size": 28}
    return 28, {}


def images(side: int, channels: int = 3) -> torch.Tensor:
    return torch.randn(BATCH, channels, side, side)


def parameter_count(net: nn.Module) -> int:
    return sum(parameter.numel() for parameter in net.parameters())


def test_registry_holds_the_required_nets() -> None:
    required = {
        "resnet18", "resnet34", "resnet50", "resnet20", "resnet32", "resnet56", "vgg11_bn", "vgg16_bn",
        "wrn28_10", "wrn34_10", "convnet3", "convnet4", "vit_tiny_patch4",
    }  # fmt: skip
    assert required <= set(REGISTERED)
    assert REGISTERED == sorted(nets.NETS)


def test_create_net_unknown_name_lists_available_names() -> None:
    with pytest.raises(ValueError, match=r"'resnet1000'.*resnet18.*wrn34_10"):
        create_net("resnet1000")


def test_register_net_refuses_duplicate_names() -> None:
    with pytest.raises(ValueError, match="'resnet18'"):
        nets.register_net("resnet18")(ResNet18)


@pytest.mark.parametrize("name", REGISTERED)
def test_forward_shape_and_gradients(name: str) -> None:
    net = create_net(name, num_classes=7)
    assert net.num_classes == 7 and net.in_channels == 3
    net.train()
    logits = net(images(input_side(name)))
    assert logits.shape == (BATCH, 7)
    assert torch.isfinite(logits).all()
    logits.sum().backward()
    for parameter_name, parameter in net.named_parameters():
        assert parameter.grad is not None, f"{name}: no gradient for {parameter_name}"
        assert torch.isfinite(parameter.grad).all(), f"{name}: non-finite gradient for {parameter_name}"


@pytest.mark.parametrize("name", REGISTERED)
def test_one_channel_input(name: str) -> None:
    side, kwargs = one_channel_kwargs(name)
    net = create_net(name, num_classes=7, in_channels=1, **kwargs).eval()
    assert net.in_channels == 1
    with torch.no_grad():
        logits = net(images(side, channels=1))
    assert logits.shape == (BATCH, 7)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", REGISTERED)
def test_features_head_and_reset_classifier(name: str) -> None:
    net = create_net(name, num_classes=0).eval()
    x = images(input_side(name))
    assert isinstance(net.fc, nn.Identity)
    with torch.no_grad():
        features = net(x)
        assert features.shape == (BATCH, net.num_features)
        torch.testing.assert_close(net.forward_features(x), features)

        net.reset_classifier(5)
        assert isinstance(net.fc, nn.Linear) and net.fc.in_features == net.num_features
        assert net.num_classes == 5
        logits = net(x)
        assert logits.shape == (BATCH, 5)
        torch.testing.assert_close(net.forward_head(net.forward_features(x)), logits)
        torch.testing.assert_close(net.fc(features), logits)

        net.reset_classifier(0)
        assert net(x).shape == (BATCH, net.num_features)


# He et al. (2016) Table 6 gives 0.27M/0.85M for ResNet-20/56; with option-A (parameter-free) shortcuts
# the exact counts are 269,722 and 853,018 (272,474 would be ResNet-20 with 1x1 projection shortcuts).
# CIFAR ResNet-18: 11,173,962; WRN-28-10: 36.5M in Zagoruyko & Komodakis Table 1 (36,479,194 exactly);
# VGG-16-BN CIFAR form with a single Linear(512, 10): 14,728,266.
# ConvNet-3: conv 3*128*9+128 = 3,584; 2 x conv 128*128*9+128 = 147,584; 3 x GroupNorm 2*128 = 256;
# Linear 128*4*4*10+10 = 20,490; total 3,584 + 2*147,584 + 3*256 + 20,490 = 320,010.
@pytest.mark.parametrize(
    ("constructor", "expected"),
    [
        (ResNet20, 269_722),
        (ResNet56, 853_018),
        (ResNet18, 11_173_962),
        (WRN28_10, 36_479_194),
        (VGG16BN, 14_728_266),
        (ConvNet, 320_010),
    ],
)
def test_parameter_counts(constructor: Callable[..., nn.Module], expected: int) -> None:
    assert parameter_count(constructor(num_classes=10)) == expected


def test_zero_pad_shortcuts_have_no_parameters() -> None:
    shortcut_parameters = sum(
        parameter_count(block.shortcut) for stage in ResNet20().stages for block in stage  # type: ignore[union-attr]
    )
    assert shortcut_parameters == 0


def test_convnet_floors_odd_sizes_like_avgpool() -> None:
    net = ConvNet(in_channels=1, image_size=28)  # 28 -> 14 -> 7 -> 3
    assert net.num_features == 128 * 3 * 3
    assert net(images(28, channels=1)).shape == (BATCH, 10)
    rectangular = ConvNet(depth=2, width=8, image_size=(16, 12))
    assert rectangular.num_features == 8 * 4 * 3
    assert rectangular(torch.randn(BATCH, 3, 16, 12)).shape == (BATCH, 10)


def test_convnet_instancenorm_is_affine_groupnorm() -> None:
    norms = [module for module in ConvNet().modules() if isinstance(module, nn.GroupNorm)]
    assert len(norms) == 3
    assert all(norm.num_groups == norm.num_channels == 128 and norm.affine for norm in norms)


@pytest.mark.parametrize(
    "build",
    [
        lambda: ResNet20(norm="groupnorm"),
        lambda: ResNet18(norm="groupnorm"),
        lambda: VGG(config="A", norm="groupnorm"),
        lambda: WideResNet(depth=10, widen_factor=1, norm="groupnorm"),
        lambda: ConvNet(norm="groupnorm"),
        lambda: ConvNet(norm="none"),
    ],
    ids=["resnet20", "resnet18", "vgg11", "wrn10_1", "convnet_groupnorm", "convnet_none"],
)
def test_groupnorm_variants_have_no_batchnorm(build: Callable[[], nn.Module]) -> None:
    net = build()
    assert not any(isinstance(module, nn.modules.batchnorm._BatchNorm) for module in net.modules())
    assert net(images(32)).shape == (BATCH, 10)


def test_wide_resnet_dropout_acts_only_in_training() -> None:
    net = WideResNet(depth=10, widen_factor=1, dropout=0.5)
    x = images(8)
    with torch.no_grad():
        assert not torch.equal(net.train()(x), net(x))
        assert torch.equal(net.eval()(x), net(x))


def test_vit_accepts_other_image_sizes() -> None:
    net = ViT(in_channels=1, depth=1).eval()
    assert net(images(28, channels=1)).shape == (BATCH, 10)
    assert net.forward_features(images(16, channels=1)).shape == (BATCH, 192)


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: ResNet20(num_classes=-1), "-1"),
        (lambda: ResNet18(in_channels=0), "in_channels.*0"),
        (lambda: ResNet56(norm="layernorm"), "'layernorm'"),
        (lambda: HeResNet(depth=21), "21"),
        (lambda: WideResNet(depth=30), "30"),
        (lambda: WideResNet(depth=10, widen_factor=1, dropout=1.5), "1.5"),
        (lambda: VGG(config="C"), "'C'"),
        (lambda: ConvNet(norm="instance"), "'instance'"),
        (lambda: ConvNet(depth=4, image_size=8), "8"),
        (lambda: ViT(embed_dim=100, num_heads=3), "100"),
        (lambda: ViT(global_pool="max"), "'max'"),
        (lambda: TimmModel("no_such_model", num_classes=5), "'no_such_model'"),
        (lambda: TorchvisionModel("no_such_model", num_classes=5), "'no_such_model'"),
        (lambda: TorchvisionModel("resnet18", num_classes=0), "num_classes.*0"),
    ],
)
def test_bad_arguments_raise_value_error(build: Callable[[], nn.Module], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build()


def test_reset_classifier_rejects_negative() -> None:
    with pytest.raises(ValueError, match="-3"):
        ResNet20().reset_classifier(-3)


def test_timm_adapter_one_channel() -> None:
    net = TimmModel("resnet10t", num_classes=5, in_channels=1).eval()
    x = images(28, channels=1)
    with torch.no_grad():
        logits = net(x)
        assert logits.shape == (BATCH, 5)
        features = net.forward_features(x)
        assert features.shape == (BATCH, net.num_features)
        torch.testing.assert_close(net.forward_head(features), logits)
    net.reset_classifier(3)
    assert net.num_classes == 3 and net(x).shape == (BATCH, 3)


def test_torchvision_adapter_one_channel() -> None:
    net = TorchvisionModel("resnet18", num_classes=5, in_channels=1).eval()
    assert net.model.conv1.in_channels == 1
    with torch.no_grad():
        assert net(images(28, channels=1)).shape == (BATCH, 5)


def test_yaml_class_path_instantiation() -> None:
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser()
    parser.add_argument("--net", type=nn.Module)
    config = parser.parse_string(
        "net:\n  class_path: lit_methods.nets.ResNet20\n  init_args:\n    num_classes: 7\n    norm: groupnorm\n"
    )
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # renamed in 4.49
    net = instantiate(config).net
    assert isinstance(net, ResNet20) and net.num_classes == 7
    assert isinstance(net.stem[1], nn.GroupNorm)
