"""Ownership signatures in the sparse topology of a lottery ticket: embedding, extraction and path pruning.

Chen, Chen, Zhang, Wang, "You are caught stealing my winning lottery ticket! Making a lottery ticket claim its
ownership", NeurIPS 2021, https://arxiv.org/abs/2111.00162; after the official ``ownership_utils.py`` and
``pruning_utils_unprune.py`` (github.com/VITA-Group/NO-stealing-LTH) as summarised in the project's card. The
signature is a binary matrix written into the *kernel connectivity* of one conv layer: ``C[o, i] = 1`` when any weight
of kernel ``(o, i)`` is kept.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "bit_match",
    "connectivity",
    "deterministic_signature",
    "embed_signature",
    "extract_signature",
    "extreme_path_prune",
    "qr_signature",
]


def deterministic_signature(size: int, seed: int = 0) -> Tensor:
    """A ``size x size`` boolean code with independent fair bits drawn from a generator seeded with ``seed``."""
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(size, size, generator=generator) < 0.5


def qr_signature(payload: str = "signature") -> tuple[Tensor, Tensor]:
    """The QR code (version 3, error correction H, one pixel per module, no border: 29 x 29) of ``payload`` and the
    mask of its payload modules (False on the finder patterns with separators, alignment pattern, timing lines and
    dark module, which every version-3 code shares and extraction re-inserts). Needs the ``qrcode`` package."""
    try:
        import qrcode
    except ImportError as error:  # an optional dependency
        raise ImportError("qr_signature needs the qrcode package (pip install qrcode)") from error
    code = qrcode.QRCode(version=3, error_correction=qrcode.constants.ERROR_CORRECT_H, box_size=1, border=0)
    code.add_data(payload)
    code.make(fit=False)
    bits = torch.tensor(code.get_matrix(), dtype=torch.bool)
    size = bits.shape[0]
    payload_mask = torch.ones(size, size, dtype=torch.bool)
    payload_mask[:9, :9] = False  # finder patterns with their separators and format areas
    payload_mask[:9, -8:] = False
    payload_mask[-8:, :9] = False
    payload_mask[20:25, 20:25] = False  # alignment pattern of version 3
    payload_mask[6, :] = False  # timing lines
    payload_mask[:, 6] = False
    return bits, payload_mask


def connectivity(mask: Tensor) -> Tensor:
    """``C[o, i]``: whether any weight of kernel ``(o, i)`` of a conv mask ``(O, I, kh, kw)`` is kept."""
    return mask.flatten(2).amax(2) > 0


def extract_signature(mask: Tensor, offset: Sequence[int], size: int) -> Tensor:
    """The ``size x size`` window of the connectivity of ``mask`` (a conv mask or weight: nonzero means kept) at
    ``offset = (row, column)``."""
    row, column = offset
    return connectivity((mask != 0).float())[row : row + size, column : column + size]


def bit_match(extracted: Tensor, code: Tensor, payload_mask: Tensor | None = None) -> float:
    """Share of the code's (payload) bits that ``extracted`` reproduces."""
    same = extracted.bool() == code.bool()
    return float(same[payload_mask].float().mean() if payload_mask is not None else same.float().mean())


@torch.no_grad()
def embed_signature(
    mask: Tensor, weight: Tensor, code: Tensor, generator: torch.Generator, payload_mask: Tensor | None = None
) -> tuple[Tensor, tuple[int, int]]:
    """Write ``code`` into the kernel connectivity of a conv ``mask`` ``(O, I, kh, kw)``; returns the new mask and the
    window's offset.

    The window is placed where the connectivity already agrees most with the code. A 1-bit on an empty kernel turns
    on one random weight of it; a 0-bit on a connected kernel removes the whole kernel (bits outside ``payload_mask``
    are left alone). The layer's count of kept weights is then restored exactly, outside the window: weights of
    largest ``|weight|`` come back, or kept weights of smallest ``|weight|`` go.
    """
    out_channels, in_channels = mask.shape[:2]
    size = code.shape[0]
    if code.shape != (size, size) or size > min(out_channels, in_channels):
        raise ValueError(
            f"a {tuple(code.shape)} code does not fit the {out_channels}x{in_channels} kernel map of the layer"
        )
    payload = torch.ones_like(code, dtype=torch.bool) if payload_mask is None else payload_mask.bool()
    connected = connectivity(mask).float()
    signed = (code.float() * 2 - 1) * payload.float()  # +1 wants connected, -1 wants empty, 0 free
    agreement = F.conv2d((connected * 2 - 1)[None, None], signed[None, None])[0, 0]
    best = int(torch.argmax(agreement.flatten()))
    row, column = divmod(best, agreement.shape[1])
    new = mask.clone()
    kernel_size = mask[0, 0].numel()
    for r in range(size):
        for c in range(size):
            if not payload[r, c]:
                continue
            kernel = new[row + r, column + c].view(-1)
            if code[r, c] and not kernel.any():
                kernel[int(torch.randint(kernel_size, (1,), generator=generator))] = 1.0
            elif not code[r, c] and kernel.any():
                kernel.zero_()
    outside = torch.ones(out_channels, in_channels, dtype=torch.bool, device=mask.device)
    outside[row : row + size, column : column + size] = False
    outside = outside[:, :, None, None].expand_as(mask).reshape(-1)
    flat, magnitude = new.view(-1), weight.detach().abs().reshape(-1)
    difference = int(flat.sum()) - int(mask.sum())
    if difference > 0:
        candidates = (outside & (flat > 0)).nonzero().flatten()
        order = torch.argsort(magnitude[candidates], stable=True)
    else:
        candidates = (outside & (flat == 0)).nonzero().flatten()
        order = torch.argsort(magnitude[candidates], descending=True, stable=True)
    if len(candidates) < abs(difference):
        raise ValueError("the layer has too few weights outside the signature window to keep its sparsity")
    flat[candidates[order[: abs(difference)]]] = 0.0 if difference > 0 else 1.0
    return new, (row, column)


@torch.no_grad()
def extreme_path_prune(
    weights: Sequence[Tensor], masks: Sequence[Tensor], num_paths: int, generator: torch.Generator
) -> list[Tensor]:
    """Remove ``num_paths`` random input-to-output paths of whole kernels from a chain of conv layers (each layer's
    input channels are the previous one's outputs); returns new masks, never re-enabling a weight.

    Each path starts at a random input channel of the first layer; in every layer the next channel ``o`` is drawn
    with probability proportional to the kept kernel magnitude ``K[o, i] = sum |W * mask|`` over the kernel and
    kernel ``(o, i)`` is removed; the path continues from ``o`` (it stops where no kept kernel leaves ``i``).
    """
    masks = [m.clone() for m in masks]
    for layer, (weight, mask) in enumerate(zip(weights, masks)):
        if layer and weight.shape[1] != weights[layer - 1].shape[0]:
            raise ValueError(f"layer {layer} has {weight.shape[1]} input channels, its predecessor {weights[layer - 1].shape[0]} outputs")
        if weight.shape != mask.shape:
            raise ValueError(f"weight {tuple(weight.shape)} and mask {tuple(mask.shape)} of layer {layer} differ")
    for _ in range(num_paths):
        channel = int(torch.randint(weights[0].shape[1], (1,), generator=generator))
        for weight, mask in zip(weights, masks):
            magnitude = (weight.detach().abs() * mask).flatten(2).sum(2)[:, channel].cpu().double()
            if magnitude.sum() <= 0:
                break
            out = int(torch.multinomial(magnitude, 1, generator=generator))
            mask[out, channel] = 0.0
            channel = out
    return masks
