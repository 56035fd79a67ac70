"""Tensor augmentations of dataset distillation: DSA, FYI's flip doubling and ZCA whitening (plain torch).

DSA: Zhao & Bilen, "Dataset Condensation with Differentiable Siamese Augmentation", arXiv:2102.08259. Every op is a
differentiable function of the images, and all random parameters come from an explicit ``torch.Generator`` (drawn
on the CPU, applied on the images' device), so the real and the synthetic batch of a class get the same op and the
same parameters when they are augmented with generators seeded alike (``siamese=True``: one parameter draw for the
whole batch, as the official code's ``Siamese`` mode, which copies sample 0's parameters to every sample).

FYI: Son et al., "FYI: Flip Your Images for Dataset Distillation", arXiv:2407.08113 (:func:`flip_doubled`).

ZCA: whitening as in the MTT/TESLA code (kornia's ``ZCAWhitening(eps=0.1)``), written with ``torch.linalg.eigh``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_methods.datamodules.fast import random_crop

__all__ = ["DSA", "DSA_OPS", "ZCAWhitening", "flip_doubled"]

DSA_OPS = ("color", "crop", "cutout", "flip", "scale", "rotate")
DEFAULT_STRATEGY = "color_crop_cutout_flip_scale_rotate"
SCALE_RATIO = 1.2
ROTATE_DEGREES = 15.0
CROP_FRACTION = 0.125
CUTOUT_FRACTION = 0.5


def flip_doubled(images: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """FYI's batch augmentation: ``images`` followed by their left-right mirrors, and the labels repeated."""
    doubled = torch.cat([images, images.flip(-1)])
    return doubled, None if labels is None else torch.cat([labels, labels])


class DSA:
    """Differentiable Siamese augmentation, mode 'S': each call applies ONE op group drawn from ``strategy``.

    Groups (official ranges): ``color`` = brightness (+U(-0.5, 0.5)), saturation (x U(0, 2) around the pixel's
    channel mean), contrast (x U(0.5, 1.5) around the image mean); ``crop`` = translation by up to 1/8 of the side
    with zero padding; ``cutout`` = a zeroed square of half the side; ``flip`` = left-right with p = 0.5; ``scale`` =
    independent x/y scale in [1/1.2, 1.2]; ``rotate`` = uniform in [-15, 15] degrees.

    Args:
        strategy: op groups joined by ``_``.
        always_flip: FYI's variant: ``flip`` leaves the random choice and is applied (p = 0.5) before the chosen op.
    """

    def __init__(self, strategy: str = DEFAULT_STRATEGY, always_flip: bool = False) -> None:
        ops = tuple(strategy.split("_")) if strategy else ()
        unknown = [op for op in ops if op not in DSA_OPS]
        if unknown or not ops:
            raise ValueError(f"DSA strategy {strategy!r}: ops must be among {DSA_OPS}, got {list(unknown) or ops}")
        self.strategy = strategy
        self.always_flip = always_flip
        self.choices = tuple(op for op in ops if not (always_flip and op == "flip"))
        if not self.choices:
            raise ValueError(f"DSA strategy {strategy!r} with always_flip leaves no op to choose")

    def __call__(self, images: Tensor, generator: torch.Generator, siamese: bool = True) -> Tensor:
        """Augment ``(N, C, H, W)`` images; with ``siamese`` every image gets the same parameters (one draw)."""
        draws = 1 if siamese else len(images)
        if self.always_flip:
            images = self._flip(images, draws, generator)
        op = self.choices[int(torch.randint(len(self.choices), (1,), generator=generator))]
        return getattr(self, f"_{op}")(images, draws, generator)

    @staticmethod
    def _uniform(draws: int, n: int, generator: torch.Generator, device: torch.device) -> Tensor:
        """``draws`` U(0, 1) values, broadcast to ``n`` rows (siamese: one draw for all)."""
        values = torch.rand(draws, generator=generator).to(device)
        return values.expand(n) if draws == 1 else values

    def _color(self, x: Tensor, draws: int, g: torch.Generator) -> Tensor:
        n, view = len(x), (-1, 1, 1, 1)
        x = x + (self._uniform(draws, n, g, x.device) - 0.5).view(view)
        mean = x.mean(dim=1, keepdim=True)
        x = (x - mean) * (self._uniform(draws, n, g, x.device) * 2.0).view(view) + mean
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return (x - mean) * (self._uniform(draws, n, g, x.device) + 0.5).view(view) + mean

    def _crop(self, x: Tensor, draws: int, g: torch.Generator) -> Tensor:
        n, _, h, w = x.shape
        shift_y, shift_x = int(h * CROP_FRACTION + 0.5), int(w * CROP_FRACTION + 0.5)
        shift = max(shift_y, shift_x)
        dy = torch.randint(shift - shift_y, shift + shift_y + 1, (draws,), generator=g).expand(n)
        dx = torch.randint(shift - shift_x, shift + shift_x + 1, (draws,), generator=g).expand(n)
        if draws > 1:
            dy, dx = dy.clone(), dx.clone()
        return random_crop(x, dy.to(x.device), dx.to(x.device), shift) if shift else x

    def _cutout(self, x: Tensor, draws: int, g: torch.Generator) -> Tensor:
        n, _, h, w = x.shape
        size_y, size_x = int(h * CUTOUT_FRACTION + 0.5), int(w * CUTOUT_FRACTION + 0.5)
        cy = torch.randint(0, h + (1 - size_y % 2), (draws,), generator=g).expand(n).to(x.device)
        cx = torch.randint(0, w + (1 - size_x % 2), (draws,), generator=g).expand(n).to(x.device)
        rows = torch.arange(h, device=x.device).view(1, h, 1)
        cols = torch.arange(w, device=x.device).view(1, 1, w)
        top, left = (cy - size_y // 2).view(-1, 1, 1), (cx - size_x // 2).view(-1, 1, 1)
        inside = (rows >= top) & (rows < top + size_y) & (cols >= left) & (cols < left + size_x)
        return x * (~inside).unsqueeze(1).to(x.dtype)

    def _flip(self, x: Tensor, draws: int, g: torch.Generator) -> Tensor:
        flip = (torch.rand(draws, generator=g) < 0.5).expand(len(x)).to(x.device).view(-1, 1, 1, 1)
        return torch.where(flip, x.flip(3), x)

    def _affine(self, x: Tensor, theta: Tensor) -> Tensor:
        grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=True)
        return F.grid_sample(x, grid, align_corners=True)

    def _scale(self, x: Tensor, draws: int, g: torch.Generator) -> Tensor:
        low, span = 1.0 / SCALE_RATIO, SCALE_RATIO - 1.0 / SCALE_RATIO
        sx = torch.rand(draws, generator=g) * span + low
        sy = torch.rand(draws, generator=g) * span + low
        zeros = torch.zeros(draws)
        theta = torch.stack([torch.stack([sx, zeros, zeros], 1), torch.stack([zeros, sy, zeros], 1)], 1)
        return self._affine(x, theta.expand(len(x), 2, 3))

    def _rotate(self, x: Tensor, draws: int, g: torch.Generator) -> Tensor:
        angle = (torch.rand(draws, generator=g) - 0.5) * 2.0 * math.radians(ROTATE_DEGREES)
        cos, sin, zeros = angle.cos(), angle.sin(), torch.zeros(draws)
        theta = torch.stack([torch.stack([cos, sin, zeros], 1), torch.stack([-sin, cos, zeros], 1)], 1)
        return self._affine(x, theta.expand(len(x), 2, 3))


