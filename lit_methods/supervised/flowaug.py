"""FlowAug, the semantic augmentation of Chiu, Chen & Ma, "Better May Not Be Fairer: A Study on Subgroup
Discrepancy in Image Classification", ICCV 2023 (arXiv:2212.08649).

An image is encoded by a multi-scale Glow into one latent per level; the coarsest latent (the object's shape) is
kept and the finer latents (colour, texture, background statistics) are redrawn from the flow's prior at a
temperature, then decoded. The flow comes from :class:`FlowPretraining` (maximum likelihood on the classifier's own
training images); no pre-trained CIFAR Glow is downloadable here, so the paper's exact flow weights are not part of
this package. Flow blocks come from ``normflows`` (``pip install 'lit-methods[flows]'``).

Measured on digits with red/blue backgrounds (``tests/supervised/test_flowaug.py``): a trained 2- or 3-level Glow
carries the global background colour in its coarse latent (swapping it moves the background 91-98% of the way to the
other colour, the finer latents 1-9%), so redrawing the finer levels does not repaint backgrounds, and FlowAug did
not lower MacroStd on colour-shifted digits. The paper's claim (CIFAR10-B) is not reproduced at this scale.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lit_methods.base import MethodBase, drop_object_hyperparameters
from lit_methods.datamodules.batch import as_batch
from lit_methods.datamodules.normalization import Normalize

__all__ = ["FlowAug", "FlowPretraining", "build_glow"]


def _normflows() -> Any:
    try:
        import normflows
    except ImportError as error:  # pragma: no cover - exercised only without the extra
        raise ImportError("FlowAug needs normflows: pip install 'lit-methods[flows]'") from error
    return normflows


def build_glow(
    in_channels: int,
    image_size: int,
    num_levels: int = 3,
    blocks_per_level: int = 8,
    hidden_channels: int = 128,
) -> nn.Module:
    """An unconditional multi-scale Glow (Kingma & Dhariwal, arXiv:1807.03039) from ``normflows``' blocks.

    Level 0 is the coarsest latent (``in_channels * 2**(L+1)`` channels at ``image_size / 2**L``); level ``i > 0``
    is the latent split off at resolution ``image_size / 2**(L-i)``. Every latent has a learnable diagonal
    Gaussian prior. Inputs live in ``[0, 1]``.
    """
    nf = _normflows()
    if num_levels < 1 or blocks_per_level < 1 or hidden_channels < 1:
        raise ValueError(
            f"num_levels, blocks_per_level and hidden_channels must be >= 1, got {num_levels}, "
            f"{blocks_per_level}, {hidden_channels}"
        )
    if image_size % 2**num_levels:
        raise ValueError(f"image_size={image_size} must be divisible by 2**num_levels={2**num_levels}")
    priors, flows, merges = [], [], []
    for level in range(num_levels):
        channels = in_channels * 2 ** (num_levels + 1 - level)
        flows.append([nf.flows.GlowBlock(channels, hidden_channels) for _ in range(blocks_per_level)])
        flows[-1].append(nf.flows.Squeeze())
        if level == 0:
            shape = (channels, image_size // 2**num_levels, image_size // 2**num_levels)
        else:
            merges.append(nf.flows.Merge())
            scale = 2 ** (num_levels - level)
            shape = (in_channels * scale, image_size // scale, image_size // scale)
        priors.append(nf.distributions.DiagGaussian(shape))
    return nf.MultiscaleFlow(priors, flows, merges, class_cond=False)


class FlowPretraining(MethodBase):
    """Trains the Glow that :class:`FlowAug` uses, by maximum likelihood on a datamodule's training images.

    Batches come normalized by the datamodule: they are mapped back to ``[0, 1]`` with ``mean``/``std`` (filled
    from the datamodule by the CLI), dequantized with uniform noise, and the loss is the negative log-likelihood
    in bits per dimension of 8-bit images (``train/bpd``, ``val/bpd``). Adam with warmup then cosine decay by
    default, or the injected ``optimizer`` and ``lr_scheduler`` (:class:`~lit_methods.base.MethodBase`).

    Args:
        in_channels: image channels (filled from the datamodule by the CLI).
        image_size: image side (filled from the datamodule by the CLI).
        mean: per-channel normalization mean of the batches.
        std: per-channel normalization standard deviation of the batches.
        num_levels: Glow levels (multi-scale splits).
        blocks_per_level: Glow blocks per level.
        hidden_channels: width of the coupling networks.
        lr: Adam learning rate.
        warmup_steps: linear warmup in optimizer steps (at most all of them).
        optimizer: replaces the default Adam; called with the parameter groups (``class_path`` from the CLI).
        lr_scheduler: replaces the warmup-cosine schedule; called with the optimizer.
    """

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int | Sequence[int] = 32,
        mean: Sequence[float] = (0.0,),
        std: Sequence[float] = (1.0,),
        num_levels: int = 3,
        blocks_per_level: int = 8,
        hidden_channels: int = 128,
        lr: float = 1e-3,
        warmup_steps: int = 200,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(
            lr=lr,
            weight_decay=0.0,
            warmup_steps=warmup_steps,
            exclude_norm_and_bias_from_weight_decay=False,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
        )
        self.save_hyperparameters()
        drop_object_hyperparameters(self)
        side = image_size if isinstance(image_size, int) else image_size[0]
        if not isinstance(image_size, int) and len(set(image_size)) != 1:
            raise ValueError(f"the flow needs square images, got image_size={tuple(image_size)}")
        self.flow = build_glow(in_channels, side, num_levels, blocks_per_level, hidden_channels)
        self.data_normalization = _per_channel_normalize(mean, std, in_channels)

    def bits_per_dim(self, images: Tensor) -> Tensor:
        """Mean negative log-likelihood of dequantized 8-bit ``images`` (in ``[0, 1]``), in bits per dimension."""
        dequantized = (images * 255.0 + torch.rand_like(images)) / 256.0
        dims = images[0].numel()
        nll = -self.flow.log_prob(dequantized, None)
        return (nll.mean() / dims + math.log(256.0)) / math.log(2.0)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self.bits_per_dim(self.data_normalization.inverse(as_batch(batch)["inputs"]))
        self.log("train/bpd", loss, on_step=True, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        bits_per_dim = self.bits_per_dim(self.data_normalization.inverse(as_batch(batch)["inputs"]))
        self.log("val/bpd", bits_per_dim, on_epoch=True, sync_dist=True)

    def make_default_optimizer(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        """Adam at ``lr`` (the flow's default optimizer)."""
        return torch.optim.Adam(groups, lr=self.lr)


def _per_channel_normalize(mean: Sequence[float], std: Sequence[float], in_channels: int) -> Normalize:
    """A :class:`~lit_methods.datamodules.Normalize` of ``in_channels`` channels; one value serves every channel."""
    values = {"mean": list(mean), "std": list(std)}
    for name, given in values.items():
        if len(given) not in (1, in_channels):
            raise ValueError(f"mean={list(mean)} and std={list(std)} need 1 or in_channels={in_channels} values")
        if len(given) == 1:
            values[name] = given * in_channels
    if any(value <= 0 for value in values["std"]):
        raise ValueError(f"std must be > 0, got {list(std)}")
    return Normalize(values["mean"], values["std"])


class FlowAug(nn.Module):
    """Redraws the finer latents of a trained Glow to change an image's colour and texture, not its shape.

    For each image picked with probability ``p``: ``z = flow.encode(x)``; the ``levels_to_resample`` finest
    latents are replaced by ``loc + temperature * exp(log_scale) * eps`` of their priors (``temperature=0``
    puts them at the prior mean); the coarse latents are kept; the decoded image (clamped to ``[0, 1]``, the
    flow's image range) replaces ``x``; an image whose decoding is not finite (latents drawn far into a poorly
    trained flow's tails) stays as it was and is counted in ``num_non_finite``. Inputs and outputs are normalized with ``mean``/``std`` like the
    datamodule's batches. Without gradient; the flow stays frozen in eval mode.

    Args:
        flow_checkpoint: a :class:`FlowPretraining` checkpoint; give this or ``flow``.
        flow: a ``normflows.MultiscaleFlow`` with diagonal Gaussian priors (e.g. from :func:`build_glow`).
        levels_to_resample: how many of the finest levels to redraw (``1 .. num_levels - 1``; level 0 is kept).
        temperature: scale of the redrawn latents' noise (``>= 0``).
        p: probability that an image is augmented.
        mean: per-channel normalization mean of the batches (filled from the datamodule by the CLI).
        std: per-channel normalization standard deviation of the batches.
    """

    def __init__(
        self,
        flow_checkpoint: str | None = None,
        flow: nn.Module | None = None,
        levels_to_resample: int = 1,
        temperature: float = 0.7,
        p: float = 0.5,
        mean: Sequence[float] = (0.0,),
        std: Sequence[float] = (1.0,),
    ) -> None:
        super().__init__()
        if (flow_checkpoint is None) == (flow is None):
            raise ValueError("give exactly one of flow_checkpoint and flow")
        if flow_checkpoint is not None:
            flow = FlowPretraining.load_from_checkpoint(flow_checkpoint, map_location="cpu").flow
        assert flow is not None
        priors = list(getattr(flow, "q0", []))
        if not priors or not all(hasattr(q, "loc") and hasattr(q, "log_scale") for q in priors):
            raise ValueError(f"{type(flow).__name__} is not a multi-scale flow with diagonal Gaussian priors (q0)")
        if not 1 <= levels_to_resample < len(priors):
            raise ValueError(f"levels_to_resample must lie in [1, {len(priors) - 1}], got {levels_to_resample}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must lie in [0, 1], got {p}")
        self.flow = flow.eval().requires_grad_(False)
        self.levels_to_resample = levels_to_resample
        self.temperature = temperature
        self.p = p
        self.num_non_finite = 0
        in_channels = int(priors[0].loc.shape[1]) // 2 ** (len(priors) + 1)
        self.data_normalization = _per_channel_normalize(mean, std, in_channels)

    def train(self, mode: bool = True) -> FlowAug:
        super().train(mode)
        self.flow.eval()  # ActNorm and friends never change mode: the flow is a fixed transform
        return self

    def encode(self, images: Tensor) -> list[Tensor]:
        """Latents per level (coarsest first) of ``images`` in ``[0, 1]``."""
        return self.flow.inverse_and_log_det(images)[0]

    def decode(self, latents: list[Tensor]) -> Tensor:
        """Images in ``[0, 1]`` (not clamped) from latents per level."""
        return self.flow.forward_and_log_det(latents)[0]

    def resample(self, latents: list[Tensor]) -> list[Tensor]:
        """The latents with the ``levels_to_resample`` finest levels redrawn from their priors."""
        fine = range(len(latents) - self.levels_to_resample, len(latents))
        out = list(latents)
        for level in fine:
            prior = self.flow.q0[level]
            noise = torch.randn_like(latents[level])
            out[level] = (prior.loc + self.temperature * prior.log_scale.exp() * noise).expand_as(latents[level])
        return out

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        picked = torch.rand(images.shape[0], device=images.device) < self.p
        if not picked.any():
            return images
        unit = self.data_normalization.inverse(images[picked]).clamp(0.0, 1.0)
        augmented = self.decode(self.resample(self.encode(unit)))
        finite = augmented.flatten(1).isfinite().all(dim=1)
        self.num_non_finite += int((~finite).sum())
        augmented = torch.where(finite[:, None, None, None], augmented.clamp(0.0, 1.0), unit)
        out = images.clone()
        out[picked] = self.data_normalization(augmented).to(images.dtype)
        return out
