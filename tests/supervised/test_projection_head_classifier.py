"""The supervised setting of the projection-head study: a classifier trained through the head, whose evaluated
representation bypasses it; bad arguments; learning digits through the reweighting head."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lit_methods.datamodules import DigitsDataModule
from lit_methods.nets import ConvNet
from lit_methods.supervised import ProjectionHeadClassifier
from tests.helpers import cpu_trainer, frozen_knn_accuracy


def _classifier(head: str, **kwargs) -> ProjectionHeadClassifier:
    torch.manual_seed(0)
    net = ConvNet(num_classes=10, in_channels=1, depth=2, width=8, norm="batchnorm", image_size=8)
    return ProjectionHeadClassifier(
        net, head=head, num_classes=10, in_channels=1, image_size=(8, 8), **({"projection_hidden_dim": 16} | kwargs)
    )


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="head must be one of .*got 'linear'"):
        _classifier("linear")
    with pytest.raises(ValueError, match="projection_hidden_dim must be >= 1, got 0"):
        _classifier("mlp", projection_hidden_dim=0)
    with pytest.raises(ValueError, match="kappa must be >= 1, got 0.9"):
        _classifier("reweight", kappa=0.9)
    with pytest.raises(ValueError, match="Linear needs forward_features"):
        ProjectionHeadClassifier(torch.nn.Linear(4, 10), num_classes=10)


def test_supervised_head_is_trained_through_and_bypassed_in_the_evaluated_features():
    images, labels = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    for head in ("mlp", "reweight"):
        model = _classifier(head, kappa=1.3)
        assert model.backbone.num_classes == 0  # the backbone's classifier is replaced by the model's own
        features = model.backbone.forward_features(images)
        through_head = model.classifier(model.projector(features))
        if head == "reweight":
            weights = torch.tensor([1.3**-i for i in range(model.backbone.num_features)])
            torch.testing.assert_close(through_head, model.classifier(features * weights))
        # training: cross-entropy of the logits through the head, and the MLP head gets gradients
        loss, logits, _ = model.shared_step((images, labels), "train")
        torch.testing.assert_close(logits, through_head)
        torch.testing.assert_close(loss, F.cross_entropy(through_head, labels))
        if head == "mlp":
            grads = torch.autograd.grad(loss, list(model.projector.parameters()))
            assert all(g.abs().sum() > 0 for g in grads)
        model.eval()
        # the evaluated representation is the pre-projection one, in either mode
        torch.testing.assert_close(model.forward_features(images), model.backbone.forward_features(images))
        eval_features = model.backbone.forward_features(images)
        torch.testing.assert_close(model(images), model.classifier(model.projector(eval_features)))
        model.evaluate_with_head = False  # the SpuCo fork's use_ph=False
        bypassed = model(images)
        torch.testing.assert_close(bypassed, model.classifier(eval_features))
        assert not torch.allclose(bypassed, model.classifier(model.projector(eval_features)))
    plain = _classifier("none").eval()
    torch.testing.assert_close(plain(images), plain.classifier(plain.backbone.forward_features(images)))


def test_supervised_reweight_head_learns_digits_and_evaluation_uses_the_pre_head_features(tmp_path):
    """Seed 0: ConvNet-2 of width 8 (32 features) with the reweighting head (kappa 1.1), 3 epochs on digits."""
    torch.manual_seed(0)
    model = _classifier("reweight", kappa=1.1, lr=0.2)
    datamodule = DigitsDataModule(batch_size=64, num_workers=0, seed=0)
    trainer = cpu_trainer(max_epochs=3, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=datamodule)
    accuracy = trainer.validate(model, datamodule=datamodule, verbose=False)[0]["val/acc"]
    pre_head_knn = frozen_knn_accuracy(model, datamodule)  # uses forward_features: the head is bypassed
    print(f"val accuracy through the head {accuracy:.3f}; kNN of the pre-head features {pre_head_knn:.3f}")
    # 3 epochs: the plain classifier (head "none") reaches ~0.94 here, the reweighted one ~0.73; chance is 0.1
    assert accuracy > 0.5
    assert pre_head_knn > 0.85
