"""Gradient-preserving all-gather for losses that need the whole global batch."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import Tensor


def distributed_is_on() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_with_grad(tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` from every rank along dim 0 (rank order), keeping the autograd graph.

    The backward pass sums, over ranks, the gradients that reach each rank's slice (torch.distributed.nn's
    all_gather). A loss computed on the gathered batch on every rank therefore gives each rank ``world_size``
    times the single-process gradient of its slice, which DDP's gradient averaging divides back out.
    Without an initialized process group (or with one process) it returns ``tensor`` unchanged.
    """
    if not distributed_is_on():
        return tensor
    return torch.cat(dist_fn.all_gather(tensor), dim=0)
