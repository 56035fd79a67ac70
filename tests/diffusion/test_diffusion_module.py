"""The Diffusion module: label dropout, EMA, bad input, sample grids, offline FID and, on real digits, the training
loss and classifier-free guidance's effect on class identity."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import scipy.linalg
import torch
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.image.fid import FrechetInceptionDistance

from lit_methods.datamodules import DigitsDataModule
from lit_methods.datamodules.digits import load_digits_uint8
from lit_methods.diffusion import ClassifierFeatures, Diffusion, MLPDenoiser, PNDMSampler, TimeShiftSampler
from lit_methods.nets import ConvNet

DIGITS = {"in_channels": 1, "image_size": 8, "num_classes": 10, "mean": (0.3053,), "std": (0.3759,),
          "inputs_normalized": False}


def mlp_diffusion(conditional: bool = True, **kwargs) -> Diffusion:
    denoiser = MLPDenoiser(1, 8, 11 if conditional else None, hidden=128, depth=2)
    return Diffusion(denoiser, conditional=conditional, **{**DIGITS, **kwargs})


def quiet_trainer(root: Path, **kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=root, **kwargs)


class LossRecorder(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Diffusion, list[float]]:
    """A class-conditional MLP diffusion model trained 250 steps on digits (batch 128, Adam 3e-3, EMA 0.99)."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = mlp_diffusion(ema_decay=0.99, lr=3e-3, sampling_steps=20)
    recorder = LossRecorder()
    trainer = quiet_trainer(tmp_path_factory.mktemp("trained"), max_steps=250, limit_val_batches=0,
                            callbacks=[recorder])
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=128, normalize=False, crop_padding=0))
    return model, recorder.losses


@pytest.mark.slow
def test_training_lowers_the_loss_by_more_than_30_percent(trained):
    """Mean loss of the last 50 steps vs the first 20 (0.88 -> 0.15 when written); lr=1e-9 (no training) fails."""
    _, losses = trained
    assert np.mean(losses[-50:]) < 0.7 * np.mean(losses[:20])


@pytest.mark.slow
def test_guidance_makes_samples_more_recognisable_as_their_class(trained):
    """A 5-nearest-neighbour classifier of the real digits classifies 200 samples (20 per class) as their class more
    often at w=3 than at w=0; an untrained model fails (all near chance)."""
    from sklearn.neighbors import KNeighborsClassifier

    model, _ = trained
    images, labels = load_digits_uint8()
    judge = KNeighborsClassifier(5).fit(images.flatten(1).numpy() / 255.0, labels.numpy())
    wanted = torch.arange(200) % 10

    def accuracy(guidance: float) -> float:
        samples = model.sample(200, labels=wanted, guidance=guidance)
        return float((judge.predict(samples.flatten(1).numpy()) == wanted.numpy()).mean())

    unguided, guided = accuracy(0.0), accuracy(3.0)
    print(f"class accuracy of samples: w=0 {unguided:.3f}, w=3 {guided:.3f}")
    assert guided > unguided + 0.3, (unguided, guided)


@pytest.mark.slow
def test_fid_of_a_checkpoint_through_trainer_test(trained, tmp_path):
    """``trainer.test`` with ClassifierFeatures logs test/fid and writes fid_samples.png; the trained model's FID is
    lower than an untrained one's."""
    model, _ = trained
    features = ClassifierFeatures(ConvNet(num_classes=10, in_channels=1, image_size=8, depth=2, width=16),
                                  image_size=(8, 8), mean=(0.3053,), std=(0.3759,))
    fids = []
    for candidate in (model, mlp_diffusion(sampling_steps=20)):
        candidate.fid = FrechetInceptionDistance(feature=features, normalize=True)
        trainer = quiet_trainer(tmp_path)
        (metrics,) = trainer.test(candidate, datamodule=DigitsDataModule(batch_size=128, normalize=False),
                                  verbose=False)
        fids.append(metrics["test/fid"])
    assert (tmp_path / "fid_samples.png").is_file()
    assert fids[0] < fids[1], fids
    model.fid = None


def test_label_dropout_rate_is_within_3_sigma():
    model = mlp_diffusion(label_dropout=0.1)
    _, _, keep = model.training_draws((10_000, 1, 8, 8), torch.device("cpu"))
    dropped = float((~keep).float().mean())
    assert abs(dropped - 0.1) < 3 * (0.1 * 0.9 / 10_000) ** 0.5


