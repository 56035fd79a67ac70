"""A user's backbone that takes num_classes but no in_channels."""

from __future__ import annotations

from torch import Tensor, nn


class PlainMLP(nn.Module):
    def __init__(self, num_classes: int = 3, hidden: int = 16, input_features: int = 64) -> None:
        super().__init__()
        layers = [nn.Flatten(), nn.Linear(input_features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
