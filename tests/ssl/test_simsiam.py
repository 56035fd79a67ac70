"""SimSiam: the symmetric stop-gradient loss against a naive computation, the heads, the fixed predictor rate."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lit_methods.datamodules import DigitsDataModule
from lit_methods.nets import ConvNet
from lit_methods.ssl.simsiam import SimSiam
from tests.helpers import cpu_trainer


def _simsiam(**kwargs) -> SimSiam:
    torch.manual_seed(0)
    net = ConvNet(num_classes=10, in_channels=1, depth=2, width=8, norm="batchnorm", image_size=8)
    defaults = {"projection_hidden_dim": 16, "projection_dim": 12, "prediction_hidden_dim": 4}
    return SimSiam(net, **(defaults | kwargs))


def _views(n_views: int = 2, n: int = 6) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(n, 1, 8, 8, generator=g) for _ in range(n_views)]


def test_loss_is_the_symmetric_negative_cosine_with_a_stopped_target():
    model = _simsiam()
    views = _views()
    features = [model(v) for v in views]
    loss = model.ssl_loss(views, features)
    z1, z2 = model.projector(features[0]), model.projector(features[1])
    p1, p2 = model.predictor(z1), model.predictor(z2)
    stopped = -(F.cosine_similarity(p1, z2.detach()).mean() + F.cosine_similarity(p2, z1.detach()).mean()) / 2
    unstopped = -(F.cosine_similarity(p1, z2).mean() + F.cosine_similarity(p2, z1).mean()) / 2
    torch.testing.assert_close(loss, stopped)
    params = list(model.backbone.parameters()) + list(model.projector.parameters())
    grads = torch.autograd.grad(loss, params, retain_graph=True)
    for got, expected in zip(grads, torch.autograd.grad(stopped, params, retain_graph=True)):
        torch.testing.assert_close(got, expected)
    # the stop-gradient matters: without it the encoder gets a different gradient
    without = torch.autograd.grad(unstopped, params)
    assert any(not torch.allclose(a, b) for a, b in zip(grads, without))


def test_more_views_average_every_ordered_pair():
    model = _simsiam()
    views = _views(n_views=3)
    features = [model(v) for v in views]
    z = [model.projector(f) for f in features]
    p = [model.predictor(zi) for zi in z]
    expected = sum(-F.cosine_similarity(p[i], z[j]).mean() for i in range(3) for j in range(3) if i != j) / 6
    torch.testing.assert_close(model.ssl_loss(views, features), expected)


@pytest.mark.parametrize("layers", [2, 3])
def test_projector_ends_in_a_non_affine_batchnorm_and_predictor_is_a_bottleneck(layers):
    model = _simsiam(projection_layers=layers)
    linears = [m for m in model.projector if isinstance(m, torch.nn.Linear)]
    assert len(linears) == layers and all(m.bias is None for m in linears)
    z = model.projector(torch.randn(32, model.num_features) * 5 + 3)
    # a non-affine output BN standardises every output dimension over the batch, whatever the input
    torch.testing.assert_close(z.mean(0), torch.zeros(12), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.var(0, unbiased=False), torch.ones(12), atol=1e-3, rtol=0)
    assert not list(model.projector[-1].parameters())
    widths = [m.out_features for m in model.predictor if isinstance(m, torch.nn.Linear)]
    assert widths == [4, 12]


@pytest.mark.parametrize("fixed", [True, False])
def test_predictor_rate_stays_fixed_while_the_rest_decays(tmp_path, fixed):
    model = _simsiam(fixed_predictor_lr=fixed, lr=0.05, warmup_steps=1)
    trainer = cpu_trainer(max_steps=4, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=32, ssl_views=2, num_workers=0))
    predictor = {id(p) for p in model.predictor.parameters()}
    groups = trainer.optimizers[0].param_groups
    predictor_groups = [g for g in groups if {id(p) for p in g["params"]} & predictor]
    other_groups = [g for g in groups if not {id(p) for p in g["params"]} & predictor]
    # cosine over the 4 steps ends at 0; the fixed predictor keeps the base rate
    assert all(g["lr"] == pytest.approx(0.0, abs=1e-12) for g in other_groups)
    assert all(g["lr"] == (pytest.approx(0.05) if fixed else pytest.approx(0.0, abs=1e-12)) for g in predictor_groups)
    if fixed:  # the predictor has groups of its own (weights, and biases + BN without decay)
        assert {id(p) for g in predictor_groups for p in g["params"]} == predictor
        assert [g["weight_decay"] for g in predictor_groups] == [model.weight_decay, 0.0]


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="projection_layers must be 2 or 3, got 4"):
        _simsiam(projection_layers=4)
    with pytest.raises(ValueError, match="prediction_hidden_dim=0"):
        _simsiam(prediction_hidden_dim=0)
