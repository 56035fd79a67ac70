"""Ghost batch normalization: batch norm whose training statistics come from small virtual batches.

Hoffer, Hubara & Soudry, "Train longer, generalize better: closing the generalization gap in large batch training
of neural networks", NeurIPS 2017, https://arxiv.org/abs/1705.08741 (section 4, "Ghost Batch Normalization").

A large batch of ``B`` samples is split into virtual ("ghost") batches of ``virtual_batch_size`` samples; in
training each virtual batch is normalized with its own mean and variance, and all share the affine ``weight`` and
``bias``. In eval mode the layer is ordinary batch norm with the running statistics.

Which samples share a virtual batch: with ``K = B // virtual_batch_size``, sample ``i`` of the first
``K * virtual_batch_size`` samples belongs to virtual batch ``i % K`` (an interleaved split: the batch is viewed as
``(virtual_batch_size, K, C, ...)``); the remaining ``B % virtual_batch_size`` samples, if any, form one smaller
virtual batch of their own. For a shuffled batch the interleaved split is distributed exactly like cutting the batch
into consecutive chunks, and it lets the layer run PyTorch's fused batch-norm kernel on a free view of the input
(one call for all virtual batches; consecutive chunks need two transposed copies, 2.3x slower forward+backward on
CPU). A virtual batch holding a single value per channel (e.g. a 1-sample remainder of a ``BatchNorm1d`` input) is
rejected, like ``nn.BatchNorm`` rejects such a batch.

Running statistics are updated once per forward (once per optimizer step without gradient accumulation), with the
usual momentum rule, from the size-weighted mean over the virtual batches of their means (which is the batch mean)
and of their unbiased variances::

    running_mean <- (1 - momentum) * running_mean + momentum * sum_k (n_k / B) * mean_k
    running_var  <- (1 - momentum) * running_var  + momentum * sum_k (n_k / B) * unbiased_var_k

The official code (``eladhoffer/bigBatch``, ``main_gbn.py``) runs the network once per chunk instead, so its running
statistics take ``K`` momentum updates per step; the rule above keeps the running statistics' time constant in steps
that of plain batch norm. ``momentum=None`` (cumulative average) uses ``1 / num_batches_tracked`` as in PyTorch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["GhostBatchNorm1d", "GhostBatchNorm2d", "convert_to_ghost_batchnorm"]


def check_virtual_batch_size(virtual_batch_size: int) -> None:
    """Raise ``ValueError`` naming ``virtual_batch_size`` unless it is an integer >= 1."""
    if (
        isinstance(virtual_batch_size, bool)
        or not isinstance(virtual_batch_size, int)
        or virtual_batch_size < 1
    ):
        raise ValueError(
            f"virtual_batch_size must be an integer >= 1, got {virtual_batch_size!r}"
        )


class _GhostBatchNorm(nn.modules.batchnorm._BatchNorm):
    """The training forward shared by :class:`GhostBatchNorm1d` and :class:`GhostBatchNorm2d`."""

    def __init__(
        self,
        num_features: int,
        *,
        virtual_batch_size: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        bias: bool = True,
    ) -> None:
        check_virtual_batch_size(virtual_batch_size)
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            device=device,
            dtype=dtype,
            bias=bias,
        )
        self.virtual_batch_size = virtual_batch_size

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"

    def forward(self, input: Tensor) -> Tensor:
        uses_batch_statistics = self.training or (
            self.running_mean is None and self.running_var is None
        )
        if not uses_batch_statistics:
            return super().forward(
                input
            )  # eval: plain batch norm with the running statistics
        self._check_input_dim(input)
        batch_size = input.shape[0]
        num_full = batch_size // self.virtual_batch_size
        remainder = batch_size - num_full * self.virtual_batch_size
        values_per_sample = math.prod(input.shape[2:])
        for size in (self.virtual_batch_size if num_full else 0, remainder):
            if size * values_per_sample == 1:
                raise ValueError(
                    f"a batch of {batch_size} with virtual_batch_size={self.virtual_batch_size} leaves a virtual batch "
                    f"of {size} sample with one value per channel, which has no variance; use another batch size, "
                    "drop_last=True in the data loader, or another virtual_batch_size"
                )
        # split only a ragged batch: the backward of a slice writes a full-size zero gradient first
        full, rest = (
            input.split([num_full * self.virtual_batch_size, remainder])
            if remainder
            else (input, None)
        )
        parts = []
        if num_full:
            parts.append(self._normalize_interleaved(full, num_full))
        if remainder:
            parts.append(self._normalize_interleaved(rest, 1))
        outputs = [output for output, _, _ in parts]
        if self.training and self.track_running_stats:
            self._update_running_stats(parts, batch_size)
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def _normalize_interleaved(
        self, x: Tensor, groups: int
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Normalize ``x`` split into ``groups`` interleaved virtual batches in one fused batch-norm call.

        Viewing ``(groups * m, C, ...)`` as ``(m, groups * C, ...)`` makes each (virtual batch, channel) pair one
        channel of an ordinary batch norm. Returns the output and, when tracking, the per-group means and unbiased
        variances (shape ``(groups, C)``), read from fresh running buffers updated with momentum 1.
        """
        channels = self.num_features
        per_group = x.shape[0] // groups
        group_mean = group_var = None
        if self.training and self.track_running_stats:
            group_mean = self.running_mean.new_zeros(groups * channels)
            group_var = self.running_var.new_zeros(groups * channels)
        weight = self.weight.repeat(groups) if self.weight is not None else None
        bias = self.bias.repeat(groups) if self.bias is not None else None
        output = F.batch_norm(
            x.reshape(per_group, groups * channels, *x.shape[2:]),
            group_mean,
            group_var,
            weight,
            bias,
            training=True,
            momentum=1.0,
            eps=self.eps,
        ).reshape(x.shape)
        if group_mean is None:
            return output, None, None
        return (
            output,
            group_mean.view(groups, channels),
            group_var.view(groups, channels),
        )

    @torch.no_grad()
    def _update_running_stats(
        self, parts: list[tuple[Tensor, Tensor, Tensor]], batch_size: int
    ) -> None:
        self.num_batches_tracked.add_(1)
        factor = (
            1.0 / float(self.num_batches_tracked)
            if self.momentum is None
            else self.momentum
        )
        mean = (
            sum(
                means.sum(0) * (output.shape[0] / means.shape[0])
                for output, means, _ in parts
            )
            / batch_size
        )
        var = sum(
            variances.sum(0) * (output.shape[0] / variances.shape[0])
            for output, _, variances in parts
        )
        self.running_mean.mul_(1.0 - factor).add_(mean, alpha=factor)
        self.running_var.mul_(1.0 - factor).add_(var / batch_size, alpha=factor)


