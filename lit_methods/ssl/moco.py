"""MoCo v2 (Chen, Fan, Girshick & He, "Improved Baselines with Momentum Contrastive Learning", arXiv:2003.04297)."""

from __future__ import annotations

import copy
import math
from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from lit_methods.losses.gather import distributed_is_on
from lit_methods.ssl.base import SSLMethod, mlp_projector
from lit_methods.ssl.hallucinator import optional_hallucinator

__all__ = ["MoCoV2", "cosine_momentum"]


def cosine_momentum(step: int, total_steps: int, base: float, final: float = 1.0) -> float:
    """EMA momentum raised from ``base`` to ``final`` along a half cosine over ``total_steps`` optimizer steps
    (BYOL's schedule, arXiv:2006.07733); ``final == base`` keeps it constant (MoCo's 0.999)."""
    progress = min(1.0, step / max(1, total_steps))
    return final - (final - base) * (math.cos(math.pi * progress) + 1) / 2


class MoCoV2(SSLMethod):
    """InfoNCE between a query (the online backbone + MLP projector) and its key (their momentum copies), against a
    queue of past keys.

    The momentum encoder is updated after each *optimizer step* (``trainer.global_step`` advanced), so gradient
    accumulation does not speed up its schedule. Keys are gathered from every rank before they enter the queue, so
    under DDP every rank holds the same queue.

    Args:
        projection_hidden_dim: hidden width of the 2-layer MLP projector (MoCo v2: 2048).
        projection_dim: output width (128).
        queue_size: number of negatives kept (65536 on ImageNet; 4096 suits CIFAR batch sizes).
        temperature: InfoNCE temperature (0.2).
        base_momentum: EMA momentum at the start (0.99 here; MoCo v2 keeps 0.999 constant).
        final_momentum: EMA momentum at the end of training, reached along a cosine.
        symmetric: ``True`` (default) is the symmetrised "v2+" loss ``(l(q1, k2) + l(q2, k1)) / 2`` that enqueues
            both views' keys; ``False`` is the original MoCo v2 of the paper and its official code
            (``facebookresearch/moco``): one direction ``l(q1, k2)``, only ``k2`` enqueued. The base still encodes
            the second view with the online backbone (features of every view are computed); that forward adds no
            gradient and only updates batch-norm running statistics.
        hallucinator: add the :class:`~lit_methods.ssl.hallucinator.Hallucinator`'s extra positives (Wu et al.,
            https://arxiv.org/abs/2307.12168): each raw query ``p`` (before normalisation, as in the official code)
            becomes ``[p; h]`` against the keys ``[k; k]``. Only the distinct keys are enqueued: the official code
            enqueues the duplicated ``[k; k]``, which halves the distinct negatives in the queue. Off (the default),
            the method is plain MoCo v2.
        hallucinator_max_ratio: upper end of the Hallucinator's extrapolation ratio range (0.1).
        **kwargs: the arguments of :class:`~lit_methods.ssl.SSLMethod`.
    """

    slug: ClassVar[str] = "moco-v2"

    def __init__(
        self,
        backbone: nn.Module,
        projection_hidden_dim: int = 2048,
        projection_dim: int = 128,
        queue_size: int = 4096,
        temperature: float = 0.2,
        base_momentum: float = 0.99,
        final_momentum: float = 1.0,
        symmetric: bool = True,
        hallucinator: bool = False,
        hallucinator_max_ratio: float = 0.1,
        **kwargs: Any,
    ) -> None:
        super().__init__(backbone, **kwargs)
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0.0 <= base_momentum <= final_momentum <= 1.0:
            raise ValueError(f"need 0 <= base_momentum <= final_momentum <= 1, got {base_momentum}, {final_momentum}")
        self.projector = mlp_projector(self.num_features, projection_hidden_dim, projection_dim)
        self.momentum_backbone = copy.deepcopy(self.backbone).requires_grad_(False)
        self.momentum_projector = copy.deepcopy(self.projector).requires_grad_(False)
        self.temperature = temperature
        self.base_momentum = base_momentum
        self.final_momentum = final_momentum
        self.symmetric = symmetric
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, projection_dim), dim=1))
        self.register_buffer("queue_pointer", torch.zeros((), dtype=torch.long))
        self.hallucinator = optional_hallucinator(projection_dim, hallucinator, hallucinator_max_ratio)
        self._last_step = 0

    def keys(self, view: Tensor) -> Tensor:
        with torch.no_grad():
            return F.normalize(self.momentum_projector(self.momentum_backbone.forward_features(view)), dim=1)

    def info_nce(self, queries: Tensor, keys: Tensor) -> Tensor:
        """Cross-entropy of each query against its key (positive) and the queue (negatives)."""
        positive = (queries * keys).sum(dim=1, keepdim=True)
        negatives = queries @ self.queue.clone().T
        logits = torch.cat([positive, negatives], dim=1) / self.temperature
        return F.cross_entropy(logits, torch.zeros(len(queries), dtype=torch.long, device=queries.device))

    def ssl_loss(self, views: list[Tensor], features: list[Tensor]) -> Tensor:
        if self.symmetric:
            k1, k2 = self.keys(views[0]), self.keys(views[1])
            loss = (self.query_loss(features[0], k2) + self.query_loss(features[1], k1)) / 2
            self.enqueue(torch.cat([k1, k2]))
        else:
            k2 = self.keys(views[1])
            loss = self.query_loss(features[0], k2)
            self.enqueue(k2)
        return loss

    def query_loss(self, query_features: Tensor, keys: Tensor) -> Tensor:
        """InfoNCE of the queries projected from ``query_features`` against their ``keys`` (and the queue), with the
        Hallucinator's extra positives when it is on."""
        projections = self.projector(query_features)
        if self.hallucinator is not None:
            projections, keys = self.hallucinator.extend(projections, keys)
        return self.info_nce(F.normalize(projections, dim=1), keys)

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """Write ``keys`` (from every rank) over the oldest queue entries."""
        if distributed_is_on():
            gathered = [torch.empty_like(keys) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, keys)
            keys = torch.cat(gathered)
        size = len(self.queue)
        keys = keys[-size:]
        index = (self.queue_pointer + torch.arange(len(keys), device=keys.device)) % size
        self.queue[index] = keys
        self.queue_pointer.copy_((self.queue_pointer + len(keys)) % size)

    def current_momentum(self) -> float:
        total = int(self.trainer.estimated_stepping_batches)
        return cosine_momentum(self.trainer.global_step, total, self.base_momentum, self.final_momentum)

    def on_train_start(self) -> None:
        super().on_train_start()
        self._last_step = self.trainer.global_step

    @torch.no_grad()
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = self.trainer.global_step
        if step == self._last_step:  # no optimizer step happened (gradient accumulation)
            return
        self._last_step = step
        tau = self.current_momentum()
        for online, target in ((self.backbone, self.momentum_backbone), (self.projector, self.momentum_projector)):
            for p, q in zip(online.parameters(), target.parameters()):
                q.mul_(tau).add_(p.detach(), alpha=1 - tau)
            for b, c in zip(online.buffers(), target.buffers()):
                c.copy_(b)
        self.log("train/momentum", tau, on_step=True)
