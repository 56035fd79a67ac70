"""Selfie's second stage: the fine-tuned classifier starts from the patch network's weights exactly, and a patch
network of other shapes is refused."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lit_methods.nets import ConvNet
from lit_methods.ssl import Selfie
from lit_methods.supervised import SelfieFineTuner, load_patch_network
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
