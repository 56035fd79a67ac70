"""Nets and batches shared by the per-sample gradient tests of lit_methods.privacy and of ErrorFeedbackDP."""

from __future__ import annotations

import torch
from torch import nn

from lit_methods.nets import ResNet20


def resnet20() -> ResNet20:
    return ResNet20(num_classes=10, in_channels=1, norm="groupnorm")


class Tokens(nn.Module):
    """(B, C, H, W) -> (B, H*W, C): a sequence for LayerNorm and a Linear on 3-D inputs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2)


class MeanOverTokens(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(1)


def mixed_layers() -> nn.Sequential:
    """Every supported layer kind and both weight rules on 8x8 inputs (T output positions; ghost norm when
    2 T (d_in + d_out) < d_in d_out): strided dilated padded conv T=16, d_in=9, d_out=8: materialized; strided
    bias-free conv T=4, 72 -> 32: ghost; Linear on tokens T=4, 32 -> 10: materialized; Linear on vectors T=1: ghost."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, stride=2, padding=2, dilation=2),
        nn.GroupNorm(2, 8),
        nn.ReLU(),
        nn.Conv2d(8, 32, 3, stride=2, padding=1, bias=False),
        Tokens(),
        nn.LayerNorm(32),
        nn.Linear(32, 10),
        nn.Tanh(),
        MeanOverTokens(),
        nn.Linear(10, 10, bias=False),
    )


def batches(count: int, size: int = 6, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(size, 1, 8, 8, generator=generator, dtype=torch.float64),
            torch.randint(0, 10, (size,), generator=generator),
        )
        for _ in range(count)
    ]
