"""The first stage of latent diffusion (Rombach et al., arXiv:2112.10752): a KL-regularized autoencoder trained to
reconstruct the images; its checkpoint is read by :class:`~lit_methods.diffusion.Diffusion` with ``latent=True``."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lit_methods.base import MethodBase, drop_object_hyperparameters
from lit_methods.datamodules.batch import as_batch

__all__ = ["FirstStageAutoencoder", "KLAutoencoder"]


class KLAutoencoder(nn.Module):
    """A diffusers ``AutoencoderKL`` with typed arguments (so configs can give it): downsampling by 2 per level after
    the first (``len(channels) - 1`` times), one block per level, no attention; ``encode``/``decode`` as diffusers'.

    Args:
        in_channels: image channels (filled from the datamodule).
        channels: channels per level.
        latent_channels: channels of the latents.
    """

    def __init__(self, in_channels: int = 3, channels: tuple[int, ...] = (32, 64), latent_channels: int = 4) -> None:
        super().__init__()
        from diffusers import AutoencoderKL

        levels = len(channels)
        self.vae = AutoencoderKL(in_channels=in_channels, out_channels=in_channels, block_out_channels=tuple(channels),
                                 down_block_types=("DownEncoderBlock2D",) * levels,
                                 up_block_types=("UpDecoderBlock2D",) * levels, layers_per_block=1,
                                 latent_channels=latent_channels, norm_num_groups=min(32, min(channels)),
                                 mid_block_add_attention=False)

    def encode(self, x: Tensor) -> Any:
        return self.vae.encode(x)

    def decode(self, z: Tensor) -> Any:
        return self.vae.decode(z)


class FirstStageAutoencoder(MethodBase):
    """Train ``autoencoder`` (diffusers' ``AutoencoderKL`` interface) on [0, 1] images scaled to [-1, 1]: the
    reconstruction MSE of a posterior sample plus ``kl_weight`` times the KL to N(0, I) (per element). The
    perceptual and adversarial losses of the paper's first stage are left out (tiny images).

    Args:
        autoencoder: the autoencoder; default :class:`KLAutoencoder` with the ``autoencoder_*`` arguments.
        in_channels: image channels (filled from the datamodule).
        autoencoder_channels: channels per level of the default autoencoder.
        latent_channels: latent channels of the default autoencoder.
        kl_weight: weight of the KL term (1e-6 in latent diffusion's KL-f models).
        lr: Adam learning rate.
        weight_decay: weight decay.
        lr_schedule: LR schedule.
        optimizer: replaces the default Adam.
        lr_scheduler: replaces ``lr_schedule``.
        mean: unused (filled from the datamodule).
        std: unused (filled from the datamodule).
        inputs_normalized: must be ``False`` ([0, 1] pixels).
    """

    slug: ClassVar[str] = "diffusion"
    requires_pixel_inputs: ClassVar[bool] = True

    def __init__(
        self,
        autoencoder: nn.Module | None = None,
        in_channels: int = 3,
        autoencoder_channels: tuple[int, ...] = (32, 64),
        latent_channels: int = 4,
        kl_weight: float = 1e-6,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        lr_schedule: Literal["cosine", "onecycle", "constant"] = "constant",
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        inputs_normalized: bool = False,
    ) -> None:
        super().__init__(lr=lr, weight_decay=weight_decay, lr_schedule=lr_schedule, optimizer=optimizer,
                         lr_scheduler=lr_scheduler, mean=mean, std=std, inputs_normalized=inputs_normalized)
        self.save_hyperparameters()
        drop_object_hyperparameters(self)
        if kl_weight < 0:
            raise ValueError(f"kl_weight must be >= 0, got {kl_weight}")
        self.autoencoder = autoencoder or KLAutoencoder(in_channels, autoencoder_channels, latent_channels)
        self.kl_weight = kl_weight

    def make_default_optimizer(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        return torch.optim.Adam(groups, lr=self.lr)

    def loss(self, images: Tensor) -> tuple[Tensor, Tensor]:
        x = images * 2 - 1
        posterior = self.autoencoder.encode(x).latent_dist
        reconstruction = self.autoencoder.decode(posterior.sample()).sample
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        return F.mse_loss(reconstruction, x), kl

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        reconstruction, kl = self.loss(as_batch(batch)["inputs"])
        loss = reconstruction + self.kl_weight * kl
        self.log_dict({"train/loss": loss, "train/reconstruction": reconstruction, "train/kl": kl}, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        reconstruction, kl = self.loss(as_batch(batch)["inputs"])
        self.log_dict({"val/reconstruction": reconstruction, "val/kl": kl}, on_epoch=True, prog_bar=True)
