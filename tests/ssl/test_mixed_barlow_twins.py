"""Mixed Barlow Twins: Barlow Twins at weight 0, the regularizer against the paper's formula, Beta mixing and the
gathered DDP regularizer."""

from __future__ import annotations

import os

import pytest
import scipy.stats
import torch
import torch.nn.functional as F

from lit_methods.losses.barlow_twins import BarlowTwinsLoss
from lit_methods.losses.mixed_barlow_twins import MixedBarlowTwinsRegularizer
from lit_methods.nets import ConvNet
from lit_methods.ssl.barlow_twins import BarlowTwins
from lit_methods.ssl.mixed_barlow_twins import MixedBarlowTwins, mix_bt_projector
from tests.ddp_helpers import init_gloo, run_distributed


def _net(width: int = 8) -> ConvNet:
    return ConvNet(num_classes=10, in_channels=1, depth=2, width=width, norm="batchnorm", image_size=8)


def _views_batch(n: int = 8):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(n, 1, 8, 8, generator=g), torch.randn(n, 1, 8, 8, generator=g)], torch.randint(0, 10, (n,))


def paper_regularizer(zm, za, zb, perm, alpha) -> torch.Tensor:
    """The official code's expression: cc_m_v - (alpha * C(z_a, z_v) + (1 - alpha) * C(z_b[perm], z_v)), squared."""

    def std(z):  # population standard deviation per dimension, written out
        centered = z - z.mean(0)
        return centered / (centered.pow(2).mean(0).sqrt() + 1e-5)

    m, a, b = std(zm), std(za), std(zb)
    n = len(a)
    total = 0.0
    for v in (a, b):
        cc = m.T @ v / n
        target = alpha * (a.T @ v) / n + (1 - alpha) * (b[perm].T @ v) / n
        total = total + ((cc - target) ** 2).sum()
    return total


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_regularizer_equals_the_papers_formula(alpha):
    g = torch.Generator().manual_seed(1)
    zm, za, zb = (torch.randn(9, 5, generator=g, dtype=torch.float64) for _ in range(3))
    perm = torch.randperm(9, generator=g)
    got = MixedBarlowTwinsRegularizer()(zm, za, zb, perm, alpha)
    torch.testing.assert_close(got, paper_regularizer(zm, za, zb, perm, alpha))
    assert got.item() > 0.1  # unrelated embeddings do not satisfy the interpolation constraint


def test_regularizer_is_zero_exactly_when_the_mixed_embedding_interpolates():
    g = torch.Generator().manual_seed(2)
    za, zb = torch.randn(12, 6, generator=g, dtype=torch.float64), torch.randn(12, 6, generator=g, dtype=torch.float64)
    perm = torch.randperm(12, generator=g)
    reg = MixedBarlowTwinsRegularizer(eps=0.0)
    scale = torch.linspace(0.5, 3.0, 6, dtype=torch.float64)
    # alpha = 1: the mixed sample is view a, alpha = 0: the permuted view b (any per-dimension scale and shift)
    assert reg(za * scale - 2.0, za, zb, perm, 1.0).item() == pytest.approx(0.0, abs=1e-20)
    assert reg(zb[perm] * scale + 1.0, za, zb, perm, 0.0).item() == pytest.approx(0.0, abs=1e-20)
    # pairing with the unpermuted view b is penalized
    assert reg(zb * scale + 1.0, za, zb, perm, 0.0).item() > 0.1


def test_per_sample_coefficients_reduce_to_the_scalar_one():
    g = torch.Generator().manual_seed(3)
    zm, za, zb = (torch.randn(8, 4, generator=g) for _ in range(3))
    perm = torch.randperm(8, generator=g)
    reg = MixedBarlowTwinsRegularizer()
    torch.testing.assert_close(reg(zm, za, zb, perm, torch.full((8,), 0.4)), reg(zm, za, zb, perm, 0.4))


def test_weight_zero_is_barlow_twins_bit_for_bit():
    views, labels = _views_batch()
    torch.manual_seed(0)
    plain = BarlowTwins(_net(), projection_hidden_dim=16, projection_dim=8)
    torch.manual_seed(0)
    mixed = MixedBarlowTwins(_net(), projection_hidden_dim=16, projection_dim=8, mix_reg_weight=0.0)
    rng = torch.get_rng_state()
    plain_loss = plain.training_step((views, labels), 0)
    mixed_loss = mixed.training_step((views, labels), 0)
    assert torch.equal(torch.get_rng_state(), rng)  # no mixing draw at weight 0
    assert torch.equal(plain_loss, mixed_loss)
    plain_loss.backward()
    mixed_loss.backward()
    plain_params, mixed_params = dict(plain.named_parameters()), dict(mixed.named_parameters())
    assert plain_params.keys() == mixed_params.keys()
    for name, param in plain_params.items():
        assert torch.equal(param.grad, mixed_params[name].grad), name


