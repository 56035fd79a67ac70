"""A DDP training step of the Diffusion module (2-process gloo) equals one process on the concatenated batch: the
timesteps, noise and dropped labels are drawn for the global batch and sliced per rank."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

from lit_methods.diffusion import Diffusion, MLPDenoiser
from tests.ddp_helpers import init_gloo, run_distributed

DIGITS = {"in_channels": 1, "image_size": 8, "num_classes": 10, "mean": (0.5,), "std": (0.5,),
          "inputs_normalized": False}


class LossOf(torch.nn.Module):
    """DDP wraps a forward: this one is the module's training loss (as Lightning's DDP wraps training_step)."""

    def __init__(self, model: Diffusion) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.model.diffusion_loss(images, labels, seed_offset=6, drop=True)


def one_step(world_size: int) -> list:
    torch.manual_seed(0)
    model = Diffusion(MLPDenoiser(1, 8, 11, hidden=32, depth=1), conditional=True, label_dropout=0.3, **DIGITS)
    generator = torch.Generator().manual_seed(1)
    images, labels = torch.rand(8, 1, 8, 8, generator=generator), torch.randint(0, 10, (8,), generator=generator)
    wrapped = LossOf(model)
    if world_size > 1:
        init_gloo()
        rank = int(os.environ["RANK"])
        part = slice(rank * 4, rank * 4 + 4)
        images, labels = images[part], labels[part]
        wrapped = DistributedDataParallel(wrapped)
    optimizer = torch.optim.SGD(model.unet.parameters(), lr=0.5)
    wrapped(images, labels).backward()
    optimizer.step()
    return [p.detach().numpy().copy() for p in model.unet.parameters()]  # plain arrays cross the process queue


@pytest.mark.ddp
def test_ddp_step_equals_one_process_on_the_concatenated_batch():
    single = one_step(1)
    for ranked in run_distributed(one_step, 2):
        for a, b in zip(ranked, single):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
