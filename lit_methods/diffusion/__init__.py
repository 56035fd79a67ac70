"""Diffusion models: DDPM/DDIM training and sampling with classifier-free guidance and a latent variant, PNDM's
pseudo numerical samplers and the time-shift sampler."""

from __future__ import annotations

from lit_methods.diffusion.denoisers import MLPDenoiser
from lit_methods.diffusion.first_stage import FirstStageAutoencoder, KLAutoencoder
from lit_methods.diffusion.fid import ClassifierFeatures
from lit_methods.diffusion.module import SAMPLERS, Diffusion, make_sampler, tiny_unet
from lit_methods.diffusion.pndm import PNDMSampler, transfer
from lit_methods.diffusion.samplers import DDIMSampler, DDPMSampler, guided_eps_fn, leading_timesteps
from lit_methods.diffusion.schedules import make_alphas_cumprod, make_betas
from lit_methods.diffusion.time_shift import TimeShiftSampler, select_shifted_timesteps

__all__ = [
    "SAMPLERS",
    "ClassifierFeatures",
    "Diffusion",
    "FirstStageAutoencoder",
    "KLAutoencoder",
    "MLPDenoiser",
    "make_sampler",
    "tiny_unet",
    "DDIMSampler",
    "DDPMSampler",
    "PNDMSampler",
    "TimeShiftSampler",
    "guided_eps_fn",
    "leading_timesteps",
    "make_alphas_cumprod",
    "make_betas",
    "select_shifted_timesteps",
    "transfer",
]
