"""Grouped-query attention with key-driven query allocation (Khan et al., "Beyond Uniform Query Distribution:
Key-Driven Grouped Query Attention", https://arxiv.org/abs/2408.08454), in a ViT.

``H`` query heads share ``G`` key/value heads. How many query heads each key/value head serves is the allocation
``a`` (``G`` non-negative integers summing to ``H``; query heads are assigned to key/value heads in order):

* ``"gqa"``: static, ``H / G`` consecutive query heads per key/value head (Ainslie et al., arXiv:2305.13245);
* ``"kdgqa"``: recomputed at every forward from the key-head norms ``n_g = sum_batch ||K_g||_F`` (key-driven GQA);
* ``"dgqa_diff"`` / ``"dgqa_ema"``: recomputed only every ``window_size`` training forward passes from the change
  of the norms against a cached norm vector (``|cache - n|``) or from their moving average (``0.9 n + 0.1 cache``),
  after which the cache becomes ``(cache + n) / window_size`` (the official code's update);
* ``"pgqa"``: static GQA whose per-head attention output has a noise matrix subtracted (perturbed GQA).

From norms (or scores) ``s``: min-max normalise ``s`` over the ``G`` heads, ``a = round(H * s / sum s)``, then
repair the sum: while it exceeds ``H`` take one from the largest allocation, while it falls short add one to the
smallest. The official code breaks ties by index (KDGQA) or at random (DGQA); here ties go to the head with the
smaller (when taking) or larger (when adding) score, which keeps the allocation monotone in the score and the same on
every rank. Under DDP the norms are summed over ranks (all-reduce) before allocating in training, so every rank uses
the same grouping. In evaluation DGQA uses the allocation of the last window without touching its state (the official
code recomputes it and overwrites its cache at every evaluation forward, which makes evaluation order-dependent).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.models.vision_transformer import Attention
from torch import Tensor, nn

from .base import check_choice, check_int
from .registry import register_net
from .vit import ViT

__all__ = [
    "ATTENTION_KINDS",
    "GroupedQueryAttention",
    "KDGQAViT",
    "convert_to_grouped_query",
    "kdgqa_vit_small_patch4",
    "kdgqa_vit_tiny_patch4",
    "key_driven_allocation",
]

AttentionKind = Literal["gqa", "kdgqa", "dgqa_diff", "dgqa_ema", "pgqa"]
ATTENTION_KINDS: tuple[str, ...] = ("gqa", "kdgqa", "dgqa_diff", "dgqa_ema", "pgqa")
DGQA_EMA_DECAY = 0.9  # official code: avg = 0.9 * current norms + 0.1 * cache


def key_driven_allocation(scores: Tensor, num_heads: int) -> Tensor:
    """Query heads per key/value head from non-negative ``scores`` of shape ``(G,)`` (see the module doc).

    Returns ``G`` int64 counts, each >= 0, summing to ``num_heads``; equal scores give the uniform split of
    ``num_heads`` (the remainder to the first heads)."""
    groups = scores.numel()
    scores = scores.detach().double().flatten()
    spread = scores.max() - scores.min()
    if not torch.isfinite(scores).all() or spread <= 0:
        uniform = torch.full((groups,), num_heads // groups, dtype=torch.int64, device=scores.device)
        uniform[: num_heads % groups] += 1
        return uniform
    normalised = (scores - scores.min()) / spread
    allocation = torch.round(num_heads * normalised / normalised.sum()).long()
    order = torch.argsort(scores)  # ascending score; ties resolved by score keep the allocation monotone
    rank = torch.empty_like(order)
    rank[order] = torch.arange(groups, device=scores.device)
    while int(allocation.sum()) > num_heads:  # take from the largest allocation, the lowest-scored one among ties
        key = allocation * groups - rank
        allocation[int(torch.argmax(key))] -= 1
    while int(allocation.sum()) < num_heads:  # give to the smallest allocation, the highest-scored one among ties
        key = allocation * groups - rank
        allocation[int(torch.argmin(key))] += 1
    return allocation


class GroupedQueryAttention(nn.Module):
    """Self-attention with ``num_heads`` query heads over ``num_kv_heads`` key/value heads (a drop-in for timm's
    ``Attention``: ``forward(x, attn_mask=None)`` on ``(B, N, dim)`` tokens).

    Args:
        dim: token width (divisible by ``num_heads``).
        num_heads: query heads ``H``.
        num_kv_heads: key/value heads ``G``; for ``"gqa"`` and ``"pgqa"`` it must divide ``H``.
        kind: allocation of query heads to key/value heads, one of :data:`ATTENTION_KINDS` (module doc).
        window_size: DGQA recomputes the allocation every ``window_size`` training forward passes (official example
            config: 300).
        qkv_bias: biases on the query, key and value projections.
        perturb_in_eval: PGQA subtracts its noise in evaluation too, as the official code does; ``False`` (default)
            keeps evaluation deterministic.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_kv_heads: int,
        kind: AttentionKind = "kdgqa",
        window_size: int = 300,
        qkv_bias: bool = True,
        perturb_in_eval: bool = False,
    ) -> None:
        super().__init__()
        check_int("dim", dim, minimum=1)
        check_int("num_heads", num_heads, minimum=1)
        check_int("num_kv_heads", num_kv_heads, minimum=1)
        check_int("window_size", window_size, minimum=1)
        check_choice("attention kind", kind, ATTENTION_KINDS)
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads}).")
        if num_kv_heads > num_heads:
            raise ValueError(f"num_kv_heads ({num_kv_heads}) must not exceed num_heads ({num_heads}).")
        if kind in ("gqa", "pgqa") and num_heads % num_kv_heads:
            raise ValueError(f"{kind} needs num_kv_heads ({num_kv_heads}) to divide num_heads ({num_heads}).")
        self.num_heads, self.num_kv_heads, self.kind = num_heads, num_kv_heads, kind
        self.head_dim = dim // num_heads
        self.window_size = window_size
        self.perturb_in_eval = perturb_in_eval
        self.q = nn.Linear(dim, num_heads * self.head_dim, bias=qkv_bias)
        self.k = nn.Linear(dim, num_kv_heads * self.head_dim, bias=qkv_bias)
        self.v = nn.Linear(dim, num_kv_heads * self.head_dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        uniform = key_driven_allocation(torch.ones(num_kv_heads), num_heads)
        self.register_buffer("allocation", uniform)  # the grouping last used (DGQA: of the current window)
        if kind.startswith("dgqa"):
            self.register_buffer("norm_cache", torch.zeros(num_kv_heads))
            self.register_buffer("training_forwards", torch.zeros((), dtype=torch.int64))

    # -- allocation ----------------------------------------------------------------------------------------------
    def key_norms(self, keys: Tensor) -> Tensor:
        """``n_g``: the Frobenius norm of key head ``g`` over tokens and head width, summed over the batch (and
        over DDP ranks in training)."""
        norms = keys.detach().float().norm(dim=(2, 3)).sum(dim=0)
        if self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(norms)
        return norms

    def current_allocation(self, keys: Tensor) -> Tensor:
        """The allocation for this forward (updating the DGQA state in training)."""
        if self.kind == "kdgqa":
            self.allocation.copy_(key_driven_allocation(self.key_norms(keys), self.num_heads))
        elif self.kind.startswith("dgqa") and self.training:
            if int(self.training_forwards) % self.window_size == 0:
                norms = self.key_norms(keys)
                if self.kind == "dgqa_diff":
                    scores = (self.norm_cache - norms).abs()
                else:
                    scores = DGQA_EMA_DECAY * norms + (1 - DGQA_EMA_DECAY) * self.norm_cache
                self.allocation.copy_(key_driven_allocation(scores, self.num_heads))
                self.norm_cache.copy_((self.norm_cache + norms) / self.window_size)
            self.training_forwards += 1
        return self.allocation

    # -- forward -------------------------------------------------------------------------------------------------
    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False, **_: Any) -> Tensor:
        batch, count, _dim = x.shape
        queries = self.q(x).reshape(batch, count, self.num_heads, self.head_dim).transpose(1, 2)
        keys = self.k(x).reshape(batch, count, self.num_kv_heads, self.head_dim).transpose(1, 2)
        values = self.v(x).reshape(batch, count, self.num_kv_heads, self.head_dim).transpose(1, 2)
        allocation = self.current_allocation(keys)
        group_of_head = torch.repeat_interleave(
            torch.arange(self.num_kv_heads, device=x.device), allocation.to(x.device), output_size=self.num_heads
        )
        out = F.scaled_dot_product_attention(
            queries, keys[:, group_of_head], values[:, group_of_head], attn_mask=attn_mask, is_causal=is_causal
        )
        if self.kind == "pgqa" and (self.training or self.perturb_in_eval):
            out = out - matched_noise(out)
        return self.proj(out.transpose(1, 2).reshape(batch, count, -1))

    @classmethod
    def from_multi_head(
        cls, attention: Attention, num_kv_heads: int, kind: AttentionKind = "gqa", **kwargs: Any
    ) -> GroupedQueryAttention:
        """Convert timm's multi-head ``Attention`` (fused ``qkv``): queries copied, each key/value head the mean of
        ``H / G`` consecutive heads' projections (Ainslie et al., arXiv:2305.13245), output projection copied."""
        qkv = attention.qkv
        dim, num_heads = qkv.in_features, attention.num_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads ({num_kv_heads}) must divide the {num_heads} heads to convert.")
        if not isinstance(attention.q_norm, nn.Identity) or not isinstance(attention.norm, nn.Identity):
            raise ValueError("attention with q/k norm or scale norm cannot be converted")
        converted = cls(dim, num_heads, num_kv_heads, kind=kind, qkv_bias=qkv.bias is not None, **kwargs)
        converted.to(device=qkv.weight.device, dtype=qkv.weight.dtype)
        head_dim, per_group = dim // num_heads, num_heads // num_kv_heads

        def pool(rows: Tensor) -> Tensor:  # (H * hd, ...) -> (G * hd, ...): mean over consecutive heads of a group
            grouped = rows.reshape(num_kv_heads, per_group, head_dim, *rows.shape[1:])
            return grouped.mean(dim=1).reshape(num_kv_heads * head_dim, *rows.shape[1:])

        with torch.no_grad():
            q_weight, k_weight, v_weight = qkv.weight.chunk(3, dim=0)
            converted.q.weight.copy_(q_weight)
            converted.k.weight.copy_(pool(k_weight))
            converted.v.weight.copy_(pool(v_weight))
            if qkv.bias is not None:
                q_bias, k_bias, v_bias = qkv.bias.chunk(3)
                converted.q.bias.copy_(q_bias)
                converted.k.bias.copy_(pool(k_bias))
                converted.v.bias.copy_(pool(v_bias))
            converted.proj.load_state_dict(attention.proj.state_dict())
        return converted


