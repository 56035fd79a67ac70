"""A small Vision Transformer for low-resolution images, built on timm's ``VisionTransformer``.

Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale",
https://arxiv.org/abs/2010.11929. The tiny/small widths follow DeiT (Touvron et al.,
https://arxiv.org/abs/2012.12877): ViT-Ti is 192 wide with 3 heads, ViT-S 384 wide with 6 heads, both 12
blocks deep. Patches of 4x4 pixels suit 32x32 inputs (64 tokens). Weights are randomly initialised.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from timm.models.vision_transformer import VisionTransformer

from .base import Backbone, check_choice, check_int
from .registry import register_net

GLOBAL_POOLS = ("token", "avg")


class ViT(Backbone):
    """Vision Transformer (Dosovitskiy et al., https://arxiv.org/abs/2010.11929) with CIFAR-sized defaults.

    ``dynamic_img_size`` is on, so inputs other than ``img_size`` work (the position embedding is
    resampled), e.g. 28x28 Fashion-MNIST with 4x4 patches gives 7x7 tokens. The timm model lives in
    ``self.encoder`` without its head; the classifier is ``self.fc`` on the pooled token.

    Args:
        num_classes: classifier outputs; 0 removes the classifier (``forward`` returns pooled features).
        in_channels: input image channels.
        img_size: image size the position embedding is created for.
        patch_size: side of the square patches.
        embed_dim: token width.
        depth: number of transformer blocks.
        num_heads: attention heads per block (must divide ``embed_dim``).
        mlp_ratio: MLP hidden width relative to ``embed_dim``.
        global_pool: ``"token"`` (class token) or ``"avg"`` (mean of the patch tokens).
        drop_rate: dropout on the pooled features (timm's ``drop_rate``).
        drop_path_rate: stochastic-depth rate of the last block (linearly increasing over blocks).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        img_size: int = 32,
        patch_size: int = 4,
        embed_dim: int = 192,
        depth: int = 6,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        global_pool: Literal["token", "avg"] = "token",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__(num_classes, in_channels)
        check_int("img_size", img_size, minimum=1)
        check_int("patch_size", patch_size, minimum=1)
        check_int("depth", depth, minimum=1)
        check_int("num_heads", num_heads, minimum=1)
        check_int("embed_dim", embed_dim, minimum=1)
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads}).")
        if patch_size > img_size:
            raise ValueError(f"patch_size ({patch_size}) must not exceed img_size ({img_size}).")
        check_choice("global_pool", global_pool, GLOBAL_POOLS)
        self.encoder = VisionTransformer(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_channels,
            num_classes=0,
            global_pool=global_pool,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            dynamic_img_size=True,
            drop_rate=drop_rate,
            drop_path_rate=drop_path_rate,
        )
        self.num_features = embed_dim
        self.reset_classifier(num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.encoder.forward_features(x)
        return self.encoder.forward_head(tokens, pre_logits=True)


@register_net("vit_tiny_patch4")
def vit_tiny_patch4(**kwargs: Any) -> ViT:
    """ViT-Ti/4: 12 blocks, width 192, 3 heads (DeiT-Ti sizes, https://arxiv.org/abs/2012.12877)."""
    return ViT(**({"patch_size": 4, "embed_dim": 192, "depth": 12, "num_heads": 3} | kwargs))


@register_net("vit_small_patch4")
def vit_small_patch4(**kwargs: Any) -> ViT:
    """ViT-S/4: 12 blocks, width 384, 6 heads (DeiT-S sizes, https://arxiv.org/abs/2012.12877)."""
    return ViT(**({"patch_size": 4, "embed_dim": 384, "depth": 12, "num_heads": 6} | kwargs))
