"""Memory of TESLA's constant-memory trajectory-matching gradient against full unrolled MTT, at 10 and 50 steps.

Cui et al., "Scaling Up Dataset Distillation to ImageNet-1K with Constant Memory", https://arxiv.org/abs/2211.10586
(MTT: Cazenavette et al., https://arxiv.org/abs/2203.11932). For each number of student steps N, one gradient of the
trajectory loss w.r.t. the synthetic images and the learned rate (``lit_methods.distillation.tesla``): full MTT keeps
the graph of all N steps until its backward; TESLA keeps one step's graph at a time. The figure is the PEAK of the
live bytes saved for backward (``torch.autograd.graph.saved_tensors_hooks``; each storage counted once while any
saved reference to it is alive, released when autograd frees it). Expected: MTT grows about linearly in N (ratio
50 / 10 near 5), TESLA stays flat (ratio <= 1.1). On CUDA the allocator's peak is printed too.

Run: ``python benchmarks/tesla_memory.py`` (``--width 16`` for a quick check).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import torch

from lit_methods.distillation.tesla import FlatForward, mtt_gradients, tesla_gradients
from lit_methods.nets import ConvNet


class SavedBytes:
    """Live and peak bytes of the storages autograd holds for backward while the hooks are active."""

    def __init__(self) -> None:
        self.live: dict[int, list[int]] = {}
        self.current = 0
        self.peak = 0

    def pack(self, tensor: torch.Tensor) -> Any:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in self.live:
            self.live[key] = [storage.nbytes(), 0]
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
        self.live[key][1] += 1
        return Held(self, key, tensor)

    def release(self, key: int) -> None:
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]


class Held:
    """A saved tensor; when autograd drops it the counter releases its storage reference."""

    def __init__(self, counter: SavedBytes, key: int, tensor: torch.Tensor) -> None:
        self.counter, self.key, self.tensor = counter, key, tensor

    def __del__(self) -> None:
        self.counter.release(self.key)


def measure(mode: str, steps: int, args: argparse.Namespace) -> tuple[int, int | None]:
    torch.manual_seed(0)
    device = torch.device(args.device)
    net = ConvNet(num_classes=10, in_channels=3, depth=3, width=args.width, image_size=args.image_size).to(device)
    forward = FlatForward(net)
    start = torch.cat([p.detach().flatten() for p in net.parameters()])
    target = start + 0.01 * torch.randn_like(start)
    images = torch.randn(10 * args.ipc, 3, args.image_size, args.image_size, device=device, requires_grad=True)
    labels = torch.arange(10, device=device).repeat_interleave(args.ipc)
    lr = torch.tensor(0.01, device=device, requires_grad=True)
    generator = torch.Generator().manual_seed(1)
    chunks = [torch.randperm(len(labels), generator=generator)[: args.batch_syn].to(device) for _ in range(steps)]

    def batch(x: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return x[chunks[i]], labels[chunks[i]]

    gradients = tesla_gradients if mode == "tesla" else mtt_gradients
    counter = SavedBytes()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda held: held.tensor):
        gradients(forward, images, lr, start, target, batch, steps)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return counter.peak, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--batch-syn", type=int, default=10)
    parser.add_argument("--steps", type=int, nargs=2, default=(10, 50))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    allocator = os.environ.get("PYTORCH_CUDA_ALLOC_CONF") if args.device.startswith("cuda") else None
    print(f"device {args.device}; PYTORCH_CUDA_ALLOC_CONF={allocator or 'default'}; ConvNet-3 width {args.width}, "
          f"{args.image_size}x{args.image_size}, {10 * args.ipc} synthetic images, student batch {args.batch_syn}")
    few, many = args.steps
    for mode in ("unrolled", "tesla"):
        (saved_few, cuda_few), (saved_many, cuda_many) = measure(mode, few, args), measure(mode, many, args)
        name = "MTT (unrolled)" if mode == "unrolled" else "TESLA"
        line = (f"{name:15s} saved for backward: N={few}: {saved_few / 2**20:8.2f} MiB, N={many}: "
                f"{saved_many / 2**20:8.2f} MiB, ratio {saved_many / saved_few:.2f}x")
        if cuda_few is not None:
            line += f"; CUDA peak {cuda_few / 2**20:.1f} -> {cuda_many / 2**20:.1f} MiB"
        print(line)


if __name__ == "__main__":
    main()
