"""FedLoGe: joint local and generic federated learning under long-tailed data (Xiao et al., ICLR 2024,
arXiv:2401.08977; official code ZackZikaiXiao/FedLoGe).

The shared backbone trains through a frozen sparse equiangular classifier (SSE-C); on its detached features an
auxiliary global head ``g_aux`` (aggregated) and a local head per client (private, never aggregated) are trained.
GLA-FR re-aligns them without training: the generic model is ``g_aux`` with every class row scaled to norm ``tau``
(removing the head/tail norm bias of long-tailed data), and client ``k``'s personal model is ``l_head_k(f) +
g_aux(f)`` (the code's ``localtest``) with the classes the client never saw masked out.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_methods.base import ImageClassifier
from lit_methods.datamodules.batch import as_batch
from lit_methods.datamodules.federated import FederatedDataModule
from lit_methods.federated.core import FederatedMethod

__all__ = ["FedLoGe", "gla_fr_realign", "sparse_equiangular_classifier"]

ABSENT_CLASS_LOGIT = -1e10


def sparse_equiangular_classifier(
    num_classes: int,
    dim: int,
    sparsity: float = 0.6,
    steps: int = 10_000,
    lr: float = 1e-4,
    target_norm: float = 0.1,
    seed: int = 0,
) -> Tensor:
    """The SSE-C weight ``(num_classes, dim)``: a simplex equiangular tight frame with a random ``sparsity`` share
    of its entries zeroed, the rest refined with Adam to pull every class vector's norm to ``target_norm`` and push
    each class's nearest neighbour away (the official ``gen_sparse_ETF``: loss ``sum_c (|m_c| - target_norm)^2 -
    mean_c arccos(max_{c' != c} cos(m_c, m_c'))``, the zeroed entries kept at 0)."""
    if num_classes < 2:
        raise ValueError(f"an equiangular classifier needs num_classes >= 2, got {num_classes}")
    if dim < num_classes:
        raise ValueError(f"the feature dimension ({dim}) must be >= num_classes ({num_classes}) for an ETF")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must lie in [0, 1), got {sparsity}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.rand(dim, num_classes, generator=generator, dtype=torch.float64))
    centering = torch.eye(num_classes, dtype=torch.float64) - 1.0 / num_classes
    etf = math.sqrt(num_classes / (num_classes - 1)) * basis @ centering  # (dim, C), columns are class vectors
    keep = torch.ones(etf.numel(), dtype=torch.float64)
    keep[torch.randperm(etf.numel(), generator=generator)[: int(sparsity * etf.numel())]] = 0.0
    keep = keep.view_as(etf)
    weight = (etf * keep).T.contiguous().requires_grad_(True)  # (C, dim)
    mask = keep.T
    optimizer = torch.optim.Adam([weight], lr=lr)
    off_diagonal = ~torch.eye(num_classes, dtype=torch.bool)
    with torch.enable_grad():
        for _ in range(steps):
            norms = weight.norm(dim=1)
            cosine = F.normalize(weight, dim=1) @ F.normalize(weight, dim=1).T
            nearest = cosine.masked_fill(~off_diagonal, -2.0).max(dim=1).values
            loss = (norms - target_norm).pow(2).sum() - torch.arccos(nearest.clamp(-1 + 1e-7, 1 - 1e-7)).mean()
            optimizer.zero_grad()
            loss.backward()
            weight.grad.mul_(mask)
            optimizer.step()
    return (weight.detach() * mask).float()


def gla_fr_realign(weight: Tensor, tau: float) -> Tensor:
    """GLA-FR's global re-alignment: every class row ``w_c`` of ``weight`` ``(C, d)`` scaled to norm ``tau``."""
    return weight * (tau / weight.norm(dim=1, keepdim=True).clamp_min(1e-12))


