"""The diffusion LightningModule: epsilon-prediction DDPM training with EMA, classifier-free guidance by label dropout,
an optional latent space, and sampling with our DDPM/DDIM/PNDM/time-shift samplers.

Shah, Gromis & Pinto, "Enhancing Diffusion Models for High-Quality Image Generation", arXiv:2412.14422 (DDPM,
Ho et al. arXiv:2006.11239; DDIM, Song et al. arXiv:2010.02502; classifier-free guidance, Ho & Salimans
arXiv:2207.12598; latent diffusion, Rombach et al. arXiv:2112.10752). The report has no public code: the recipe is the
standard one (the card's defaults), with diffusers' ``UNet2DModel`` as the default noise predictor.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.loggers import WandbLogger
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.image.fid import FrechetInceptionDistance
from torchvision.utils import make_grid, save_image

from lit_methods.base import MethodBase, drop_object_hyperparameters, load_pretrained_weights, read_checkpoint
from lit_methods.datamodules.batch import as_batch
from lit_methods.diffusion.pndm import PNDMSampler
from lit_methods.diffusion.samplers import DDIMSampler, DDPMSampler, EpsFn, check_sampling_steps, guided_eps_fn
from lit_methods.diffusion.schedules import BETA_SCHEDULES, make_alphas_cumprod
from lit_methods.diffusion.time_shift import TimeShiftSampler

__all__ = ["SAMPLERS", "SAMPLING_ARGUMENTS", "Diffusion", "make_sampler", "tiny_unet"]

SAMPLERS = ("ddpm", "ddim", "f-pndm", "s-pndm")
#: arguments that say how to sample and evaluate, not what was trained: left out of the checkpoint's hyper-parameters
SAMPLING_ARGUMENTS = ("sampler", "sampling_steps", "eta", "guidance", "time_shift_window", "time_shift_cutoff",
                      "num_grid_samples", "fid_features", "fid_num_samples", "sample_seed")
Sampler = DDPMSampler | DDIMSampler | PNDMSampler | TimeShiftSampler


def make_sampler(name: str, alphas_cumprod: Tensor, steps: int, eta: float = 0.0,
                 time_shift_window: int | None = None, time_shift_cutoff: int = 300) -> Sampler:
    """One of :data:`SAMPLERS` on ``alphas_cumprod``, wrapped by the time shift when ``time_shift_window`` is set
    (DDPM and DDIM only)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {SAMPLERS}")
    check_sampling_steps(steps, len(alphas_cumprod))
    if name in ("f-pndm", "s-pndm"):
        if time_shift_window is not None:
            raise ValueError(f"the time shift wraps the ddpm and ddim samplers, got sampler={name!r}")
        return PNDMSampler(alphas_cumprod, steps, method=name)
    base = DDPMSampler(alphas_cumprod, steps) if name == "ddpm" else DDIMSampler(alphas_cumprod, steps, eta=eta)
    if time_shift_window is None:
        return base
    return TimeShiftSampler(base, time_shift_window, time_shift_cutoff)


def tiny_unet(in_channels: int, image_size: int, channels: Sequence[int], layers_per_block: int, attention: bool,
              dropout: float, num_class_embeds: int | None) -> nn.Module:
    """A diffusers ``UNet2DModel`` with one resolution level per entry of ``channels`` (attention at the lowest
    resolution when ``attention``)."""
    from diffusers import UNet2DModel

    levels = len(channels)
    down = ["DownBlock2D"] * levels
    up = ["UpBlock2D"] * levels
    if attention:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    groups = min(32, min(channels))
    return UNet2DModel(sample_size=image_size, in_channels=in_channels, out_channels=in_channels,
                       block_out_channels=tuple(channels), layers_per_block=layers_per_block, down_block_types=tuple(down),
                       up_block_types=tuple(up), norm_num_groups=groups, dropout=dropout,
                       num_class_embeds=num_class_embeds)


