"""Diffusion models: the noise-prediction module and its samplers (DDPM, DDIM, PNDM, time-shift)."""