def test_training_draws_follow_the_step_not_the_call():
    model = mlp_diffusion()
    first, again, other = (model.training_draws((8, 1, 8, 8), torch.device("cpu"), seed) for seed in (4, 4, 6))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[1], other[1])


def test_ema_update_and_state_dict():
    """The EMA weights (in the state dict, hence the checkpoint) move towards the trained ones with the ramped decay
    min(0.999, (1 + 0) / (10 + 0)) = 0.1 at step 0."""
    model = mlp_diffusion(ema_decay=0.999)
    assert any(key.startswith("ema_unet.") for key in model.state_dict())
    before = [p.clone() for p in model.ema_unet.parameters()]
    with torch.no_grad():
        for p in model.unet.parameters():
            p.add_(1.0)
    model.on_train_batch_end(None, None, 0)
    for old, new, trained in zip(before, model.ema_unet.parameters(), model.unet.parameters()):
        torch.testing.assert_close(new, old + 0.9 * (trained - old))
    assert not any(p.requires_grad for p in model.ema_unet.parameters())


def test_configured_samplers_are_built():
    assert isinstance(mlp_diffusion(sampler="f-pndm", sampling_steps=10).sampler, PNDMSampler)
    shifted = mlp_diffusion(sampler="ddpm", sampling_steps=10, time_shift_window=5).sampler
    assert isinstance(shifted, TimeShiftSampler) and shifted.base.name == "ddpm"


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="guidance=3.0"):
        mlp_diffusion(conditional=False, guidance=3.0)
    with pytest.raises(ValueError, match="'sigmoid'"):
        mlp_diffusion(beta_schedule="sigmoid")
    with pytest.raises(ValueError, match="steps=1001"):
        mlp_diffusion(sampling_steps=1001)
    with pytest.raises(ValueError, match="'euler'"):
        mlp_diffusion(sampler="euler")
    with pytest.raises(ValueError, match="autoencoder=None"):
        mlp_diffusion(latent=True)
    with pytest.raises(ValueError, match="'f-pndm'"):
        mlp_diffusion(sampler="f-pndm", time_shift_window=5)
    with pytest.raises(ValueError, match="normalize=False"):
        mlp_diffusion(inputs_normalized=True)


def test_predict_writes_a_sample_grid(tmp_path):
    model = mlp_diffusion(sampling_steps=5, num_grid_samples=16)
    loader = DataLoader(TensorDataset(torch.zeros(20, 1, 8, 8), torch.arange(20) % 10), batch_size=20)
    (images,) = quiet_trainer(tmp_path).predict(model, loader)
    assert images.shape == (20, 1, 8, 8) and 0 <= images.min() and images.max() <= 1
    assert (tmp_path / "predict_batch=0.png").is_file()


def test_classifier_features_fid_matches_the_formula_and_orders_real_and_noise():
    """torchmetrics' FID on ClassifierFeatures equals ||mu1 - mu2||^2 + Tr(C1 + C2 - 2 sqrtm(C1 C2)) computed with
    scipy on the same features; two halves of the real digits are far closer than real digits and noise."""
    torch.manual_seed(0)
    features = ClassifierFeatures(ConvNet(num_classes=10, in_channels=1, image_size=8, depth=2, width=16),
                                  image_size=(8, 8), mean=(0.3053,), std=(0.3759,))
    images = load_digits_uint8()[0].float() / 255
    half_a, half_b = images[0::2], images[1::2]
    noise = torch.rand_like(half_b)

    def fid(real, fake):
        metric = FrechetInceptionDistance(feature=features, normalize=True)
        metric.update(real, real=True)
        metric.update(fake, real=False)
        return float(metric.compute())

    a, b = features(half_a).double().numpy(), features(half_b).double().numpy()
    covariance_product = scipy.linalg.sqrtm(np.cov(a, rowvar=False) @ np.cov(b, rowvar=False)).real
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(np.cov(a, rowvar=False) + np.cov(b, rowvar=False)
                                                              - 2 * covariance_product)
    assert fid(half_a, half_b) == pytest.approx(expected, rel=1e-3, abs=1e-4)
    assert fid(half_a, half_b) < 0.2 * fid(half_a, noise)