class ZCAWhitening(nn.Module):
    """ZCA whitening of flattened images, ``x_w = (x - mu) U diag(1 / sqrt(lambda + eps)) U^T``, fitted on a training
    set (unbiased covariance, ``eps = 0.1`` as the MTT/TESLA code's kornia call). The fitted mean and matrix are
    buffers, so a module holding this one saves them in its checkpoint.

    Args:
        num_features: ``C * H * W`` of the images.
        eps: added to the covariance eigenvalues.
    """

    def __init__(self, num_features: int, eps: float = 0.1) -> None:
        super().__init__()
        if eps <= 0:
            raise ValueError(f"ZCA eps must be > 0, got {eps}")
        self.eps = eps
        self.register_buffer("mean", torch.zeros(num_features))
        self.register_buffer("matrix", torch.eye(num_features))
        self.register_buffer("fitted", torch.tensor(False))

    @torch.no_grad()
    def fit(self, images: Tensor) -> ZCAWhitening:
        flat = images.reshape(len(images), -1).double()
        if flat.shape[1] != self.mean.numel():
            raise ValueError(f"ZCA was built for {self.mean.numel()} features, images have {flat.shape[1]}")
        if len(flat) < 2:
            raise ValueError(f"fitting ZCA needs at least 2 images, got {len(flat)}")
        mean = flat.mean(0)
        centered = flat - mean
        covariance = centered.T @ centered / (len(flat) - 1)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        matrix = eigenvectors @ torch.diag((eigenvalues.clamp_min(0) + self.eps).rsqrt()) @ eigenvectors.T
        self.mean.copy_(mean.to(self.mean.dtype))
        self.matrix.copy_(matrix.to(self.matrix.dtype))
        self.fitted.fill_(True)
        return self

    def forward(self, images: Tensor) -> Tensor:
        if not bool(self.fitted):
            raise RuntimeError("ZCAWhitening.forward before fit()")
        flat = images.reshape(len(images), -1)
        return ((flat - self.mean) @ self.matrix).reshape(images.shape)
