"""scikit-learn's digits upsampled to 16x16, and a short plain training loop: the cheap real-data setting of the
backbone tests."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_methods.datamodules.digits import load_digits_uint8


@functools.cache
def digits16() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(train_x, train_y, test_x, test_y)``: normalized 1x16x16 images (bilinear upsampling of the 8x8 digits), the
    last 450 of a fixed shuffle held out."""
    images, labels = load_digits_uint8()
    pixels = F.interpolate(images.float() / 255.0, size=(16, 16), mode="bilinear", align_corners=False)
    inputs = (pixels - 0.3053) / 0.3759
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    train, test = order[:-450], order[-450:]
    return inputs[train], labels[train], inputs[test], labels[test]


def train_and_test(net: nn.Module, epochs: int = 12, lr: float = 3e-3, batch_size: int = 64, seed: int = 0) -> float:
    """Train ``net`` with AdamW on the 16x16 digits for ``epochs`` and return its test accuracy (eval mode)."""
    train_x, train_y, test_x, test_y = digits16()
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.01)
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(train_y), generator=generator)
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            loss = F.cross_entropy(net(train_x[index]), train_y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    net.eval()
    with torch.no_grad():
        return float((net(test_x).argmax(1) == test_y).float().mean())
