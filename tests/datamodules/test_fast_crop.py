"""``random_crop`` (one gather from the unfolded padded batch) is bit-identical to the advanced-indexing version."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from lit_methods.datamodules.fast import random_crop

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def advanced_indexing_crop(images: Tensor, dy: Tensor, dx: Tensor, padding: int) -> Tensor:
    """The previous implementation of ``random_crop``: per-element (batch, channel, row, column) indexing."""
    n, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
    rows = (dy.view(n, 1) + torch.arange(h, device=images.device)).view(n, 1, h, 1)
    cols = (dx.view(n, 1) + torch.arange(w, device=images.device)).view(n, 1, 1, w)
    batch = torch.arange(n, device=images.device).view(n, 1, 1, 1)
    channel = torch.arange(c, device=images.device).view(1, c, 1, 1)
    return padded[batch, channel, rows, cols]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize(
    ("n", "c", "h", "w", "padding"), [(1, 1, 5, 7, 1), (37, 3, 32, 32, 4), (512, 3, 32, 32, 4), (9, 2, 8, 6, 3)]
)
def test_random_crop_is_bit_identical_to_advanced_indexing(
    device: str, dtype: torch.dtype, n: int, c: int, h: int, w: int, padding: int
) -> None:
    g = torch.Generator().manual_seed(n * 1000 + padding)
    shape = (n, c, h, w)
    images = torch.randint(0, 256, shape, generator=g) if dtype == torch.uint8 else torch.randn(shape, generator=g)
    images = images.to(device=device, dtype=dtype)
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=g).to(device)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=g).to(device)
    dy[0], dx[-1] = 2 * padding, 0  # both extremes of the offset range appear
    expected = advanced_indexing_crop(images, dy, dx, padding)
    for memory_format in (torch.contiguous_format, torch.channels_last):
        out = random_crop(images.contiguous(memory_format=memory_format), dy, dx, padding)
        assert out.dtype == dtype and out.shape == (n, c, h, w)
        assert out.is_contiguous(memory_format=memory_format)  # the layout follows the input's
        assert torch.equal(out, expected)


def test_random_crop_every_offset_and_int32_offsets() -> None:
    images = torch.randint(0, 256, (81, 3, 10, 10), dtype=torch.uint8)
    dy, dx = (offsets.flatten() for offsets in torch.meshgrid(torch.arange(9), torch.arange(9), indexing="ij"))
    expected = advanced_indexing_crop(images, dy, dx, 4)
    assert torch.equal(random_crop(images, dy, dx, 4), expected)
    assert torch.equal(random_crop(images, dy.int(), dx.int(), 4), expected)
