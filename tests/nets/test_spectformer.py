"""SpectFormer (https://arxiv.org/abs/2304.06446): the spectral gating filter against the convolution theorem, the
parameter count, clear errors for grids it cannot reshape, and accuracy on 16x16 digits."""

from __future__ import annotations

import pytest
import torch

from lit_methods.nets import SpectFormer, SpectralGatingBlock, SpectralGatingFilter
from lit_methods.nets.spectformer import spectral_gating_parameter_count
from tests.nets.digits16 import train_and_test


@pytest.fixture(autouse=True)
def one_thread() -> None:
    """Tiny nets on a shared CPU: one intra-op thread is faster than several (the conftest restores the count)."""
    torch.set_num_threads(1)


def test_identity_filter_returns_its_input() -> None:
    torch.manual_seed(0)
    spectral = SpectralGatingFilter((4, 5), dim=3)
    with torch.no_grad():
        spectral.weight.zero_()
        spectral.weight[..., 0] = 1.0  # W = 1 + 0j
    tokens = torch.randn(2, 20, 3)
    assert (spectral(tokens) - tokens).abs().max() < 1e-5


def circular_convolution(grid: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """``out[b, i, j, c] = sum_{a, b'} grid[b, (i - a) % h, (j - b') % w, c] * kernel[a, b', c]`` by explicit rolls."""
    out = torch.zeros_like(grid)
    for a in range(kernel.shape[0]):
        for b in range(kernel.shape[1]):
            out += torch.roll(grid, shifts=(a, b), dims=(1, 2)) * kernel[a, b]
    return out


@pytest.mark.parametrize("grid_size", [(4, 4), (3, 5)])
def test_spectral_gating_is_a_circular_convolution_with_irfft2_of_the_weight(grid_size: tuple[int, int]) -> None:
    """A filter shaped (h, w) instead of (h, w // 2 + 1), another FFT normalisation or irfft2 without ``s`` (the odd
    3x5 grid) fails this."""
    torch.manual_seed(0)
    height, width = grid_size
    spectral = SpectralGatingFilter(grid_size, dim=3)
    with torch.no_grad():
        spectral.weight.normal_()
    tokens = torch.randn(2, height * width, 3, dtype=torch.float32)
    kernel = torch.fft.irfft2(torch.view_as_complex(spectral.weight.detach()), s=grid_size, dim=(0, 1))
    expected = circular_convolution(tokens.reshape(2, height, width, 3), kernel).reshape(2, height * width, 3)
    torch.testing.assert_close(spectral(tokens), expected, atol=1e-5, rtol=1e-5)


def test_fft_runs_in_float32_under_autocast() -> None:
    torch.manual_seed(0)
    spectral = SpectralGatingFilter((4, 4), dim=8)
    tokens = torch.randn(2, 16, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = spectral(tokens.bfloat16())
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), spectral(tokens.bfloat16().float()), atol=1e-2, rtol=1e-2)


def test_parameter_count_formula() -> None:
    grid, dim = (4, 7), 32
    block = SpectralGatingBlock(grid, dim, mlp_ratio=4.0)
    # filter 4 * (7 // 2 + 1) * 32 * 2 = 1,024; MLP 32*128 + 128 + 128*32 + 32 = 8,352; LayerNorms 4 * 32 = 128
    assert sum(p.numel() for p in block.parameters()) == spectral_gating_parameter_count(grid, dim) == 9_504
    net = SpectFormer(num_classes=10, in_channels=1, image_size=(16, 28), embed_dim=dim, depth=3, spectral_depth=2)
    spectral_blocks = [m for m in net.modules() if isinstance(m, SpectralGatingBlock)]
    assert len(spectral_blocks) == 2 and all(b.filter.grid_size == grid for b in spectral_blocks)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"image_size": 30, "patch_size": 4}, "image_size 30 .*patch_size 4"),
        ({"image_size": (16, 18), "patch_size": 4}, r"\(16, 18\)"),
        ({"spectral_depth": 5, "depth": 4}, "spectral_depth.*5"),
        ({"embed_dim": 100, "num_heads": 3}, "100"),
    ],
)
def test_bad_arguments_raise(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SpectFormer(**kwargs)


def test_other_input_size_is_refused() -> None:
    net = SpectFormer(in_channels=1, image_size=16, embed_dim=16, depth=2, spectral_depth=1, num_heads=2)
    with pytest.raises(ValueError, match=r"16x16.*\(20, 20\)"):
        net(torch.randn(1, 1, 20, 20))


@pytest.mark.slow
def test_tiny_spectformer_learns_16x16_digits() -> None:
    """4x4 token grid, width 32, 2 spectral + 2 attention blocks. Untrained (``epochs=0``) it is at chance (~10%)."""
    torch.manual_seed(0)
    net = SpectFormer(
        num_classes=10, in_channels=1, image_size=16, patch_size=4, embed_dim=32, depth=4, spectral_depth=2,
        num_heads=4,
    )  # fmt: skip
    accuracy = train_and_test(net, epochs=5)
    assert accuracy > 0.85, accuracy
