"""Sampling time of our DDIM and F-PNDM loops (``lit_methods.diffusion``) against diffusers' scheduler loops.

Both sides run the same diffusers ``UNet2DModel`` (eval mode, no gradients) from the same x_T with the same number of
steps and batch: ours is ``DDIMSampler(...).sample(eps_fn, x_T)`` / ``PNDMSampler(..., "f-pndm").sample(...)``,
the reference is the usual diffusers loop ``scheduler.set_timesteps(S); for t in scheduler.timesteps: x =
scheduler.step(unet(x, t).sample, t, x).prev_sample`` with ``DDIMScheduler(clip_sample=False)`` /
``PNDMScheduler()``. Each round times every side once after an untimed warm-up, the sides' order rotating each round;
the median and best times are printed with their ratios, and the largest difference between the two sides' samples
(they compute the same thing). Goal (issue 15): ours / diffusers <= 1.02x for both samplers.

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


def timed(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[float, torch.Tensor]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--channels", type=int, nargs="+", default=[32, 64, 64])
    parser.add_argument("--repeats", type=int, default=5)
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

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return unet(x, t).sample

    def diffusers_loop(scheduler: DDIMScheduler | PNDMScheduler) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            scheduler.set_timesteps(args.steps)
            x = x_T
            for t in scheduler.timesteps:
                x = scheduler.step(unet(x, t).sample, t, x).prev_sample
            return x
        return run

    ddim_scheduler = DDIMScheduler(num_train_timesteps=1000, clip_sample=False)
    pndm_scheduler = PNDMScheduler(num_train_timesteps=1000)
    ddim = DDIMSampler(ddim_scheduler.alphas_cumprod, args.steps)
    pndm = PNDMSampler(pndm_scheduler.alphas_cumprod, args.steps, "f-pndm")
    sides = {
        "ours DDIM": lambda: ddim.sample(eps_fn, x_T),
        "diffusers DDIMScheduler": diffusers_loop(ddim_scheduler),
        "ours F-PNDM": lambda: pndm.sample(eps_fn, x_T),
        "diffusers PNDMScheduler": diffusers_loop(pndm_scheduler),
    }
    allocator = {name: value for name, value in os.environ.items() if name.startswith(("MALLOC_", "PYTORCH_CUDA"))}
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads; allocator settings:",
          allocator or "defaults", "; load average", os.getloadavg())
    print(f"UNet2DModel channels {args.channels}, {args.image_size}x{args.image_size}, batch {args.batch_size}, "
          f"{args.steps} steps (F-PNDM: {args.steps + 9} network calls), {args.repeats} rounds")
    times: dict[str, list[float]] = {name: [] for name in sides}
    outputs: dict[str, torch.Tensor] = {}
    names = list(sides)
    with torch.no_grad():
        for name in names:  # warm-up
            sides[name]()
        for round_index in range(args.repeats):
            order = names[round_index % len(names):] + names[: round_index % len(names)]
            for name in order:
                seconds, outputs[name] = timed(sides[name], device)
                times[name].append(seconds)
    for name in names:
        print(f"{name:28s} median {statistics.median(times[name]):8.4f} s   best {min(times[name]):8.4f} s")
    for ours, theirs in (("ours DDIM", "diffusers DDIMScheduler"), ("ours F-PNDM", "diffusers PNDMScheduler")):
        median = statistics.median(times[ours]) / statistics.median(times[theirs])
        best = min(times[ours]) / min(times[theirs])
        difference = float((outputs[ours] - outputs[theirs]).abs().max())
        verdict = "met" if median <= 1.02 else "NOT met"
        print(f"{ours} / {theirs}: median {median:.3f}x, best {best:.3f}x (goal <= 1.02x: {verdict}); "
              f"largest sample difference {difference:.2e}")


if __name__ == "__main__":
    main()
