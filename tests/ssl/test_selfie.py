"""Selfie: patches, attention pooling and the patch-choice loss against direct computations, no leak of masked
patches, and patch-choice accuracy on real Fashion-MNIST (fine-tuning: tests/supervised/test_selfie_finetune.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lit_methods.datamodules.fashion_mnist import FashionMNISTDataModule
from lit_methods.nets import ConvNet
from lit_methods.ssl.selfie import Selfie
from tests.helpers import cpu_trainer


def _patch_net(width: int = 16, norm: str = "batchnorm", image_size: int = 4) -> ConvNet:
    return ConvNet(num_classes=10, in_channels=1, depth=2, width=width, norm=norm, image_size=image_size)


def _selfie(**overrides) -> Selfie:
    torch.manual_seed(0)
    kwargs = {"image_size": 16, "patch_size": 4, "num_masked": 4, "num_attention_layers": 1, "num_heads": 2} | overrides
    return Selfie(_patch_net(), **kwargs)


def test_patches_are_the_grid_cells_in_row_major_order():
    model = _selfie(image_size=(8, 12))
    images = torch.randn(3, 1, 8, 12)
    patches = model.patchify(images)
    assert patches.shape == (3, 6, 1, 4, 4)
    for row in range(2):
        for col in range(3):
            cell = images[:, :, 4 * row : 4 * row + 4, 4 * col : 4 * col + 4]
            assert torch.equal(patches[:, 3 * row + col], cell)


def _direct_encoder_layer(layer: torch.nn.TransformerEncoderLayer, x: torch.Tensor, heads: int) -> torch.Tensor:
    """One post-norm Transformer layer written out: multi-head attention, residual, LayerNorm, ReLU MLP."""
    d = x.shape[-1]
    wq, wk, wv = layer.self_attn.in_proj_weight.chunk(3)
    bq, bk, bv = layer.self_attn.in_proj_bias.chunk(3)
    split = lambda t: t.view(*t.shape[:2], heads, d // heads).transpose(1, 2)
    q, k, v = split(x @ wq.T + bq), split(x @ wk.T + bk), split(x @ wv.T + bv)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1)
    attended = (weights @ v).transpose(1, 2).reshape(x.shape)
    attended = attended @ layer.self_attn.out_proj.weight.T + layer.self_attn.out_proj.bias
    x = F.layer_norm(x + attended, (d,), layer.norm1.weight, layer.norm1.bias, layer.norm1.eps)
    hidden = torch.relu(x @ layer.linear1.weight.T + layer.linear1.bias) @ layer.linear2.weight.T + layer.linear2.bias
    return F.layer_norm(x + hidden, (d,), layer.norm2.weight, layer.norm2.bias, layer.norm2.eps)


def test_attention_pooling_equals_a_direct_computation():
    model = _selfie().eval()
    g = torch.Generator().manual_seed(1)
    features = torch.randn(3, 12, model.num_features, generator=g)
    positions = torch.stack([torch.randperm(16, generator=g)[:12] for _ in range(3)])
    with torch.no_grad():
        u = model.attention_pooling(features, positions)
        pooling = model.attention_pooling
        tokens = torch.cat([pooling.start_token.expand(3, 1, -1), features + pooling.position_embedding[positions]], 1)
        expected = _direct_encoder_layer(model.attention_pooling.encoder.layers[0], tokens, heads=2)[:, 0]
    torch.testing.assert_close(u, expected, rtol=1e-5, atol=1e-5)
    # a set summary: the visible patches' order does not matter, only their content and positions
    order = torch.randperm(12, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(model.attention_pooling(features[:, order], positions[:, order]), u)
        moved = model.attention_pooling(features, positions.roll(1, dims=1))
    assert (moved - u).abs().max() > 1e-3


def test_loss_and_accuracy_equal_a_direct_computation_and_masked_patches_do_not_leak():
    model = _selfie()
    model.eval()  # BatchNorm with running statistics: each patch's features depend on that patch only
    images = torch.randn(5, 1, 16, 16)
    torch.manual_seed(3)
    with torch.no_grad():
        loss, accuracy, features = model.selfie_loss(images)
    torch.manual_seed(3)
    masked, visible = model.sample_mask(5, torch.device("cpu"))
    assert sorted(torch.cat([masked, visible], 1)[0].tolist()) == list(range(16)) and masked.shape == (5, 4)
    total, correct = 0.0, 0
    with torch.no_grad():
        for n in range(5):
            u = model.attention_pooling(features[n : n + 1, visible[n]], visible[n : n + 1])[0]
            for j in range(4):
                query = u + model.attention_pooling.position_embedding[masked[n, j]]
                logits = torch.stack([query @ features[n, masked[n, k]] for k in range(4)])
                total += (torch.logsumexp(logits, 0) - logits[j]).item()
                correct += int(logits.argmax().item() == j)
    assert loss.item() == pytest.approx(total / 20, rel=1e-5)
    assert accuracy.item() == pytest.approx(correct / 20)
    # the summary sees only the visible patches: changing the masked patches' pixels leaves it unchanged
    altered = model.patchify(images).clone()
    altered[torch.arange(5)[:, None], masked] = torch.randn(5, 4, 1, 4, 4)
    altered_images = altered.view(5, 4, 4, 1, 4, 4).permute(0, 3, 1, 4, 2, 5).reshape(5, 1, 16, 16)
    with torch.no_grad():
        h, h_altered = model.patch_features(images), model.patch_features(altered_images)
        pick = lambda f, pos: f[torch.arange(5)[:, None], pos]
        u = model.attention_pooling(pick(h, visible), visible)
        u_altered = model.attention_pooling(pick(h_altered, visible), visible)
    assert not torch.allclose(pick(h, masked), pick(h_altered, masked))
    torch.testing.assert_close(u_altered, u)


def test_training_step_adds_the_detached_probe_and_refuses_multi_view_batches():
    model = _selfie()
    images, labels = torch.randn(4, 1, 16, 16), torch.randint(0, 10, (4,))
    torch.manual_seed(5)
    total = model.training_step((images, labels), 0)
    torch.manual_seed(5)
    loss, _, features = model.selfie_loss(images)
    probe_loss, _ = model.probe(features.mean(1), labels)
    torch.testing.assert_close(total, loss + probe_loss)
    with pytest.raises(TypeError, match="ssl_views=0"):
        model.training_step(([images, images], labels), 0)


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"patch_size": 5}, "patch_size 5.*16x16"),
        ({"num_masked": 16}, r"num_masked.*\[2, 16\).*16"),
        ({"num_masked": 1}, "num_masked.*got 1"),
        ({"num_heads": 3}, "num_heads 3.*16"),
        ({"dropout": 1.0}, "dropout.*1.0"),
    ],
)
def test_bad_arguments_are_rejected_with_their_value(overrides, match):
    with pytest.raises(ValueError, match=match):
        _selfie(**overrides)


def test_every_parameter_is_optimized(tmp_path):
    model = _selfie()
    trainer = cpu_trainer(max_steps=1, limit_val_batches=0, default_root_dir=tmp_path)
    data = TensorDataset(torch.randn(4, 1, 16, 16), torch.randint(0, 10, (4,)))
    trainer.fit(model, train_dataloaders=DataLoader(data, batch_size=4))
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    missing = [name for name, p in model.named_parameters() if id(p) not in optimized]
    assert not missing and len(optimized) == len(list(model.parameters()))


# -- real data ------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_patch_choice_accuracy_rises_well_above_chance_on_fashion_mnist(tmp_path):
    torch.manual_seed(0)
    dm = FashionMNISTDataModule(
        batch_size=32, samples_per_class=200, crop_padding=0, horizontal_flip=False, num_workers=0, seed=0
    )
    model = Selfie(
        ConvNet(num_classes=10, in_channels=1, depth=2, width=32, norm="batchnorm", image_size=7),
        image_size=28, patch_size=7, num_masked=4, num_attention_layers=1, num_heads=4, lr=0.2, warmup_steps=0, weight_decay=0.0,
    )
    dm.setup("fit")
    test_images = (dm.test_images[:512].float() / 255 - dm.mean[0]) / dm.std[0]

    def held_out_accuracy(shuffle_query_positions: bool) -> float:
        model.eval()
        torch.manual_seed(123)
        with torch.no_grad():
            features = model.patch_features(test_images)
            masked, visible = model.sample_mask(len(test_images), torch.device("cpu"))
            pick = lambda pos: features.gather(1, pos[..., None].expand(-1, -1, features.shape[-1]))
            summary = model.attention_pooling(pick(visible), visible)
            query_positions = masked[:, torch.randperm(4)] if shuffle_query_positions else masked
            logits = model.patch_choice_logits(summary, query_positions, pick(masked))
        model.train()
        return (logits.argmax(2) == torch.arange(4)).float().mean().item()

    before = held_out_accuracy(False)
    trainer = cpu_trainer(max_epochs=1, limit_val_batches=0, default_root_dir=tmp_path)  # 63 steps
    trainer.fit(model, datamodule=dm)
    after, shuffled = held_out_accuracy(False), held_out_accuracy(True)
    print(f"Fashion-MNIST held-out patch-choice accuracy (chance 0.25): {before:.3f} before, {after:.3f} after, "
          f"{shuffled:.3f} with the queries' positions permuted")
    assert after > 0.35  # 1.4x chance after one epoch of 2,000 images (held out: 2,048 choices)
    assert shuffled < after - 0.1  # the choice is conditioned on the query's position
