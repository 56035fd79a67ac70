"""DataDAM: attention maps, the zero-loss invariant and where the gradient goes (the card's checks)."""

from __future__ import annotations

import torch

from lit_methods.distillation import DataDAM
from lit_methods.distillation.datadam import relu_activations, spatial_attention
from tests.distillation.helpers import attached


def test_attention_map_matches_a_loop_has_unit_rows_and_ignores_positive_scale():
    features = torch.randn(4, 6, 5, 5)
    attention = spatial_attention(features, power=4.0)
    expected = torch.stack(
        [sum(features[b, c].abs() ** 4 for c in range(6)).flatten() for b in range(4)]
    )
    expected = expected / expected.norm(dim=1, keepdim=True)
    torch.testing.assert_close(attention, expected)
    assert attention.shape == (4, 25)
    torch.testing.assert_close(attention.norm(dim=1), torch.ones(4))
    torch.testing.assert_close(spatial_attention(3.7 * features, power=4.0), attention)


def test_hooks_give_every_relu_and_the_embedding_and_are_removed():
    module = attached(DataDAM, ipc=1)
    net = module.random_net()
    images = torch.randn(3, 1, 8, 8)
    activations, embedding = relu_activations(net, images)
    assert [a.shape for a in activations] == [(3, 16, 8, 8), (3, 16, 4, 4)]
    torch.testing.assert_close(embedding, net.forward_features(images))
    assert all(not m._forward_hooks for m in net.modules())


def test_loss_and_gradient_are_zero_when_the_synthetic_set_is_the_real_batch():
    module = attached(DataDAM, ipc=4, batch_real=4, dsa=False)
    net = module.random_net().requires_grad_(False)
    generator = torch.Generator().manual_seed(0)
    real = [module.real_images(c, 4, generator) for c in range(10)]
    syn = [r.clone().requires_grad_(True) for r in real]
    loss = module.attention_matching_loss(net, real, syn)
    grads = torch.autograd.grad(loss, syn)
    assert loss == 0 and all(torch.count_nonzero(g) == 0 for g in grads)
    other = [module.real_images(c, 4, generator) for c in range(10)]
    assert module.attention_matching_loss(net, real, other) > 0


def test_only_the_synthetic_images_get_gradients(monkeypatch):
    module = attached(DataDAM, ipc=2, batch_real=8)
    nets = []
    build = module.random_net
    monkeypatch.setattr(module, "random_net", lambda *salt: nets.append(build(*salt)) or nets[-1])
    module.matching_loss().backward()
    assert module.image_syn.grad is not None and module.image_syn.grad.abs().sum() > 0
    (net,) = nets
    assert all(p.grad is None and not p.requires_grad for p in net.parameters())