class GhostBatchNorm1d(_GhostBatchNorm, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` over virtual batches of ``virtual_batch_size`` samples in training (Hoffer et al. 2017,
    https://arxiv.org/abs/1705.08741); inputs ``(N, C)`` or ``(N, C, L)``.

    Same parameters and buffers as ``nn.BatchNorm1d`` (a BatchNorm1d state dict loads into it); the other arguments
    are those of ``nn.BatchNorm1d``. See the module docstring for the split and the running-statistics rule.
    """


class GhostBatchNorm2d(_GhostBatchNorm, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` over virtual batches of ``virtual_batch_size`` samples in training (Hoffer et al. 2017,
    https://arxiv.org/abs/1705.08741); inputs ``(N, C, H, W)``.

    Same parameters and buffers as ``nn.BatchNorm2d`` (a BatchNorm2d state dict loads into it); the other arguments
    are those of ``nn.BatchNorm2d``. See the module docstring for the split and the running-statistics rule.
    """


_GHOST_OF = {nn.BatchNorm1d: GhostBatchNorm1d, nn.BatchNorm2d: GhostBatchNorm2d}


def convert_to_ghost_batchnorm(module: nn.Module, virtual_batch_size: int) -> nn.Module:
    """Replace every ``nn.BatchNorm1d``/``nn.BatchNorm2d`` in ``module`` (itself included) by its ghost version.

    Like ``nn.SyncBatchNorm.convert_sync_batchnorm``: children are replaced in place, the converted layers keep the
    same parameter and buffer objects (so an optimizer built before still holds them, and state-dict keys do not
    change), and the converted module is returned. Layers that already are ghost batch norms are left as they are;
    other norms (``BatchNorm3d``, ``SyncBatchNorm``, ...) are not touched.
    """
    check_virtual_batch_size(virtual_batch_size)
    ghost_class = None
    if not isinstance(module, _GhostBatchNorm):
        ghost_class = next(
            (ghost for plain, ghost in _GHOST_OF.items() if isinstance(module, plain)),
            None,
        )
    converted = module
    if ghost_class is not None:
        converted = ghost_class(
            module.num_features,
            virtual_batch_size=virtual_batch_size,
            eps=module.eps,
            momentum=module.momentum,
            affine=module.affine,
            track_running_stats=module.track_running_stats,
            bias=module.bias is not None,
        )
        converted.weight, converted.bias = module.weight, module.bias
        converted.running_mean, converted.running_var = (
            module.running_mean,
            module.running_var,
        )
        converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
    for name, child in module.named_children():
        converted.add_module(
            name, convert_to_ghost_batchnorm(child, virtual_batch_size)
        )
    return converted