class Diffusion(MethodBase):
    """Train a noise predictor eps_theta(x_t, t[, c]) with MSE to the added noise; sample with our samplers.

    Pixels arrive in [0, 1] (datamodule ``normalize: false``) and are scaled to [-1, 1]; in the latent variant they
    are encoded by a frozen first-stage autoencoder (``autoencoder``, e.g. diffusers' ``AutoencoderKL``, with weights
    from ``autoencoder_checkpoint``, e.g. a :class:`~lit_methods.diffusion.FirstStageAutoencoder` run) and scaled by
    ``latent_scale`` (default 1/std of the first training batch's latents, kept in the checkpoint). The random draws
    of a step (timesteps, noise, dropped labels) come from a generator seeded by ``noise_seed`` and the global step,
    drawn for the global batch and sliced per rank: a 2-process DDP step equals one process on the concatenated
    batch, and a resumed run draws what the uninterrupted one would.

    Sampling (validation grids, ``predict``, FID in ``test``) uses the EMA weights with ``sampler`` at
    ``sampling_steps``. ``lit-methods test --ckpt_path ... --model.fid_features ...`` computes FID of the checkpoint's
    samples against the test split; ``lit-methods predict`` writes sample grids. The sampling and evaluation
    arguments (:data:`SAMPLING_ARGUMENTS`) are not saved with the checkpoint's hyper-parameters: Lightning's CLI
    replaces the config and command-line values of a run given ``--ckpt_path`` by the checkpoint's, which would
    evaluate every checkpoint with its training-time sampler and without FID features. Pass them again to
    ``Diffusion.load_from_checkpoint`` (their defaults otherwise).

    Args:
        unet: the noise predictor ``unet(x, t[, class_labels])`` returning eps (or an object with ``.sample``, as
            diffusers' ``UNet2DModel``); default: :func:`tiny_unet` with the ``unet_*`` arguments.
        in_channels: image channels (filled from the datamodule).
        image_size: image height and width (filled from the datamodule).
        num_classes: classes of the data (filled from the datamodule); used when ``conditional``.
        unet_channels: channels per resolution of the default UNet.
        unet_layers_per_block: residual blocks per resolution of the default UNet.
        unet_attention: self-attention at the lowest resolution of the default UNet.
        unet_dropout: dropout of the default UNet.
        num_timesteps: T of the forward process.
        beta_schedule: ``"linear"``, ``"scaled_linear"`` or ``"cosine"``.
        beta_start: first beta of the linear schedules.
        beta_end: last beta of the linear schedules.
        conditional: class-conditional training (class embedding with a null class ``num_classes`` for guidance).
        label_dropout: probability of replacing a label by the null class in training (classifier-free guidance).
        ema_decay: decay of the EMA weights used for sampling (``None``: sample with the trained weights); ramped up as
            min(decay, (1 + n)/(10 + n)) over the first steps.
        latent: diffuse in the latent space of ``autoencoder``.
        autoencoder: the first-stage autoencoder (``encode(x).latent_dist`` and ``decode(z).sample`` as diffusers'
            ``AutoencoderKL``); frozen.
        autoencoder_checkpoint: weights of ``autoencoder`` (a checkpoint of ``FirstStageAutoencoder``, keys
            ``autoencoder.*``, or a state dict).
        latent_scale: latents are multiplied by it (``None``: 1/std of the first training batch's latents).
        sampler: ``"ddpm"``, ``"ddim"``, ``"f-pndm"`` or ``"s-pndm"``.
        sampling_steps: steps of the sampler (<= ``num_timesteps``).
        eta: DDIM's stochasticity.
        guidance: classifier-free guidance weight w (eps_u + w (eps_c - eps_u)); ``None``: the conditional pass
            alone. Needs ``conditional``.
        time_shift_window: time-shift sampler window (``None``: no time shift); DDPM/DDIM only.
        time_shift_cutoff: time-shift cutoff timestep.
        num_grid_samples: samples in the image grid written at each validation epoch end and per predict batch.
        fid_features: a feature extractor for FID in ``test`` (e.g. :class:`~lit_methods.diffusion.ClassifierFeatures`;
            an int selects torchmetrics' Inception, which needs torch-fidelity and its weights); ``None``: no FID.
        fid_num_samples: generated samples for FID (``None``: as many as real test images).
        noise_seed: seed of the training draws.
        sample_seed: seed of the sampling noise (grids, predict, FID).
        lr: Adam learning rate (2e-4 in DDPM).
        weight_decay: weight decay.
        lr_schedule: LR schedule (default constant).
        warmup_steps: warmup of the cosine schedule.
        optimizer: replaces the default Adam.
        lr_scheduler: replaces ``lr_schedule``.
        mean: unused normalization mean (filled from the datamodule).
        std: unused normalization std (filled from the datamodule).
        inputs_normalized: must be ``False``: the model works on [0, 1] pixels.
    """

    slug: ClassVar[str] = "diffusion"
    requires_pixel_inputs: ClassVar[bool] = True

    def __init__(
        self,
        unet: nn.Module | None = None,
        in_channels: int = 3,
        image_size: int | tuple[int, int] = 32,
        num_classes: int | None = None,
        unet_channels: tuple[int, ...] = (32, 64),
        unet_layers_per_block: int = 1,
        unet_attention: bool = False,
        unet_dropout: float = 0.0,
        num_timesteps: int = 1000,
        beta_schedule: Literal["linear", "scaled_linear", "cosine"] = "linear",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        conditional: bool = False,
        label_dropout: float = 0.1,
        ema_decay: float | None = 0.9999,
        latent: bool = False,
        autoencoder: nn.Module | None = None,
        autoencoder_checkpoint: str | None = None,
        latent_scale: float | None = None,
        sampler: Literal["ddpm", "ddim", "f-pndm", "s-pndm"] = "ddim",
        sampling_steps: int = 50,
        eta: float = 0.0,
        guidance: float | None = None,
        time_shift_window: int | None = None,
        time_shift_cutoff: int = 300,
        num_grid_samples: int = 64,
        fid_features: nn.Module | int | None = None,
        fid_num_samples: int | None = None,
        noise_seed: int = 0,
        sample_seed: int = 0,
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        lr_schedule: Literal["cosine", "onecycle", "constant"] = "constant",
        warmup_steps: int | float = 0,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        inputs_normalized: bool = False,
    ) -> None:
        super().__init__(lr=lr, weight_decay=weight_decay, lr_schedule=lr_schedule, warmup_steps=warmup_steps,
                         optimizer=optimizer, lr_scheduler=lr_scheduler, mean=mean, std=std,
                         inputs_normalized=inputs_normalized)
        self.save_hyperparameters(ignore=list(SAMPLING_ARGUMENTS))
        drop_object_hyperparameters(self)
        if beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"unknown beta_schedule {beta_schedule!r}; choose one of {BETA_SCHEDULES}")
        if conditional and (num_classes is None or num_classes < 1):
            raise ValueError(f"conditional=True needs the data's num_classes, got num_classes={num_classes}")
        if not 0.0 <= label_dropout < 1.0:
            raise ValueError(f"label_dropout must lie in [0, 1), got {label_dropout}")
        if guidance is not None and not conditional:
            raise ValueError(f"guidance={guidance} needs a class-conditional model (conditional=True)")
        if ema_decay is not None and not 0.0 < ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in (0, 1) or be None, got {ema_decay}")
        if latent and autoencoder is None:
            raise ValueError("latent=True needs a first-stage autoencoder (autoencoder=...), got autoencoder=None")
        if not latent and (autoencoder is not None or autoencoder_checkpoint is not None):
            raise ValueError(f"an autoencoder (checkpoint {autoencoder_checkpoint!r}) is only used with latent=True")
        if latent_scale is not None and latent_scale <= 0:
            raise ValueError(f"latent_scale must be > 0, got {latent_scale}")
        if num_grid_samples < 1:
            raise ValueError(f"num_grid_samples must be >= 1, got {num_grid_samples}")
        size = image_size if isinstance(image_size, int) else image_size[0]
        self.num_classes = num_classes
        self.conditional = conditional
        self.label_dropout = label_dropout
        self.num_timesteps = num_timesteps
        self.register_buffer("alphas_cumprod", make_alphas_cumprod(beta_schedule, num_timesteps, beta_start,
                                                                   beta_end), persistent=False)
        self.sampler = make_sampler(sampler, self.alphas_cumprod, sampling_steps, eta, time_shift_window,
                                    time_shift_cutoff)
        self.guidance = guidance
        self.ema_decay = ema_decay
        self.noise_seed = noise_seed
        self.sample_seed = sample_seed
        self.num_grid_samples = num_grid_samples
        self.fid_num_samples = fid_num_samples
        self.image_shape = (in_channels, size, size)

        self.latent = latent
        self.autoencoder = None
        if autoencoder is not None:
            if autoencoder_checkpoint is not None:
                load_pretrained_weights(autoencoder, autoencoder_checkpoint, _autoencoder_key_map(autoencoder_checkpoint))
            self.autoencoder = autoencoder.eval().requires_grad_(False)
            with torch.no_grad():
                in_channels, size = self._latent_shape(in_channels, size)
        self.register_buffer("latent_scale", torch.tensor(latent_scale if latent_scale is not None else 0.0))
        self.space_shape = (in_channels, size, size)

        class_embeds = num_classes + 1 if conditional else None
        if unet is None:
            unet = tiny_unet(in_channels, size, unet_channels, unet_layers_per_block, unet_attention, unet_dropout,
                             class_embeds)
        self.unet = unet
        self.ema_unet = copy.deepcopy(unet).requires_grad_(False) if ema_decay is not None else None
        self.fid = None
        if fid_features is not None:
            self.fid = FrechetInceptionDistance(feature=fid_features, normalize=True, reset_real_features=True)
        self.val_loss = MeanMetric()
        self._test_real = 0

    # -- spaces ------------------------------------------------------------------------------------------------------
    def _latent_shape(self, channels: int, size: int) -> tuple[int, int]:
        latents = self.autoencoder.encode(torch.zeros(1, channels, size, size)).latent_dist.mean
        return latents.shape[1], latents.shape[-1]

    def encode(self, images: Tensor) -> Tensor:
        """[0, 1] pixels -> the diffusion space ([-1, 1] pixels, or scaled latents)."""
        x = images * 2 - 1
        if not self.latent:
            return x
        with torch.no_grad():
            latents = self.autoencoder.encode(x).latent_dist.mean
        if self.latent_scale == 0:
            scale = 1 / latents.float().std().clamp(min=1e-8)
            if dist.is_available() and dist.is_initialized():
                dist.broadcast(scale, 0)
            self.latent_scale.fill_(scale)
        return latents * self.latent_scale

    def decode(self, x: Tensor) -> Tensor:
        """The diffusion space -> [0, 1] pixels (clamped)."""
        if self.latent:
            x = self.autoencoder.decode(x / self.latent_scale).sample
        return ((x + 1) / 2).clamp(0, 1)

    # -- the noise predictor -----------------------------------------------------------------------------------------
    def predict_eps(self, unet: nn.Module, x: Tensor, t: Tensor, labels: Tensor | None) -> Tensor:
        out = unet(x, t, class_labels=labels) if labels is not None else unet(x, t)
        return getattr(out, "sample", out)

    @property
    def null_label(self) -> int:
        """The class index of the unconditional pass (a dedicated embedding row, never a real class)."""
        return int(self.num_classes)

    def drop_labels(self, labels: Tensor, keep: Tensor) -> Tensor:
        return torch.where(keep, labels, torch.full_like(labels, self.null_label))

    def training_draws(self, shape: Sequence[int], device: torch.device, seed_offset: int = 0,
                       ) -> tuple[Tensor, Tensor, Tensor]:
        """Timesteps, noise and label-keep mask of this rank's part of the global batch (see the class doc)."""
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() \
            else (0, 1)
        generator = torch.Generator().manual_seed(self.noise_seed * 1_000_003 + seed_offset)
        n = shape[0]
        t = torch.randint(0, self.num_timesteps, (n * world,), generator=generator)
        noise = torch.randn((n * world, *shape[1:]), generator=generator)
        keep = torch.rand(n * world, generator=generator) >= self.label_dropout
        part = slice(rank * n, (rank + 1) * n)
        return t[part].to(device), noise[part].to(device), keep[part].to(device)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps (per-sample ``t``)."""
        alpha = self.alphas_cumprod[t].to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
        return alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise

    def diffusion_loss(self, images: Tensor, labels: Tensor | None, seed_offset: int, drop: bool) -> Tensor:
        x0 = self.encode(images)
        t, noise, keep = self.training_draws(x0.shape, x0.device, seed_offset)
        noise = noise.to(x0.dtype)
        x_t = self.add_noise(x0, noise, t)
        if self.conditional:
            labels = self.drop_labels(labels, keep) if drop else labels
        else:
            labels = None
        return F.mse_loss(self.predict_eps(self.unet, x_t, t, labels), noise)

    # -- training ----------------------------------------------------------------------------------------------------
    def make_default_optimizer(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        """Adam with ``lr`` (DDPM's optimizer)."""
        return torch.optim.Adam(groups, lr=self.lr)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        batch = as_batch(batch)
        loss = self.diffusion_loss(batch["inputs"], batch.get("targets"), 2 * self.global_step, drop=True)
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.ema_unet is None:
            return
        n = self.global_step
        decay = min(self.ema_decay, (1 + n) / (10 + n))
        with torch.no_grad():
            ema, trained = list(self.ema_unet.parameters()), list(self.unet.parameters())
            torch._foreach_lerp_(ema, trained, 1 - decay)
            for ema_buffer, buffer in zip(self.ema_unet.buffers(), self.unet.buffers()):
                ema_buffer.copy_(buffer)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        batch = as_batch(batch)
        loss = self.diffusion_loss(batch["inputs"], batch.get("targets"), -1 - batch_idx, drop=False)
        self.val_loss.update(loss, weight=len(batch["inputs"]))
        self.log("val/loss", self.val_loss, on_step=False, on_epoch=True, prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        self.write_grid(self.sample(self.num_grid_samples), f"samples_epoch={self.current_epoch}")

    # -- sampling ----------------------------------------------------------------------------------------------------
    def grid_labels(self, num_samples: int) -> Tensor | None:
        """Labels cycling through the classes (conditional models), else ``None``."""
        if not self.conditional:
            return None
        return torch.arange(num_samples, device=self.device) % self.num_classes

    def eps_fn(self, labels: Tensor | None, guidance: float | None) -> EpsFn:
        unet = self.ema_unet if self.ema_unet is not None else self.unet
        if labels is None or guidance is None:
            return lambda x, t: self.predict_eps(unet, x, t, labels)
        return guided_eps_fn(lambda x, t, c: self.predict_eps(unet, x, t, c), labels, self.null_label, guidance)

    @torch.no_grad()
    def sample(self, num_samples: int, labels: Tensor | None = None, guidance: float | None = None,
               sampler: Sampler | None = None, generator: torch.Generator | None = None) -> Tensor:
        """``num_samples`` images in [0, 1] from the EMA weights (class ``labels``, by default cycling through the
        classes; ``guidance`` and ``sampler`` default to the module's)."""
        if labels is None:
            labels = self.grid_labels(num_samples)
        elif not self.conditional:
            raise ValueError("labels were given, but the model is not class-conditional (conditional=False)")
        guidance = self.guidance if guidance is None else guidance
        if guidance is not None and not self.conditional:
            raise ValueError(f"guidance={guidance} needs a class-conditional model (conditional=True)")
        if generator is None:
            generator = torch.Generator(self.device).manual_seed(self.sample_seed)
        was_training = self.training
        self.eval()
        try:
            x = torch.randn((num_samples, *self.space_shape), generator=generator, device=self.device)
            x = (sampler or self.sampler).sample(self.eps_fn(labels, guidance), x, generator)
            return self.decode(x)
        finally:
            self.train(was_training)

    def run_dir(self) -> str | None:
        """Where pictures go: the trainer's log dir (None without a trainer)."""
        trainer = self._trainer
        if trainer is None:
            return None
        return trainer.log_dir or trainer.default_root_dir

    def write_grid(self, images: Tensor, name: str) -> str | None:
        """Save ``images`` as a PNG grid next to the logs (and to wandb with a ``WandbLogger``); returns its path."""
        directory = self.run_dir()
        if directory is None or not self.trainer.is_global_zero:
            return None
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, f"{name}.png")
        images = images.float().cpu()
        if images.shape[-1] < 32:  # tiny images (8x8 digits) are enlarged to be seen
            images = F.interpolate(images, scale_factor=32 // images.shape[-1], mode="nearest")
        grid = make_grid(images, nrow=max(1, int(len(images) ** 0.5)), padding=2)
        save_image(grid, path)
        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="samples", images=[grid], caption=[name], step=self.global_step)
        return path

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """Samples for the batch's labels (conditional) or as many as the batch holds; the grid is written."""
        batch = as_batch(batch)
        labels = batch.get("targets") if self.conditional else None
        generator = torch.Generator(self.device).manual_seed(self.sample_seed + batch_idx)
        images = self.sample(len(batch["inputs"]), labels=labels, generator=generator)
        self.write_grid(images[: self.num_grid_samples], f"predict_batch={batch_idx}")
        return images

    # -- FID -----------------------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The FID feature extractor is not saved: its weights come from its own checkpoint (``fid_features``)."""
        super().on_save_checkpoint(checkpoint)
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("fid.")}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A checkpoint holds no FID extractor (see :meth:`on_save_checkpoint`): this run's own ``fid_features``
        are kept, so a checkpoint trained without FID can be evaluated with it."""
        super().on_load_checkpoint(checkpoint)
        state = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("fid.")}
        if self.fid is not None:
            state.update({f"fid.{k}": v for k, v in self.fid.state_dict().items()})
        checkpoint["state_dict"] = state

    def on_test_epoch_start(self) -> None:
        self._test_real = 0

    def test_step(self, batch: Any, batch_idx: int) -> None:
        batch = as_batch(batch)
        loss = self.diffusion_loss(batch["inputs"], batch.get("targets"), -1 - batch_idx, drop=False)
        self.log("test/loss", loss, on_step=False, on_epoch=True, batch_size=len(batch["inputs"]))
        if self.fid is not None:
            self.fid.update(batch["inputs"], real=True)
            self._test_real += len(batch["inputs"])

    def on_test_epoch_end(self) -> None:
        if self.fid is None:
            return
        total = self.fid_num_samples or self._test_real
        rank, world = self.global_rank, self.trainer.world_size
        mine = total // world + (rank < total % world)
        generator = torch.Generator(self.device).manual_seed(self.sample_seed + 7919 * rank)
        done = 0
        while done < mine:
            n = min(256, mine - done)
            labels = (torch.arange(done, done + n, device=self.device) * world + rank) % self.num_classes \
                if self.conditional else None
            images = self.sample(n, labels=labels, generator=generator)
            self.fid.update(images, real=False)
            if done == 0:
                self.write_grid(images[: self.num_grid_samples], "fid_samples")
            done += n
        self.log("test/fid", self.fid.compute(), sync_dist=False)
        self.fid.reset()


def _autoencoder_key_map(checkpoint: str) -> dict[str, str]:
    """A FirstStageAutoencoder checkpoint holds ``autoencoder.*`` keys; a plain state dict its keys as they are."""
    weights = read_checkpoint(checkpoint)
    keys = weights.get("state_dict", weights)
    return {"autoencoder.": ""} if any(k.startswith("autoencoder.") for k in keys) else {"": ""}
