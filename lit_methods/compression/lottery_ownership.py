"""A sparse network (lottery ticket) that carries its owner's signature in its mask's kernel connectivity.

Chen, Chen, Zhang, Wang, NeurIPS 2021, https://arxiv.org/abs/2111.00162 (official code:
github.com/VITA-Group/NO-stealing-LTH).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from lit_methods.base import ImageClassifier
from lit_methods.compression.common import MaskedLayers, log_sparsity
from lit_methods.pruning.ownership import (
    bit_match,
    deterministic_signature,
    embed_signature,
    extract_signature,
    extreme_path_prune,
    qr_signature,
)
from lit_methods.pruning.rate_distortion import magnitude_mask

__all__ = ["LotteryOwnership"]

PRUNABLE_TYPES = (nn.Conv2d, nn.Linear)


class LotteryOwnership(MaskedLayers, ImageClassifier):
    """Masked training of a sparse network whose mask carries an ownership signature (Chen et al.,
    https://arxiv.org/abs/2111.00162, the embedded-signature scheme, with the extreme-ticket path pruning).

    At the start of a fresh fit: every conv/linear weight gets a mask with ``sparsity`` (layer-wise magnitude, the
    shape of an IMP ticket's mask, or ``"random"``), optionally ``path_prune_paths`` random paths of whole kernels are
    removed from the chain of conv layers named in ``path_layers`` (:func:`lit_methods.pruning.extreme_path_prune`),
    and the signature is written into the kernel connectivity of ``signature_layer``
    (:func:`lit_methods.pruning.embed_signature`: the layer's kept-weight count is unchanged). Training then keeps the
    masks applied (masked gradients are zeroed, weights re-masked after every step). :meth:`verify` extracts the
    window from a weight (nonzero means kept) and returns the share of bits matching the signature.

    The signature is a seeded ``signature_size x signature_size`` binary code (``"deterministic"``) or a QR code
    (version 3, 29 x 29, of ``payload``; needs the optional ``qrcode`` package; its fixed patterns are not counted).
    Masks, the code and the window's offset are buffers (in the checkpoint). Logged per epoch: ``ownership/bits``
    (match of the current weights) and the pruned share per layer (``ownership/layers/*`` and a bar-chart PNG).
    Under DDP the masks are drawn from a seeded generator, identical on every rank.

    Args:
        backbone: the network.
        signature_layer: backbone name of the conv layer carrying the signature (at least ``signature_size`` input
            and output channels).
        signature: ``"deterministic"`` or ``"qr"``.
        signature_size: side of the deterministic code.
        payload: the QR code's text.
        sparsity: share of each layer's weights removed by the initial mask, in (0, 1).
        initial_mask: ``"magnitude"`` (smallest weights of each layer) or ``"random"``.
        path_prune_paths: paths removed by extreme path pruning (official ResNet-20: 1000; 0: none).
        path_layers: backbone names of the chain of conv layers for path pruning.
        seed: seed of every random draw of the masks and the code.
        **kwargs: the arguments of :class:`~lit_methods.ImageClassifier`.
    """

    slug: ClassVar[str] = "lottery-ownership"

    def __init__(
        self,
        backbone: nn.Module,
        signature_layer: str,
        signature: Literal["deterministic", "qr"] = "deterministic",
        signature_size: int = 16,
        payload: str = "signature",
        sparsity: float = 0.7,
        initial_mask: Literal["magnitude", "random"] = "magnitude",
        path_prune_paths: int = 0,
        path_layers: list[str] | None = None,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        if not 0.0 < sparsity < 1.0:
            raise ValueError(f"sparsity must lie in (0, 1), got {sparsity}")
        if signature not in ("deterministic", "qr"):
            raise ValueError(f"signature must be 'deterministic' or 'qr', got {signature!r}")
        if initial_mask not in ("magnitude", "random"):
            raise ValueError(f"initial_mask must be 'magnitude' or 'random', got {initial_mask!r}")
        if not isinstance(path_prune_paths, int) or path_prune_paths < 0:
            raise ValueError(f"path_prune_paths must be an int >= 0, got {path_prune_paths!r}")
        super().__init__(backbone, **kwargs)
        modules = dict(backbone.named_modules())
        path_layers = list(path_layers or [])
        for name in [signature_layer, *path_layers]:
            if not isinstance(modules.get(name), nn.Conv2d):
                raise ValueError(f"{name!r} is not a conv layer of {type(backbone).__name__}")
        if path_prune_paths and not path_layers:
            raise ValueError("path_prune_paths > 0 needs path_layers (the chain of conv layers to prune paths through)")
        if signature == "qr":
            code, payload_mask = qr_signature(payload)
        else:
            code = deterministic_signature(signature_size, seed)
            payload_mask = torch.ones_like(code)
        size = code.shape[0]
        layer = modules[signature_layer]
        if min(layer.in_channels, layer.out_channels) < size:
            raise ValueError(
                f"signature_layer {signature_layer!r} has {layer.out_channels}x{layer.in_channels} kernels, fewer than "
                f"the {size}x{size} code"
            )
        self.signature_layer = signature_layer
        self.sparsity_target = sparsity
        self.initial_mask = initial_mask
        self.path_prune_paths = path_prune_paths
        self.path_layers = path_layers
        self.seed = seed
        self.init_masks([n for n, m in modules.items() if isinstance(m, PRUNABLE_TYPES)])
        self.register_buffer("code", code)
        self.register_buffer("payload_mask", payload_mask)
        self.register_buffer("offset", torch.full((2,), -1, dtype=torch.long))

    # -- masks -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def build_masks(self) -> None:
        """Initial masks, path pruning and the embedded signature (what a fresh fit starts with)."""
        generator = torch.Generator().manual_seed(self.seed)
        weights, masks = self.weights(), self.mask_dict()
        for name, weight in weights.items():
            if self.initial_mask == "random":
                scores = torch.rand(weight.shape, generator=generator).to(weight.device)
                masks[name].copy_(magnitude_mask(scores, self.sparsity_target))
            else:
                masks[name].copy_(magnitude_mask(weight, self.sparsity_target))
        if self.path_prune_paths:
            pruned = extreme_path_prune(
                [weights[n].cpu() for n in self.path_layers], [masks[n].cpu() for n in self.path_layers],
                self.path_prune_paths, generator,
            )
            for name, mask in zip(self.path_layers, pruned):
                masks[name].copy_(mask)
        name = self.signature_layer
        embedded, offset = embed_signature(masks[name].cpu(), weights[name].cpu(), self.code.cpu(), generator,
                                           self.payload_mask.cpu())
        masks[name].copy_(embedded)
        self.offset.copy_(torch.tensor(offset))
        self.apply_masks()

    def verify(self, weight_or_mask: Tensor | None = None) -> float:
        """Share of the signature's bits in the connectivity of ``weight_or_mask`` (default: the signature layer's
        current weight) at the embedding offset."""
        if int(self.offset[0]) < 0:
            raise ValueError("no signature was embedded yet (it is embedded when fit starts)")
        source = self.weights()[self.signature_layer] if weight_or_mask is None else weight_or_mask
        extracted = extract_signature(source.detach(), self.offset.tolist(), self.code.shape[0])
        return bit_match(extracted, self.code, self.payload_mask)

    # -- training ------------------------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        if int(self.offset[0]) < 0:  # a fresh run; a resumed one restored its masks and offset
            self.build_masks()
        self.apply_masks()

    def on_train_epoch_end(self) -> None:
        self.log("ownership/bits", self.verify())
        log_sparsity(self, self.layer_sparsity(), "ownership/layers")