class FedLoGe(FederatedMethod, ImageClassifier):
    """FedLoGe's client model: backbone + frozen SSE-C, the auxiliary global head and this client's local head.

    Every training step minimises ``CE(SSE-C(f), y)`` (the backbone's only gradient) ``+ CE(g_aux(f.detach()), y)
    + CE(l_head(f.detach()), y)``. One SGD over the three parts equals the code's three SGDs of the same lr and
    momentum, since the parts share no parameter. ``forward`` is the generic model: ``g_aux`` re-aligned by GLA-FR.
    The heads have no bias (the re-alignment is of class rows; a bias would keep a head/tail prior). The local
    head is client-private (:attr:`private_prefixes`); the SSE-C is a buffer, identical for every client (built
    from ``sse_seed``), so it never receives a gradient or weight decay. Every local update builds a fresh optimizer
    (as the code does), so ``lr_schedule`` defaults to ``"constant"``: a schedule would restart every round.

    Args:
        backbone: a :mod:`lit_methods.nets` backbone (``forward_features``, ``num_features``); its classifier is
            removed.
        sse_sparsity: share of SSE-C entries zeroed (paper: 0.6).
        sse_steps: Adam steps refining the SSE-C (code: 10,000).
        sse_seed: seed of the SSE-C.
        tau: norm of every class row of the re-aligned ``g_aux`` (code: 1.7).
        lr: SGD learning rate of every part (code: 0.03).
        momentum: SGD momentum (code: 0.5).
        **kwargs: the other arguments of :class:`~lit_methods.ImageClassifier`.
    """

    slug: ClassVar[str] = "fedloge"
    backbone_output = "features"
    private_prefixes: ClassVar[tuple[str, ...]] = ("local_head.",)

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int | None = None,
        sse_sparsity: float = 0.6,
        sse_steps: int = 10_000,
        sse_seed: int = 0,
        tau: float = 1.7,
        lr: float = 0.03,
        momentum: float = 0.5,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        lr_schedule: Literal["cosine", "onecycle", "constant"] = "constant",
        **kwargs: Any,
    ) -> None:
        if not (hasattr(backbone, "forward_features") and hasattr(backbone, "reset_classifier")):
            raise ValueError(f"{type(backbone).__name__} has no forward_features/reset_classifier: use a lit_methods.nets backbone")
        if not tau > 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        num_classes = num_classes if num_classes is not None else getattr(backbone, "num_classes", None)
        backbone.reset_classifier(0)
        super().__init__(
            backbone, num_classes=num_classes, lr=lr, momentum=momentum, weight_decay=weight_decay,
            nesterov=nesterov, lr_schedule=lr_schedule, **kwargs,
        )
        dim = backbone.num_features
        self.tau = tau
        self.register_buffer(
            "sse_classifier", sparse_equiangular_classifier(self.num_classes, dim, sse_sparsity, sse_steps, seed=sse_seed)
        )
        self.g_aux = nn.Linear(dim, self.num_classes, bias=False)
        self.local_head = nn.Linear(dim, self.num_classes, bias=False)

    # -- the heads ----------------------------------------------------------------------------------------------
    def features(self, x: Tensor) -> Tensor:
        return self.backbone.forward_features(self.normalize_inputs(x))

    def realigned_aux_weight(self) -> Tensor:
        return gla_fr_realign(self.g_aux.weight, self.tau)

    def head_logits(self, f: Tensor) -> dict[str, Tensor]:
        """Logits of every head on features ``f``: ``sse`` (SSE-C), ``aux`` (raw g_aux), ``generic`` (GLA-FR g_aux)
        and ``local`` (l_head + g_aux, unmasked)."""
        return {
            "sse": f @ self.sse_classifier.T,
            "aux": self.g_aux(f),
            "generic": f @ self.realigned_aux_weight().T,
            "local": self.local_head(f) + self.g_aux(f),
        }

    def forward(self, x: Tensor) -> Tensor:
        """The generic model's logits: GLA-FR re-aligned ``g_aux``."""
        return self.features(x) @ self.realigned_aux_weight().T

    # -- training -----------------------------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        batch = as_batch(batch)
        x, y = batch["inputs"], batch["targets"]
        f = self.features(x)
        detached = f.detach()
        sse_loss = F.cross_entropy(f @ self.sse_classifier.T, y)
        aux_loss = F.cross_entropy(self.g_aux(detached), y)
        local_loss = F.cross_entropy(self.local_head(detached), y)
        loss = sse_loss + aux_loss + local_loss
        self.log_dict({"train/loss": loss, "train/sse_loss": sse_loss, "train/aux_loss": aux_loss,
                       "train/local_loss": local_loss}, on_step=True, on_epoch=False, prog_bar=False)
        return loss

    # -- evaluation ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def collect_logits(self, batches: Iterable[Any], datamodule: FederatedDataModule) -> tuple[dict[str, Tensor], Tensor]:
        """Every head's logits over ``batches`` (uint8 images turned into inputs by the datamodule) and the labels."""
        was_training = self.training
        self.eval()
        outputs: dict[str, list[Tensor]] = {}
        labels = []
        try:
            for raw in batches:
                batch = as_batch(datamodule.dataset.on_after_batch_transfer(raw, 0))
                for name, logits in self.head_logits(self.features(batch["inputs"].to(self.device))).items():
                    outputs.setdefault(name, []).append(logits.cpu())
                labels.append(batch["targets"].cpu())
        finally:
            self.train(was_training)
        return {name: torch.cat(parts) for name, parts in outputs.items()}, torch.cat(labels)

    def client_metrics(self, datamodule: FederatedDataModule, client: int) -> dict[str, float]:
        """Accuracy on the client's local test set of its personal model (``local``: l_head + g_aux, classes absent
        from its shard masked) and of the generic model on the same images (``generic``)."""
        logits, labels = self.collect_logits(datamodule.local_test_loader(client), datamodule)
        if len(labels) == 0:
            return {}
        absent = (datamodule.client_class_counts(client) == 0).cpu()
        local = logits["local"].masked_fill(absent, ABSENT_CLASS_LOGIT)
        return {
            "local_acc": (local.argmax(1) == labels).float().mean().item(),
            "generic_acc": (logits["generic"].argmax(1) == labels).float().mean().item(),
        }

    def federation_metrics(self, datamodule: FederatedDataModule) -> dict[str, float]:
        """Balanced-test accuracy of the SSE-C, raw ``g_aux`` and GLA-FR models."""
        datamodule.dataset.setup("test")
        logits, labels = self.collect_logits(datamodule.dataset.test_dataloader(), datamodule)
        return {f"{name}_acc": (out.argmax(1) == labels).float().mean().item()
                for name, out in logits.items() if name != "local"}
