"""The small model both unlearning test files judge: logistic regression on scikit-learn's digits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_methods.datamodules import DigitsDataModule


def digits_train_split() -> tuple[Tensor, Tensor]:
    """Normalised training inputs and labels of the digits (no crop padding)."""
    data = DigitsDataModule(crop_padding=0)
    data.setup("fit")
    return data.to_inputs(data.train_images), data.train_labels


def linear_digits_model() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))


def train_logistic_regression(x: Tensor, y: Tensor) -> nn.Module:
    """Logistic regression, SGD 0.01 momentum 0.9, batch 64, 12 epochs from seed 0 (about 96 % train accuracy)."""
    torch.manual_seed(0)
    net = linear_digits_model()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    order = torch.Generator().manual_seed(0)
    for _ in range(12):
        for idx in torch.randperm(len(y), generator=order).split(64):
            loss = F.cross_entropy(net(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return net
