"""Sampling time of our DDIM and F-PNDM loops (``lit_methods.diffusion``) against diffusers' scheduler loops.

Both sides run the same diffusers ``UNet2DModel`` (eval mode, no gradients) from the same x_T with the same number of
steps and batch: ours is ``DDIMSampler(...).sample(eps_fn, x_T)`` / ``PNDMSampler(..., "f-pndm").sample(...)``,
the reference is the usual diffusers loop ``scheduler.set_timesteps(S); for t in scheduler.timesteps: x =
scheduler.step(unet(x, t).sample, t, x).prev_sample`` with ``DDIMScheduler(clip_sample=False)`` /
``PNDMScheduler()``. After an untimed warm-up, each round times every side once; within a round each pair runs
ours-first and theirs-first on alternate rounds and the pairs' order reverses every two rounds, so no side always
follows the same one. Wall time and the process's CPU time (less sensitive to other jobs on a shared machine) are
printed as median and best, with their ratios and the largest difference between the two sides' samples (they
compute the same thing). A second table times the samplers alone, with a trivial noise predictor (eps = x / 2) instead of the UNet:
that is all the time a sampler loop adds to the network calls. Goal (issue 15): ours / diffusers <= 1.02x for both.

Run: ``python benchmarks/diffusion_samplers.py`` (``--steps 10 --repeats 2`` for a quick check; ``--device cuda``
on a GPU). On CPU, glibc's malloc may hand freed activations back to the system between network calls;
``MALLOC_MMAP_THRESHOLD_=4000000000 MALLOC_TRIM_THRESHOLD_=4000000000`` keeps them, for both sides alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
from diffusers import DDIMScheduler, PNDMScheduler, UNet2DModel

from lit_methods.diffusion import DDIMSampler, PNDMSampler


def timed(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[float, float, torch.Tensor]:
    """Wall and process CPU seconds of ``fn()``, and its output."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, cpu_start = time.perf_counter(), time.process_time()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - cpu_start, out


def round_order(pairs: list[tuple[str, str]], round_index: int) -> list[str]:
    """Every side once: ours first in even rounds, theirs first in odd ones; the pairs' order reverses every two
    rounds."""
    ordered = pairs if (round_index // 2) % 2 == 0 else pairs[::-1]
    return [name for pair in ordered for name in (pair if round_index % 2 == 0 else pair[::-1])]


def compare(title: str, sides: dict[str, Callable[[], torch.Tensor]], pairs: list[tuple[str, str]], repeats: int,
            device: torch.device) -> None:
    """Time ``sides`` over ``repeats`` balanced rounds and print each side and each (ours, theirs) ratio."""
    wall: dict[str, list[float]] = {name: [] for name in sides}
    cpu: dict[str, list[float]] = {name: [] for name in sides}
    outputs: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name in sides:  # warm-up
            sides[name]()
        for round_index in range(repeats):
            for name in round_order(pairs, round_index):
                seconds, cpu_seconds, outputs[name] = timed(sides[name], device)
                wall[name].append(seconds)
                cpu[name].append(cpu_seconds)
    print(f"-- {title} ({repeats} rounds)")
    for name in sides:
        print(f"{name:28s} wall median {1e3 * statistics.median(wall[name]):10.2f} ms  best "
              f"{1e3 * min(wall[name]):10.2f} ms   CPU median {1e3 * statistics.median(cpu[name]):10.2f} ms  best "
              f"{1e3 * min(cpu[name]):10.2f} ms")
    for ours, theirs in pairs:
        ratios = {label: (statistics.median(times[ours]) / statistics.median(times[theirs]),
                          min(times[ours]) / min(times[theirs])) for label, times in (("wall", wall), ("CPU", cpu))}
        verdict = "met" if ratios["wall"][0] <= 1.02 else "NOT met"
        difference = float((outputs[ours] - outputs[theirs]).abs().max())
        print(f"{ours} / {theirs}: wall median {ratios['wall'][0]:.3f}x best {ratios['wall'][1]:.3f}x, CPU median "
              f"{ratios['CPU'][0]:.3f}x best {ratios['CPU'][1]:.3f}x (goal <= 1.02x on the wall median: {verdict}); largest sample "
              f"difference {difference:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--channels", type=int, nargs="+", default=[32, 64, 64])
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--overhead-repeats", type=int, default=40, help="rounds of the trivial-model comparison")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    levels = len(args.channels)
    unet = UNet2DModel(sample_size=args.image_size, in_channels=3, out_channels=3,
                       block_out_channels=tuple(args.channels), layers_per_block=1,
                       down_block_types=("DownBlock2D",) * levels, up_block_types=("UpBlock2D",) * levels,
                       norm_num_groups=min(32, min(args.channels))).to(device).eval()
    x_T = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)

    def unet_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return unet(x, t).sample

    def trivial_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x * 0.5

    def sides(eps_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> dict[str, Callable[[], torch.Tensor]]:
        ddim_scheduler = DDIMScheduler(num_train_timesteps=1000, clip_sample=False)
        pndm_scheduler = PNDMScheduler(num_train_timesteps=1000)
        ddim = DDIMSampler(ddim_scheduler.alphas_cumprod, args.steps)
        pndm = PNDMSampler(pndm_scheduler.alphas_cumprod, args.steps, "f-pndm")

        def diffusers_loop(scheduler: DDIMScheduler | PNDMScheduler) -> Callable[[], torch.Tensor]:
            def run() -> torch.Tensor:
                scheduler.set_timesteps(args.steps)
                x = x_T
                for t in scheduler.timesteps:
                    x = scheduler.step(eps_fn(x, t), t, x).prev_sample
                return x
            return run

        return {
            "ours DDIM": lambda: ddim.sample(eps_fn, x_T),
            "diffusers DDIMScheduler": diffusers_loop(ddim_scheduler),
            "ours F-PNDM": lambda: pndm.sample(eps_fn, x_T),
            "diffusers PNDMScheduler": diffusers_loop(pndm_scheduler),
        }

    pairs = [("ours DDIM", "diffusers DDIMScheduler"), ("ours F-PNDM", "diffusers PNDMScheduler")]
    allocator = {name: value for name, value in os.environ.items() if name.startswith(("MALLOC_", "PYTORCH_CUDA"))}
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads; allocator settings:",
          allocator or "defaults", "; load average", os.getloadavg())
    print(f"UNet2DModel channels {args.channels}, {args.image_size}x{args.image_size}, batch {args.batch_size}, "
          f"{args.steps} steps (F-PNDM: {args.steps + 9} network calls)")
    compare("UNet2DModel", sides(unet_eps), pairs, args.repeats, device)
    compare("samplers alone (trivial eps = x / 2)", sides(trivial_eps), pairs, args.overhead_repeats, device)
    print("load average at the end", os.getloadavg())


if __name__ == "__main__":
    main()
