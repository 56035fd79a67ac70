"""The latent variant: a first-stage AutoencoderKL trained by FirstStageAutoencoder, read from its checkpoint by
Diffusion(latent=True), which diffuses in its scaled latent space and decodes samples to images."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lit_methods.datamodules import DigitsDataModule
from lit_methods.datamodules.digits import load_digits_uint8
from lit_methods.diffusion import Diffusion, FirstStageAutoencoder, KLAutoencoder, MLPDenoiser

PIXELS = {"mean": (0.3053,), "std": (0.3759,), "inputs_normalized": False}


def fit(model: L.LightningModule, root, steps: int) -> L.Trainer:
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                        max_steps=steps, limit_val_batches=0)
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=64, normalize=False, crop_padding=0))
    return trainer


@pytest.mark.slow
def test_latent_diffusion_from_a_first_stage_checkpoint(tmp_path):
    """The first stage's reconstruction error falls while it trains; its weights load into the diffusion model's
    frozen autoencoder (equal tensors), the latent scale is set from the first batch and kept in the state dict, and
    samples decode to 8x8 images."""
    torch.manual_seed(0)
    first_stage = FirstStageAutoencoder(in_channels=1, autoencoder_channels=(8, 16), latent_channels=2, lr=3e-3,
                                        **PIXELS)
    batch = load_digits_uint8()[0][:64].float() / 255
    torch.manual_seed(1)
    before = float(first_stage.loss(batch)[0])
    trainer = fit(first_stage, tmp_path, 8)
    torch.manual_seed(1)
    after = float(first_stage.loss(batch)[0])
    assert after < before
    checkpoint = tmp_path / "first_stage.ckpt"
    trainer.save_checkpoint(checkpoint)

    model = Diffusion(MLPDenoiser(2, 4, None, hidden=32, depth=1), in_channels=1, image_size=8, latent=True,
                      autoencoder=KLAutoencoder(1, (8, 16), 2), autoencoder_checkpoint=str(checkpoint),
                      sampling_steps=5, **PIXELS)
    assert model.space_shape == (2, 4, 4)
    for name, value in first_stage.autoencoder.state_dict().items():
        assert torch.equal(model.autoencoder.state_dict()[name], value), name
    fit(model, tmp_path, 2)
    scale = float(model.latent_scale)
    assert scale > 0 and model.state_dict()["latent_scale"] == scale
    assert not any(p.requires_grad for p in model.autoencoder.parameters())
    samples = model.sample(4)
    assert samples.shape == (4, 1, 8, 8) and 0 <= samples.min() and samples.max() <= 1


def test_latent_without_an_autoencoder_is_refused():
    with pytest.raises(ValueError, match="autoencoder=None"):
        Diffusion(MLPDenoiser(1, 8), in_channels=1, image_size=8, latent=True, **PIXELS)
    with pytest.raises(ValueError, match="latent=True"):
        Diffusion(MLPDenoiser(1, 8), in_channels=1, image_size=8, autoencoder=KLAutoencoder(1, (8, 16), 2),
                  **PIXELS)
