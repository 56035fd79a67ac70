"""Sparse regularisation of ViT attention maps during training, then global magnitude pruning.

Prasetyo, Yudistira, Widodo, "Sparse then Prune: Toward Efficient Vision Transformers", 2023,
https://arxiv.org/abs/2307.11988 (official code: github.com/yogiprsty/Sparse-ViT).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from timm.models.vision_transformer import Attention
from torch import Tensor, nn

from lit_methods.base import ImageClassifier
from lit_methods.compression.common import save_sparsity_figure
from lit_methods.pruning.report import layer_sparsity
from lit_methods.pruning.unstructured import global_magnitude_prune

__all__ = ["SparseThenPrune", "attention_regularizer", "attention_row_entropy"]


def attention_regularizer(probabilities: Tensor) -> Tensor:
    """``mean(log(1 + A^2))`` over every entry of attention probabilities ``A`` (batch, heads, tokens, tokens).

    Rows sum to 1 and ``log(1 + a^2)`` is convex on [0, 1], so *minimising* it favours flatter rows."""
    return torch.log1p(probabilities.pow(2)).mean()


def attention_row_entropy(probabilities: Tensor) -> Tensor:
    """Mean Shannon entropy (nats) of the attention rows."""
    return -(probabilities * probabilities.clamp_min(1e-12).log()).sum(-1).mean()


class _AttentionRecorder:
    """Forward pre-hook of an attention's ``attn_drop``: its input is the attention probability map."""

    def __init__(self) -> None:
        self.maps: list[Tensor] = []

    def __call__(self, module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        self.maps.append(inputs[0])


class SparseThenPrune(ImageClassifier):
    """Training with the sparse regulariser on the attention maps of a timm ViT, then one-shot global L1 pruning
    (Prasetyo et al., https://arxiv.org/abs/2307.11988).

    The loss is ``CE + sparse_lambda * r`` with ``r = mean(log(1 + A^2))`` over the attention probabilities ``A`` of
    the last block (``reg_layers="last"``: the official code overwrites ``r`` in its block loop, so only the last
    block counts) or the mean over all blocks (``"all"``). Minimising ``r`` flattens attention rows (higher entropy):
    the tests measure that direction. The attention modules run unfused (``fused_attn=False``) so the probabilities
    exist. When testing starts (once: a ``pruned`` flag is kept in the checkpoint; training checkpoints hold the
    dense weights), ``prune_ratio`` of the listed tensors is zeroed by global
    magnitude (``torch.nn.utils.prune.global_unstructured`` with ``L1Unstructured``, made permanent): the
    patch-embedding conv, every block's LayerNorm weights (official; ``prune_norm_weights=False`` leaves them), the
    fused QKV and output projections, both MLP layers and the classifier; biases, the final norm, class token and
    position embedding stay. So a test after fit evaluates the pruned network, with no fine-tuning (as in the paper);
    :meth:`prune` prunes on demand.
    Logged: ``sparse_vit/r`` per step; after pruning, the pruned share per tensor as a bar-chart PNG next to the logs.

    Args:
        backbone: a network holding timm ``Attention`` modules (e.g. :class:`lit_methods.nets.ViT`).
        sparse_lambda: weight of the regulariser (official: 0.01).
        reg_layers: ``"last"`` (official) or ``"all"``.
        prune_ratio: share of the listed entries pruned before testing, in (0, 1); ``None``: no pruning.
        prune_norm_weights: also prune the blocks' LayerNorm weights (official code: yes).
        **kwargs: the arguments of :class:`~lit_methods.ImageClassifier`.
    """

    slug: ClassVar[str] = "sparse-then-prune"

    def __init__(
        self,
        backbone: nn.Module,
        sparse_lambda: float = 0.01,
        reg_layers: Literal["last", "all"] = "last",
        prune_ratio: float | None = 0.3,
        prune_norm_weights: bool = True,
        **kwargs: Any,
    ) -> None:
        if sparse_lambda < 0:
            raise ValueError(f"sparse_lambda must be >= 0, got {sparse_lambda}")
        if reg_layers not in ("last", "all"):
            raise ValueError(f"reg_layers must be 'last' or 'all', got {reg_layers!r}")
        if prune_ratio is not None and not 0.0 < prune_ratio < 1.0:
            raise ValueError(f"prune_ratio must lie in (0, 1) or be None, got {prune_ratio}")
        super().__init__(backbone, **kwargs)
        attentions = [m for m in backbone.modules() if isinstance(m, Attention)]
        if not attentions:
            raise ValueError(f"{type(backbone).__name__} has no timm Attention module to regularise")
        self.sparse_lambda = sparse_lambda
        self.reg_layers = reg_layers
        self.prune_ratio = prune_ratio
        self.prune_norm_weights = prune_norm_weights
        self.register_buffer("pruned", torch.zeros((), dtype=torch.bool))
        self.recorder = _AttentionRecorder()
        for attention in attentions:
            attention.fused_attn = False
            attention.attn_drop.register_forward_pre_hook(self.recorder)

    def attention_maps(self, x: Tensor) -> list[Tensor]:
        """The attention probability maps of every block for inputs ``x``, in block order (no gradient)."""
        self.recorder.maps = []
        with torch.no_grad():
            self(x)
        maps, self.recorder.maps = self.recorder.maps, []
        return maps

    def regularizer(self, maps: list[Tensor]) -> Tensor:
        if self.reg_layers == "last":
            return attention_regularizer(maps[-1])
        return torch.stack([attention_regularizer(m) for m in maps]).mean()

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        self.recorder.maps = []
        loss = super().training_step(batch, batch_idx)
        r = self.regularizer(self.recorder.maps)
        self.recorder.maps = []
        self.log("sparse_vit/r", r, on_step=True)
        return loss + self.sparse_lambda * r

    def on_validation_batch_end(self, *args: Any) -> None:
        self.recorder.maps = []

    def on_test_batch_end(self, *args: Any) -> None:
        self.recorder.maps = []

    def prunable_tensors(self) -> list[tuple[nn.Module, str]]:
        """The ``(module, "weight")`` pairs global pruning acts on (see the class doc)."""
        tensors = []
        for name, module in self.backbone.named_modules():
            is_block_norm = isinstance(module, nn.LayerNorm) and name.split(".")[-1] in ("norm1", "norm2")
            if isinstance(module, (nn.Linear, nn.Conv2d)) or (self.prune_norm_weights and is_block_norm):
                tensors.append((module, "weight"))
        return tensors

    def prune(self, ratio: float) -> None:
        """Zero ``ratio`` of the listed entries by global magnitude (permanent)."""
        global_magnitude_prune(self.prunable_tensors(), ratio)

    def on_test_start(self) -> None:
        if self.prune_ratio is not None and not bool(self.pruned):
            self.prune(self.prune_ratio)
            self.pruned.fill_(True)
            if self._trainer is not None:
                sparsity = layer_sparsity(self.backbone, (nn.Linear, nn.Conv2d, nn.LayerNorm))
                save_sparsity_figure(self.trainer, sparsity, "sparse_vit/layers")
