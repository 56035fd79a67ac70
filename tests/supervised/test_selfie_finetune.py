"""Selfie's second stage: the fine-tuned classifier starts from the patch network's weights exactly, and a patch
network of other shapes is refused."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lit_methods.nets import ConvNet, ResNet18
from lit_methods.ssl import Selfie
from lit_methods.supervised import PAPER_RESNET_LAYERS, SelfieFineTuner, load_patch_network
from tests.helpers import cpu_trainer


def _patch_net(width: int = 16, image_size: int = 4) -> ConvNet:
    return ConvNet(num_classes=10, in_channels=1, depth=2, width=width, norm="batchnorm", image_size=image_size)


def _selfie() -> Selfie:
    torch.manual_seed(0)
    return Selfie(_patch_net(), image_size=16, patch_size=4, num_masked=4, num_attention_layers=1, num_heads=2)


def test_fine_tuning_carries_the_patch_networks_weights_exactly(tmp_path):
    model = _selfie()
    images = torch.randn(6, 1, 16, 16)
    trainer = cpu_trainer(max_steps=2, limit_val_batches=0, default_root_dir=tmp_path)
    data = TensorDataset(images, torch.randint(0, 10, (6,)))
    trainer.fit(model, train_dataloaders=DataLoader(data, batch_size=3))
    path = tmp_path / "selfie.ckpt"
    trainer.save_checkpoint(path)
    torch.manual_seed(1)
    # the same layers built for whole 16x16 images: only the classifier's input width differs
    classifier = SelfieFineTuner(_patch_net(image_size=16), pretrained_checkpoint=str(path), num_classes=10, lr=0.1)
    pretrained = model.backbone.state_dict()
    tuned = classifier.backbone.state_dict()
    assert set(tuned) - set(pretrained) == {"fc.weight", "fc.bias"}
    for key, value in pretrained.items():
        assert torch.equal(tuned[key], value), key
    assert any(not torch.equal(value, _patch_net().state_dict()[key]) for key, value in pretrained.items())
    assert classifier(images).shape == (6, 10)
    torch.manual_seed(1)
    scratch = SelfieFineTuner(_patch_net(image_size=16), num_classes=10)
    assert not torch.equal(scratch.backbone.features[0].weight, tuned["features.0.weight"])
    with pytest.raises(ValueError, match="shapes"):
        load_patch_network(_patch_net(width=8, image_size=16), path)


def test_the_papers_setting_reads_the_stem_and_first_three_stages_and_leaves_the_fourth_fresh(tmp_path):
    """``pretrained_layers=PAPER_RESNET_LAYERS``: a CIFAR ResNet-18 fine-tuner takes the stem and stages 0-2 of a
    Selfie ResNet-18 patch network and keeps its own initialization of stage 3 and the classifier."""
    torch.manual_seed(0)
    selfie = Selfie(
        ResNet18(num_classes=10, in_channels=1), image_size=16, patch_size=8, num_masked=2, num_attention_layers=1,
        num_heads=2,
    )
    path = tmp_path / "selfie.ckpt"
    torch.save({"state_dict": selfie.state_dict()}, path)
    torch.manual_seed(1)
    fresh = ResNet18(num_classes=10, in_channels=1).state_dict()
    torch.manual_seed(1)
    tuned = SelfieFineTuner(
        ResNet18(num_classes=10, in_channels=1), pretrained_checkpoint=str(path),
        pretrained_layers=list(PAPER_RESNET_LAYERS), num_classes=10,
    ).backbone.state_dict()
    pretrained = selfie.backbone.state_dict()
    for key, value in tuned.items():
        reference = pretrained if key.startswith(("stem.", "stages.0.", "stages.1.", "stages.2.")) else fresh
        assert torch.equal(value, reference[key]), key
    assert not torch.equal(pretrained["stages.3.0.conv1.weight"], fresh["stages.3.0.conv1.weight"])
    with pytest.raises(ValueError, match=r"\['stages.9'\] are not modules of ResNet18"):
        load_patch_network(ResNet18(num_classes=10, in_channels=1), path, ["stem", "stages.9"])
    with pytest.raises(ValueError, match="needs a pretrained_checkpoint"):
        SelfieFineTuner(ResNet18(num_classes=10, in_channels=1), pretrained_layers=["stem"], num_classes=10)
