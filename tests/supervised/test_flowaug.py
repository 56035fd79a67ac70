"""FlowAug: the Glow round trip, the latent surgery against its formula, the classifier hook, and on real digits a
trained flow whose augmentations change pixels but keep the digit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("normflows")

from lit_methods.datamodules import DigitsDataModule  # noqa: E402
from lit_methods.cli import LitMethodsCLI  # noqa: E402
from lit_methods.nets import ConvNet  # noqa: E402
from lit_methods.supervised.flowaug import FlowAug, FlowPretraining, build_glow  # noqa: E402
from lit_methods.supervised.subgroup_fairness import SubgroupClassifier  # noqa: E402
from tests.helpers import cpu_trainer  # noqa: E402


def _glow() -> torch.nn.Module:
    torch.manual_seed(0)
    flow = build_glow(in_channels=1, image_size=8, num_levels=2, blocks_per_level=2, hidden_channels=16)
    flow.log_prob(torch.rand(32, 1, 8, 8), None)  # ActNorm's data-dependent initialisation
    return flow


def test_glow_latents_have_the_multiscale_shapes_and_decode_back_to_the_image():
    aug = FlowAug(flow=_glow(), levels_to_resample=1, p=1.0)
    images = torch.rand(5, 1, 8, 8)
    latents = aug.encode(images)
    assert [tuple(z.shape[1:]) for z in latents] == [(8, 2, 2), (2, 4, 4)]  # coarsest first, 64 dims in all
    assert (aug.decode(latents) - images).abs().max() < 1e-3


def test_resample_keeps_the_coarse_latent_and_draws_the_fine_ones_from_the_prior_at_the_temperature():
    flow = _glow()
    with torch.no_grad():
        for prior in flow.q0:
            prior.loc.normal_()
            prior.log_scale.normal_(std=0.3)
    aug = FlowAug(flow=flow, levels_to_resample=1, temperature=0.4, p=1.0)
    latents = aug.encode(torch.rand(6, 1, 8, 8))
    torch.manual_seed(3)
    redrawn = aug.resample(latents)
    torch.manual_seed(3)
    noise = torch.randn_like(latents[1])
    assert torch.equal(redrawn[0], latents[0])
    torch.testing.assert_close(redrawn[1], flow.q0[1].loc + 0.4 * flow.q0[1].log_scale.exp() * noise)
    at_zero = FlowAug(flow=flow, levels_to_resample=1, temperature=0.0).resample(latents)
    torch.testing.assert_close(at_zero[1], flow.q0[1].loc.expand_as(latents[1]))


def test_augmentation_maps_normalized_batches_to_normalized_batches_and_respects_p():
    mean, std = (0.3053,), (0.3759,)
    aug = FlowAug(flow=_glow(), levels_to_resample=1, p=1.0, mean=mean, std=std)
    images = (torch.rand(8, 1, 8, 8) - mean[0]) / std[0]
    out = aug(images)
    assert out.shape == images.shape and not torch.equal(out, images)
    unit = out * std[0] + mean[0]
    assert unit.min() >= -1e-6 and unit.max() <= 1 + 1e-6
    assert torch.equal(FlowAug(flow=_glow(), p=0.0, mean=mean, std=std)(images), images)
    torch.manual_seed(0)
    half = FlowAug(flow=_glow(), p=0.5, mean=mean, std=std)(images.repeat(50, 1, 1, 1))
    changed = (half != images.repeat(50, 1, 1, 1)).flatten(1).any(1).float().mean()
    assert 0.4 < changed < 0.6


def test_an_image_whose_decoding_is_not_finite_is_kept_and_counted():
    flow = _glow()
    with torch.no_grad():
        flow.q0[1].loc.fill_(float("nan"))  # a broken prior: the redrawn fine latents decode to NaN
    aug = FlowAug(flow=flow, levels_to_resample=1, temperature=0.0, p=1.0)
    images = torch.rand(3, 1, 8, 8)
    assert torch.equal(aug(images), images.clamp(0, 1))
    assert aug.num_non_finite == 3


def test_bad_arguments_name_the_value():
    flow = _glow()
    with pytest.raises(ValueError, match=r"levels_to_resample must lie in \[1, 1\], got 2"):
        FlowAug(flow=flow, levels_to_resample=2)
    with pytest.raises(ValueError, match="temperature must be >= 0, got -0.1"):
        FlowAug(flow=flow, temperature=-0.1)
    with pytest.raises(ValueError, match=r"p must lie in \[0, 1\], got 1.5"):
        FlowAug(flow=flow, p=1.5)
    with pytest.raises(ValueError, match="exactly one of flow_checkpoint and flow"):
        FlowAug()
    with pytest.raises(ValueError, match="diagonal Gaussian priors"):
        FlowAug(flow=torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="image_size=12 must be divisible by 2\\*\\*num_levels=8"):
        build_glow(1, 12, num_levels=3)
    with pytest.raises(ValueError, match="std must be > 0"):
        FlowPretraining(in_channels=1, image_size=8, std=(0.0,), num_levels=2)


def test_subgroup_classifier_trains_on_flow_augmented_images_and_evaluates_on_clean_ones():
    aug = FlowAug(flow=_glow(), p=1.0)
    backbone = ConvNet(num_classes=10, in_channels=1, depth=1, width=4, image_size=8)
    model = SubgroupClassifier(backbone, flow_augmentation=aug, num_subgroups=2)
    images, labels = torch.rand(4, 1, 8, 8), torch.arange(4)
    torch.manual_seed(1)
    loss, _, _ = model.shared_step((images, labels), "train")
    torch.manual_seed(1)
    expected = torch.nn.functional.cross_entropy(backbone(aug(images)), labels)
    torch.testing.assert_close(loss, expected)
    val_loss, _, _ = model.shared_step((images, labels), "val")
    torch.testing.assert_close(val_loss, torch.nn.functional.cross_entropy(backbone(images), labels))
    assert not any(p.requires_grad for p in aug.parameters())


@pytest.mark.slow
def test_on_digits_a_trained_flow_learns_and_its_augmentations_keep_the_digit(tmp_path):
    """Seed 0: a 3-level Glow trained 4 epochs (84 steps) on digits; a logistic regression fitted on the clean training
    pixels then classifies the augmented test digits (fine level redrawn at temperature 0.1; temperature 1 changes them more)."""
    from sklearn.linear_model import LogisticRegression

    torch.manual_seed(0)
    dm = DigitsDataModule(batch_size=64, seed=0)
    flow_model = FlowPretraining(
        in_channels=1, image_size=8, mean=dm.mean, std=dm.std, num_levels=3, blocks_per_level=4, hidden_channels=32,
        lr=5e-3, warmup_steps=10,
    )
    trainer = cpu_trainer(max_epochs=4, enable_checkpointing=True, default_root_dir=tmp_path)
    before = trainer.validate(flow_model, datamodule=dm, verbose=False)[0]["val/bpd"]
    trainer.fit(flow_model, datamodule=dm)
    after = trainer.validate(flow_model, datamodule=dm, verbose=False)[0]["val/bpd"]
    assert after < before - 0.5, (before, after)
    checkpoint = tmp_path / "flow.ckpt"
    trainer.save_checkpoint(checkpoint)

    (train_x, train_y), (test_x, test_y) = dm.load_split(train=True), dm.load_split(train=False)
    train_x, test_x = train_x.float().div(255), test_x.float().div(255)
    classifier = LogisticRegression(max_iter=2000).fit(train_x.flatten(1).numpy(), train_y.numpy())
    distances = {}
    for temperature in (0.1, 1.0):
        torch.manual_seed(0)
        aug = FlowAug(flow_checkpoint=str(checkpoint), temperature=temperature, p=1.0, mean=dm.mean, std=dm.std)
        augmented = aug((test_x - dm.mean[0]) / dm.std[0]) * dm.std[0] + dm.mean[0]
        distances[temperature] = (augmented - test_x).abs().mean().item()
        if temperature == 0.1:
            kept = (classifier.predict(augmented.flatten(1).numpy()) == test_y.numpy()).mean()
            clean = (classifier.predict(test_x.flatten(1).numpy()) == test_y.numpy()).mean()
    assert distances[0.1] > 0.01  # the images do change
    assert distances[0.1] < distances[1.0]  # lower temperature stays closer to the image
    assert kept >= 0.8 * clean, (kept, clean)
    print(f"bpd {before:.2f} -> {after:.2f}; pixel change {distances}; accuracy clean {clean:.3f} aug {kept:.3f}")
    assert np.isfinite(after)


def test_cli_fills_the_normalization_of_the_data_into_flowaug(tmp_path):
    flow_model = FlowPretraining(in_channels=1, image_size=8, num_levels=2, blocks_per_level=1, hidden_channels=8)
    checkpoint = tmp_path / "flow.ckpt"
    torch.save({"state_dict": flow_model.state_dict(), "hyper_parameters": dict(flow_model.hparams),
                "pytorch-lightning_version": "2.6.6"}, checkpoint)
    cli = LitMethodsCLI(
        args=[
            "--config", "experiments/subgroup-fairness/subgroup-fairness_convnet_digits_flowaug.yaml",
            f"--model.flow_augmentation.init_args.flow_checkpoint={checkpoint}",
            "--trainer.logger=false",
        ],
        run=False,
    )
    aug = cli.model.flow_augmentation
    assert isinstance(aug, FlowAug)
    assert aug.data_normalization.mean.flatten().tolist() == pytest.approx(list(DigitsDataModule.mean))
    assert aug.data_normalization.std.flatten().tolist() == pytest.approx(list(DigitsDataModule.std))


_BACKGROUNDS = torch.tensor([[1.0, 0.1, 0.1], [0.1, 0.3, 1.0]])  # red, blue


def _on_background(grey: torch.Tensor, colour: torch.Tensor) -> torch.Tensor:
    """CIFAR10-B-style digits: white strokes over a coloured background (``colour`` indexes ``_BACKGROUNDS``)."""
    return grey + (1 - grey) * _BACKGROUNDS[colour][:, :, None, None]


def _colour_share_per_level(epochs: int) -> list[float]:
    """A 2-level Glow (2 blocks per level, width 16) trained ``epochs`` epochs (Adam 2e-3, batch 64) on 600 digits
    with random red or blue backgrounds; for 200 other digits, each level's latent of the red copy is replaced in
    turn by the blue copy's, and the share of the red-to-blue change of the decoded background is returned per
    level (0 = the coarse level FlowAug keeps)."""
    from lit_methods.datamodules.digits import load_digits_uint8

    grey = load_digits_uint8()[0].float() / 255
    shuffle = torch.Generator().manual_seed(0)
    train = _on_background(grey[:600], torch.randint(0, 2, (600,), generator=shuffle))
    torch.manual_seed(0)
    flow = build_glow(in_channels=3, image_size=8, num_levels=2, blocks_per_level=2, hidden_channels=16)
    flow.log_prob(train[:64], None)  # ActNorm's data-dependent initialisation
    optimizer = torch.optim.Adam(flow.parameters(), lr=2e-3)
    for _ in range(epochs):
        for idx in torch.randperm(600, generator=shuffle).split(64):
            dequantized = (train[idx] * 255 + torch.rand_like(train[idx])) / 256
            loss = -flow.log_prob(dequantized, None).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    aug = FlowAug(flow=flow, p=1.0)
    held_out = grey[1500:1700]
    background = (held_out < 0.05).float()[:, 0]

    def blueness(images: torch.Tensor) -> float:
        return (((images[:, 2] - images[:, 0]) * background).sum() / background.sum()).item()

    with torch.no_grad():
        red = _on_background(held_out, torch.zeros(200, dtype=torch.long))
        blue = _on_background(held_out, torch.ones(200, dtype=torch.long))
        red_latents, blue_latents = aug.encode(red), aug.encode(blue)
        shares = []
        for level in range(len(red_latents)):
            swapped = list(red_latents)
            swapped[level] = blue_latents[level]
            shares.append((blueness(aug.decode(swapped)) - blueness(red)) / (blueness(blue) - blueness(red)))
    return shares


@pytest.mark.slow
def test_a_trained_glow_puts_the_background_colour_in_the_coarse_level_that_flowaug_keeps():
    """Which Glow level carries the background colour (the issue's question), on CIFAR10-B-style red/blue-background
    digits: after training, swapping the coarse latent (level 0) between a red and a blue copy of a digit moves
    the decoded background >= 80% of the way to blue, swapping the fine latent (the one FlowAug redraws) < 20%.
    Measured (seed 0): untrained 0.52 / 0.48 (so the test fails for the untrained flow, checked), 4 epochs
    0.91 / 0.09; 10 epochs of a 4-block, width-32 Glow 0.98 / 0.02 (3 levels: 0.94 / 0.01 / 0.05).

    Consequence, measured and NOT asserted: FlowAug cannot repaint the background of such images, and it did not
    lower MacroStd. Digits with red/blue backgrounds correlated with the class in training (classes 0-4 red,
    5-9 blue, 95%) and independent at test (597 test digits, subgroup = colour), ConvNet-2 width 16, 10 epochs,
    seeds 0-2: plain MacroStd 0.067/0.120/0.106 vs FlowAug (2-level Glow, fine level redrawn at T = 1, p = 0.5)
    0.064/0.100/0.112; with a 3-level Glow and both finer levels redrawn 0.242/0.152/0.186 (accuracy 0.73-0.83 vs
    0.87-0.92). Redrawing only the fine levels leaves the colour in place; the paper's claim is not reproduced here."""
    torch.set_num_threads(1)
    shares = _colour_share_per_level(epochs=4)
    print(f"share of the background colour change per level (coarse first): {[round(s, 3) for s in shares]}")
    assert shares[0] > 0.8 and shares[1] < 0.2, shares