def matched_noise(out: Tensor) -> Tensor:
    """PGQA's noise for attention outputs ``(B, heads, N, hd)``: U[0, 1) with the diagonal (token i, feature i) set to
    0, standardised per row and rescaled to the mean and standard deviation of the same row of ``out``."""
    noise = torch.rand_like(out)
    diagonal = min(out.shape[-2], out.shape[-1])
    index = torch.arange(diagonal, device=out.device)
    noise[..., index, index] = 0.0
    noise = (noise - noise.mean(-1, keepdim=True)) / noise.std(-1, keepdim=True).clamp_min(1e-6)
    return noise * out.detach().std(-1, keepdim=True) + out.detach().mean(-1, keepdim=True)


def convert_to_grouped_query(model: nn.Module, num_kv_heads: int, kind: AttentionKind = "gqa", **kwargs: Any) -> int:
    """Replace every timm ``Attention`` inside ``model`` by its :meth:`GroupedQueryAttention.from_multi_head`
    conversion (in place); returns how many were converted (``kwargs`` go to the new modules)."""
    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, Attention)]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, GroupedQueryAttention.from_multi_head(module, num_kv_heads, kind, **kwargs))
    return len(targets)


class KDGQAViT(ViT):
    """A :class:`~lit_methods.nets.ViT` whose attention layers are :class:`GroupedQueryAttention` (KDGQA,
    https://arxiv.org/abs/2408.08454): the ViT is built, then every multi-head attention is converted (mean-pooled
    key/value heads, as for up-training a pre-trained ViT; here weights are random unless loaded).

    Args:
        num_kv_heads: key/value heads per layer.
        attention: ``"gqa"``, ``"kdgqa"``, ``"dgqa_diff"``, ``"dgqa_ema"`` or ``"pgqa"``.
        window_size: DGQA's window in training forward passes.
        perturb_in_eval: PGQA's noise also in evaluation (the official code's behaviour).
        **kwargs: the arguments of :class:`~lit_methods.nets.ViT`.
    """

    slug: ClassVar[str] = "kdgqa"

    def __init__(
        self,
        num_kv_heads: int = 3,
        attention: AttentionKind = "kdgqa",
        window_size: int = 300,
        perturb_in_eval: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_choice("attention", attention, ATTENTION_KINDS)
        convert_to_grouped_query(
            self.encoder, num_kv_heads, attention, window_size=window_size, perturb_in_eval=perturb_in_eval
        )


# The paper up-trains ViT-S/B/L (6/12/16 heads) with half as many key/value heads; these are their CIFAR-sized
# counterparts with 4x4 patches (DeiT-Ti/S widths, https://arxiv.org/abs/2012.12877). Only the tiny one is in the nets
# registry (its contract tests build every registered net on a CPU).
@register_net("kdgqa_vit_tiny_patch4")
def kdgqa_vit_tiny_patch4(**kwargs: Any) -> KDGQAViT:
    """KDGQA ViT-Ti/4: 12 blocks, width 192, 6 query heads (of width 32) over 3 key/value heads."""
    return KDGQAViT(**({"patch_size": 4, "embed_dim": 192, "depth": 12, "num_heads": 6, "num_kv_heads": 3} | kwargs))


def kdgqa_vit_small_patch4(**kwargs: Any) -> KDGQAViT:
    """KDGQA ViT-S/4: 12 blocks, width 384, 6 query heads over 3 key/value heads."""
    return KDGQAViT(**({"patch_size": 4, "embed_dim": 384, "depth": 12, "num_heads": 6, "num_kv_heads": 3} | kwargs))