@pytest.mark.parametrize("l2_normalize", [False, True])
def test_training_loss_is_barlow_twins_plus_the_weighted_regularizer_of_the_mixed_views(l2_normalize):
    views, labels = _views_batch()
    torch.manual_seed(0)
    model = MixedBarlowTwins(
        _net(), projection_hidden_dim=16, projection_dim=8, mix_reg_weight=3.0, l2_normalize_projections=l2_normalize
    )
    model.eval()  # fixed BatchNorm statistics, so the repeated forwards below see the same network
    torch.manual_seed(7)
    total = model.training_step((views, labels), 0)
    torch.manual_seed(7)
    alpha, perm = model.sample_mixing(len(labels), torch.device("cpu"))
    assert 0.0 < alpha < 1.0 and sorted(perm.tolist()) == list(range(len(labels)))

    def embed(x):
        z = model.projector(model.backbone.forward_features(x))
        return F.normalize(z, dim=1) if l2_normalize else z

    za, zb = embed(views[0]), embed(views[1])
    zm = embed(alpha * views[0] + (1 - alpha) * views[1][perm])
    expected = BarlowTwinsLoss(5e-3)(za, zb) + 3.0 * 5e-3 * paper_regularizer(zm, za, zb, perm, alpha)
    probe_loss, _ = model.probe(model(views[0]), labels)
    torch.testing.assert_close(total, expected + probe_loss)


def test_official_projector_is_two_layers_with_an_output_bias():
    """``projector="mix_bt"`` is ``Linear(F, H, no bias) - BN(H) - ReLU - Linear(H, D, bias)`` and computes exactly
    that; the default stays Barlow Twins' 3-layer bias-free projector. Fails if the option is ignored (3 linears, no
    bias) or the output bias is dropped."""
    model = MixedBarlowTwins(_net(), projection_hidden_dim=16, projection_dim=8, projector="mix_bt")
    layers = list(model.projector)
    assert [type(m) for m in layers] == [torch.nn.Linear, torch.nn.BatchNorm1d, torch.nn.ReLU, torch.nn.Linear]
    first, norm, _, last = layers
    assert (first.in_features, first.out_features, first.bias) == (model.num_features, 16, None)
    assert norm.num_features == 16
    assert (last.in_features, last.out_features) == (16, 8) and last.bias is not None
    model.eval()
    with torch.no_grad():
        last.bias.uniform_(-1, 1)
        features = torch.randn(5, model.num_features)
        hidden = (features @ first.weight.T - norm.running_mean) / (norm.running_var + norm.eps).sqrt()
        expected = (hidden * norm.weight + norm.bias).clamp_min(0) @ last.weight.T + last.bias
        torch.testing.assert_close(model.projector(features), expected)
    default = MixedBarlowTwins(_net(), projection_hidden_dim=16, projection_dim=8)
    linears = [m for m in default.projector if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 3 and all(m.bias is None for m in linears)
    assert [type(m) for m in mix_bt_projector(4, 6, 3)] == [type(m) for m in layers]


def test_regularizer_with_the_official_projector_is_exact_at_an_interior_mixing_coefficient(monkeypatch):
    """At ``alpha = 0.37`` (not an endpoint, where mixing is a plain permutation) the training loss is Barlow Twins
    plus ``lambda_reg * lambda_BT`` times the regularizer computed directly from the embedding of the mixed views.
    Fails if the mixed batch pairs view b unpermuted, if alpha and 1 - alpha are swapped, or if the regularizer
    weight omits ``lambda_BT`` (each checked by editing ``ssl_loss``)."""
    views, labels = _views_batch()
    torch.manual_seed(0)
    model = MixedBarlowTwins(
        _net(), projection_hidden_dim=16, projection_dim=8, projector="mix_bt", l2_normalize_projections=True,
        lambda_offdiag=1 / 128, mix_reg_weight=4.0,
    )
    model.eval()  # fixed BatchNorm statistics, so the forwards below see the same network
    alpha, perm = 0.37, torch.tensor([3, 0, 7, 1, 6, 2, 5, 4])
    monkeypatch.setattr(model, "sample_mixing", lambda batch_size, device: (alpha, perm))
    with torch.no_grad():
        total = model.ssl_loss(views, [model(v) for v in views])

        def embed(x):
            return F.normalize(model.projector(model.backbone.forward_features(x)), dim=1)

        za, zb = embed(views[0]), embed(views[1])
        zm = embed(alpha * views[0] + (1 - alpha) * views[1][perm])
    regularizer = paper_regularizer(zm, za, zb, perm, alpha)
    assert regularizer.item() > 1e-3  # the projector is not linear: the constraint is not met for free
    torch.testing.assert_close(total, BarlowTwinsLoss(1 / 128)(za, zb) + 4.0 / 128 * regularizer)


def test_mixing_coefficient_follows_the_beta_distribution():
    for beta in (1.0, 0.3):
        model = MixedBarlowTwins(_net(), projection_hidden_dim=16, projection_dim=8, mix_beta=beta)
        torch.manual_seed(0)
        alphas = [model.sample_mixing(4, torch.device("cpu"))[0] for _ in range(3000)]
        assert scipy.stats.kstest(alphas, scipy.stats.beta(beta, beta).cdf).pvalue > 0.01
        wrong = scipy.stats.beta(2.0, 2.0).cdf  # a different Beta is rejected with the same samples
        assert scipy.stats.kstest(alphas, wrong).pvalue < 1e-6


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"mix_reg_weight": -1.0}, "mix_reg_weight.*-1.0"),
        ({"mix_beta": 0.0}, "mix_beta.*0.0"),
        ({"projector": "simclr"}, "projector.*'simclr'"),
    ],
)
def test_bad_arguments_are_rejected_with_their_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MixedBarlowTwins(_net(), projection_hidden_dim=16, projection_dim=8, **kwargs)


