"""A small MLP noise predictor for tiny images (8x8 digits on a CPU), with the call signature of diffusers'
``UNet2DModel``: ``denoiser(x, t, class_labels=None)``."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["MLPDenoiser", "timestep_embedding"]


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of the timesteps ``t`` (Vaswani et al.; as DDPM's), ``(N, dim)``."""
    half = dim // 2
    frequencies = torch.exp(-math.log(10_000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * frequencies[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class MLPDenoiser(nn.Module):
    """eps(x, t, c): the flattened image, the timestep embedding and a class embedding through SiLU MLP blocks with
    residual connections.

    Args:
        in_channels: image channels.
        image_size: image height and width (an int for square images).
        num_class_embeds: class embedding rows (classes + the null class) or ``None`` (unconditional).
        hidden: width of the hidden layers.
        depth: residual blocks.
    """

    def __init__(self, in_channels: int = 1, image_size: int | tuple[int, int] = 8, num_class_embeds: int | None = None,
                 hidden: int = 256, depth: int = 3) -> None:
        super().__init__()
        if hidden < 2 or depth < 1:
            raise ValueError(f"hidden must be >= 2 and depth >= 1, got hidden={hidden}, depth={depth}")
        height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
        self.shape = (in_channels, height, width)
        dims = in_channels * height * width
        self.hidden = hidden
        self.inp = nn.Linear(dims, hidden)
        self.time = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.class_embedding = nn.Embedding(num_class_embeds, hidden) if num_class_embeds else None
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
            for _ in range(depth)
        )
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, dims))

    def forward(self, x: Tensor, t: Tensor, class_labels: Tensor | None = None) -> Tensor:
        if (class_labels is None) != (self.class_embedding is None):
            raise ValueError("class_labels must be given exactly when the denoiser has num_class_embeds")
        embedding = self.time(timestep_embedding(t, self.hidden))
        if class_labels is not None:
            embedding = embedding + self.class_embedding(class_labels)
        h = self.inp(x.flatten(1)) + embedding
        for block in self.blocks:
            h = h + block(h)
        return self.out(h).view(-1, *self.shape)
