"""Forward+backward time of ghost batch norm (``lit_methods.nets.GhostBatchNorm2d``) against ``nn.BatchNorm2d``.

Hoffer, Hubara & Soudry, "Train longer, generalize better", NeurIPS 2017, https://arxiv.org/abs/1705.08741.

Two measurements, each in training mode on the CPU with ``torch.set_num_threads(os.cpu_count())``:

- layers: one layer per ResNet-20 activation shape at batch ``--batch-size`` (``(B, 16, 32, 32)``,
  ``(B, 32, 16, 16)``, ``(B, 64, 8, 8)``), forward then backward of a fixed random upstream gradient, summed over the
  three shapes;
- network: the whole ResNet-20 (``lit_methods.nets.ResNet20``) forward, cross-entropy and backward on a random
  CIFAR-shaped batch, once with its batch norms and once converted by ``convert_to_ghost_batchnorm``.

Ghost and plain runs alternate for ``--layer-repeats`` (layers) or ``--repeats`` (network) rounds after one untimed
warm-up, swapping which goes first each round; medians are printed with their ratio. Goal: ghost / plain <= 1.05x for both.

Run: ``python benchmarks/ghost_bn.py`` (``--layer-repeats 5 --repeats 3 --batch-size 128`` for a quick check). On
CPU, glibc's malloc returns freed activation memory to the system and page-faults it in again on the next step,
which weighs on the network timing; ``MALLOC_MMAP_THRESHOLD_=4000000000 MALLOC_TRIM_THRESHOLD_=4000000000`` (or
jemalloc/tcmalloc) keeps it, for both sides alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lit_methods.nets import ResNet20
from lit_methods.nets.ghost_batchnorm import (
    GhostBatchNorm2d,
    convert_to_ghost_batchnorm,
)

RESNET20_SHAPES = ((16, 32, 32), (32, 16, 16), (64, 8, 8))


def layer_step(
    layers: list[nn.Module], inputs: list[torch.Tensor], upstream: list[torch.Tensor]
) -> Callable[[], None]:
    def step() -> None:
        for layer, x, grad in zip(layers, inputs, upstream):
            x.grad = None
            layer.zero_grad(set_to_none=True)
            layer(x).backward(grad)

    return step


def network_step(
    net: nn.Module, images: torch.Tensor, labels: torch.Tensor
) -> Callable[[], None]:
    def step() -> None:
        net.zero_grad(set_to_none=True)
        F.cross_entropy(net(images), labels).backward()

    return step


def interleaved_medians(
    plain: Callable[[], None], ghost: Callable[[], None], repeats: int
) -> tuple[float, float]:
    plain(), ghost()  # warm-up
    times: dict[str, list[float]] = {"plain": [], "ghost": []}
    for round_index in range(repeats):
        order = [("plain", plain), ("ghost", ghost)]
        for name, step in order if round_index % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return statistics.median(times["plain"]), statistics.median(times["ghost"])


def report(title: str, plain: float, ghost: float) -> None:
    ratio = ghost / plain
    verdict = "met" if ratio <= 1.05 else "NOT met"
    print(
        f"{title}: plain BatchNorm2d {plain * 1e3:9.2f} ms, ghost {ghost * 1e3:9.2f} ms, "
        f"ghost / plain = {ratio:.3f}x (goal <= 1.05x: {verdict})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--virtual-batch-size", type=int, default=32)
    parser.add_argument(
        "--layer-repeats",
        type=int,
        default=51,
        help="timed rounds of the layer measurement",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=11,
        help="timed rounds of the network measurement",
    )
    parser.add_argument(
        "--skip-network", action="store_true", help="time only the layers"
    )
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    batch, virtual = args.batch_size, args.virtual_batch_size
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {batch}, virtual batch {virtual}, "
        f"medians of {args.layer_repeats} (layers) / {args.repeats} (network) interleaved rounds, fwd + bwd in training"
    )
    allocator = {name: value for name, value in os.environ.items() if name.startswith("MALLOC_")}
    print("glibc malloc settings:", allocator or "defaults", "; load average", os.getloadavg())

    inputs = [
        torch.randn(batch, *shape, requires_grad=True) for shape in RESNET20_SHAPES
    ]
    upstream = [torch.randn(batch, *shape) for shape in RESNET20_SHAPES]
    plain_layers = [nn.BatchNorm2d(shape[0]) for shape in RESNET20_SHAPES]
    ghost_layers = [
        GhostBatchNorm2d(shape[0], virtual_batch_size=virtual)
        for shape in RESNET20_SHAPES
    ]
    plain, ghost = interleaved_medians(
        layer_step(plain_layers, inputs, upstream),
        layer_step(ghost_layers, inputs, upstream),
        args.layer_repeats,
    )
    report("layers (ResNet-20 shapes)", plain, ghost)

    if not args.skip_network:
        plain_net = ResNet20(num_classes=10)
        ghost_net = convert_to_ghost_batchnorm(ResNet20(num_classes=10), virtual)
        images, labels = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
        plain, ghost = interleaved_medians(
            network_step(plain_net, images, labels),
            network_step(ghost_net, images, labels),
            args.repeats,
        )
        report("ResNet-20 forward + backward", plain, ghost)


if __name__ == "__main__":
    main()