def test_bad_regularizer_inputs_are_rejected():
    z = torch.randn(4, 3)
    reg = MixedBarlowTwinsRegularizer()
    with pytest.raises(ValueError, match=r"\(4, 3\), \(4, 3\) and \(4, 2\)"):
        reg(z, z, z[:, :2], torch.arange(4), 0.5)
    with pytest.raises(ValueError, match="perm.*\\(3,\\)"):
        reg(z, z, z, torch.arange(3), 0.5)
    with pytest.raises(ValueError, match="1.5"):
        reg(z, z, z, torch.arange(4), 1.5)


# -- DDP: the gathered regularizer is the single-process one on the concatenated batch -----------------------------
def _global_embeddings():
    g = torch.Generator().manual_seed(11)
    return [torch.randn(8, 5, generator=g) for _ in range(3)]


_LOCAL_PERMS = [torch.tensor([2, 0, 3, 1]), torch.tensor([1, 3, 0, 2])]
_ALPHAS = [0.25, 0.8]


def _gathered_regularizer_on_my_slice() -> tuple[float, list[torch.Tensor]]:
    init_gloo()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    zs = [z.chunk(world)[rank].clone().requires_grad_(True) for z in _global_embeddings()]
    loss = MixedBarlowTwinsRegularizer(gather_distributed=True)(*zs, _LOCAL_PERMS[rank], _ALPHAS[rank])
    loss.backward()
    return loss.item(), [z.grad for z in zs]


@pytest.mark.ddp
def test_gathered_regularizer_and_gradients_equal_the_single_process_ones():
    results = run_distributed(_gathered_regularizer_on_my_slice)
    world = len(results)
    zs = [z.clone().requires_grad_(True) for z in _global_embeddings()]
    perm = torch.cat([p + 4 * r for r, p in enumerate(_LOCAL_PERMS)])
    alpha = torch.tensor(_ALPHAS).repeat_interleave(4)
    single = MixedBarlowTwinsRegularizer()(*zs, perm, alpha)
    single.backward()
    assert [loss for loss, _ in results] == pytest.approx([single.item()] * world, rel=1e-5)
    for rank, (_, grads) in enumerate(results):  # world_size x the slice's gradient; DDP's mean divides it out
        for got, z in zip(grads, zs):
            torch.testing.assert_close(got / world, z.grad.chunk(world)[rank], rtol=1e-4, atol=1e-6)
    local_only = MixedBarlowTwinsRegularizer()(*(z.detach()[:4] for z in zs), _LOCAL_PERMS[0], _ALPHAS[0])
    assert abs(local_only.item() - single.item()) > 1e-3  # the test distinguishes gathered from per-rank
