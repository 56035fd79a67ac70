"""SpectFormer: spectral gating blocks followed by attention blocks (Patro, Namboodiri, Agneeswaran, "SpectFormer:
Frequency and Attention is what you need in a Vision Transformer", https://arxiv.org/abs/2304.06446).

The vanilla (non-hierarchical) architecture of the official code (``badripatro/SpectFormers``): a patch embedding
with a learned position embedding and no class token, ``spectral_depth`` spectral gating blocks (GFNet's global
filter, Rao et al. https://arxiv.org/abs/2107.00645), then pre-norm multi-head attention blocks (timm ``Block``), a
final LayerNorm, the mean over tokens and a linear classifier. A spectral block is
``x + DropPath(MLP(LN(filter(LN(x)))))`` with one residual around filter and MLP, as in the official code.
The hierarchical SpectFormer-H is not included.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from timm.layers import DropPath, Mlp, PatchEmbed, trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from .base import Backbone, check_int
from .registry import register_net

__all__ = [
    "SpectFormer",
    "SpectralGatingBlock",
    "SpectralGatingFilter",
    "spectformer_b_patch4",
    "spectformer_s_patch4",
    "spectformer_ti_patch4",
    "spectformer_xs_patch4",
    "spectral_gating_parameter_count",
]


class SpectralGatingFilter(nn.Module):
    """Global filter over a token grid: ``irfft2(rfft2(x) * W, s=(h, w))`` per channel, with ``norm="ortho"``.

    ``W`` is a learnable complex weight of shape ``(h, w // 2 + 1, dim)`` stored as ``weight`` with a trailing real /
    imaginary axis of size 2 (initialised N(0, 0.02^2), as GFNet and SpectFormer). The FFT runs in float32 even under
    autocast (half-precision FFTs need power-of-two sizes and lose accuracy); the result is cast back to the input's
    dtype. By the convolution theorem the filter is a per-channel circular convolution over the grid with the kernel
    ``irfft2(W, s=(h, w))`` (default "backward" normalisation: the two "ortho" factors cancel).

    Args:
        grid_size: ``(h, w)`` tokens of the grid.
        dim: channels (token width).
    """

    def __init__(self, grid_size: tuple[int, int], dim: int) -> None:
        super().__init__()
        height, width = grid_size
        check_int("grid height", height, minimum=1)
        check_int("grid width", width, minimum=1)
        check_int("dim", dim, minimum=1)
        self.grid_size = (height, width)
        self.weight = nn.Parameter(torch.randn(height, width // 2 + 1, dim, 2) * 0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, h * w, dim)`` tokens in row-major grid order -> filtered tokens of the same shape and dtype."""
        batch, count, dim = tokens.shape
        height, width = self.grid_size
        if count != height * width:
            raise ValueError(
                f"SpectralGatingFilter was built for a {height}x{width} grid ({height * width} tokens) but got "
                f"{count} tokens; build the net with the image_size of the data"
            )
        with torch.autocast(device_type=tokens.device.type, enabled=False):
            grid = tokens.float().reshape(batch, height, width, dim)
            spectrum = torch.fft.rfft2(grid, dim=(1, 2), norm="ortho")
            spectrum = spectrum * torch.view_as_complex(self.weight.float())
            filtered = torch.fft.irfft2(spectrum, s=(height, width), dim=(1, 2), norm="ortho")
        return filtered.reshape(batch, count, dim).to(tokens.dtype)


class SpectralGatingBlock(nn.Module):
    """``x + DropPath(MLP(LN(filter(LN(x)))))``: GFNet's block, SpectFormer's spectral layer.

    Args:
        grid_size: ``(h, w)`` token grid.
        dim: token width.
        mlp_ratio: MLP hidden width relative to ``dim``.
        drop_path: stochastic-depth rate of the block.
    """

    def __init__(self, grid_size: tuple[int, int], dim: int, mlp_ratio: float = 4.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.filter = SpectralGatingFilter(grid_size, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.mlp(self.norm2(self.filter(self.norm1(x)))))


def spectral_gating_parameter_count(grid_size: tuple[int, int], dim: int, mlp_ratio: float = 4.0) -> int:
    """Parameters of one :class:`SpectralGatingBlock`: the complex filter ``h * (w // 2 + 1) * dim * 2``, the MLP
    ``dim * hidden + hidden + hidden * dim + dim`` and two LayerNorms ``2 * 2 * dim``."""
    height, width = grid_size
    hidden = int(dim * mlp_ratio)
    return height * (width // 2 + 1) * dim * 2 + (2 * dim * hidden + hidden + dim) + 4 * dim


class SpectFormer(Backbone):
    """Vanilla SpectFormer (https://arxiv.org/abs/2304.06446): ``spectral_depth`` spectral gating blocks, then
    ``depth - spectral_depth`` attention blocks, mean-pooled tokens and a linear classifier.

    The spectral filters are sized for the token grid of ``image_size`` / ``patch_size``, so the net accepts inputs
    of exactly ``image_size`` (the CLI fills it from the data). Weights are randomly initialised (truncated normal
    0.02 for linear layers and the position embedding, as the official code).

    Args:
        num_classes: classifier outputs; 0 removes the classifier (``forward`` returns pooled features).
        in_channels: input image channels.
        image_size: input height and width (an int for square images); each must be a multiple of ``patch_size``.
        patch_size: side of the square patches.
        embed_dim: token width.
        depth: number of blocks, spectral and attention together.
        spectral_depth: number of leading spectral gating blocks (the paper's alpha, 4 by default); ``depth`` gives
            an all-spectral GFNet-like net, 0 a plain ViT without class token.
        num_heads: heads of the attention blocks (must divide ``embed_dim``).
        mlp_ratio: MLP hidden width relative to ``embed_dim``.
        drop_rate: dropout on the pooled features.
        drop_path_rate: stochastic-depth rate of the last block (linearly increasing over blocks).
    """

    slug: ClassVar[str] = "spectformer"

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int | tuple[int, int] = 32,
        patch_size: int = 4,
        embed_dim: int = 256,
        depth: int = 12,
        spectral_depth: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__(num_classes, in_channels)
        height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        check_int("patch_size", patch_size, minimum=1)
        check_int("embed_dim", embed_dim, minimum=1)
        check_int("depth", depth, minimum=1)
        check_int("num_heads", num_heads, minimum=1)
        if isinstance(spectral_depth, bool) or not isinstance(spectral_depth, int) or not 0 <= spectral_depth <= depth:
            raise ValueError(f"spectral_depth must be an integer in [0, depth={depth}], got {spectral_depth!r}")
        if height < patch_size or width < patch_size or height % patch_size or width % patch_size:
            raise ValueError(
                f"SpectFormer reshapes the tokens into a grid: image_size {image_size!r} must be a multiple of "
                f"patch_size {patch_size}"
            )
        if spectral_depth < depth and embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads}).")
        if not 0.0 <= drop_rate < 1.0 or not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_rate and drop_path_rate must lie in [0, 1), got {drop_rate}, {drop_path_rate}")
        self.image_size = (height, width)
        self.grid_size = (height // patch_size, width // patch_size)
        self.spectral_depth = spectral_depth
        self.patch_embed = PatchEmbed(
            img_size=self.image_size, patch_size=patch_size, in_chans=in_channels, embed_dim=embed_dim
        )
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size[0] * self.grid_size[1], embed_dim))
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        blocks: list[nn.Module] = [
            SpectralGatingBlock(self.grid_size, embed_dim, mlp_ratio, drop_path=rates[i]) for i in range(spectral_depth)
        ]
        blocks += [
            Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, drop_path=rates[i])
            for i in range(spectral_depth, depth)
        ]
        self.blocks = nn.Sequential(*blocks)
        self.norm = nn.LayerNorm(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.num_features = embed_dim
        trunc_normal_(self.pos_embed, std=0.02)
        self.apply(_init_linear)
        self.reset_classifier(num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.image_size:
            raise ValueError(
                f"SpectFormer was built for {self.image_size[0]}x{self.image_size[1]} images (its spectral filters "
                f"fit that token grid), got {tuple(x.shape[-2:])}"
            )
        tokens = self.blocks(self.patch_embed(x) + self.pos_embed)
        return self.head_drop(self.norm(tokens).mean(dim=1))


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


# Variants of the official vanilla SpectFormer (card: Ti 256/12, XS 384/12, S 384/19 with drop path 0.15, B 512/19 with
# 0.25; alpha 4). The official attention block hard-codes 6 heads; 6 does not divide 256 or 512, so Ti uses 4 heads
# and B 8 (head width 64). Patches of 4x4 pixels make a 8x8 grid of 32x32 CIFAR images. Only Ti is in the nets
# registry (its contract tests build every registered net on a CPU); XS, S and B are built by these functions.
@register_net("spectformer_ti_patch4")
def spectformer_ti_patch4(**kwargs: Any) -> SpectFormer:
    """SpectFormer-Ti/4: width 256, 12 blocks (4 spectral), 4 heads."""
    return SpectFormer(**({"embed_dim": 256, "depth": 12, "num_heads": 4} | kwargs))


def spectformer_xs_patch4(**kwargs: Any) -> SpectFormer:
    """SpectFormer-XS/4: width 384, 12 blocks (4 spectral), 6 heads."""
    return SpectFormer(**({"embed_dim": 384, "depth": 12, "num_heads": 6} | kwargs))


def spectformer_s_patch4(**kwargs: Any) -> SpectFormer:
    """SpectFormer-S/4: width 384, 19 blocks (4 spectral), 6 heads, drop path 0.15."""
    return SpectFormer(**({"embed_dim": 384, "depth": 19, "num_heads": 6, "drop_path_rate": 0.15} | kwargs))


def spectformer_b_patch4(**kwargs: Any) -> SpectFormer:
    """SpectFormer-B/4: width 512, 19 blocks (4 spectral), 8 heads, drop path 0.25."""
    return SpectFormer(**({"embed_dim": 512, "depth": 19, "num_heads": 8, "drop_path_rate": 0.25} | kwargs))
