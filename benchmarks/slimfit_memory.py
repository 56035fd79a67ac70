"""Activation memory saved for backward under SlimFit (``lit_methods.callbacks.slimfit.SlimFit``) against full fine-tuning.

Ardakani et al., "SlimFit: Memory-Efficient Fine-Tuning of Transformer-based Models Using Training Dynamics",
https://arxiv.org/abs/2305.18513 (up to 2.2x less GPU memory on average in the paper, ViT-B/16 at 224 px).

One training step (forward, cross-entropy, backward) of a randomly initialised ViT (``lit_methods.nets.ViT``) on a
random batch, for each configuration; the bytes of the tensors autograd saves for backward are counted by the
callback's ``saved_tensors_hooks`` (parameters excluded, each storage once, packed GELU inputs at their packed size).
The reference is full fine-tuning (nothing frozen, nothing quantized or pruned, timm's fused attention) measured in
the same run; then each technique alone, and SlimFit's defaults (all of them, as in the official code). Frozen tensors are
SlimFit's first-step choice (seeded); which ones are frozen changes the figure little since the ratio is fixed.
On CUDA (``--device cuda``) ``torch.cuda.max_memory_allocated`` of the step is printed too.

Run: ``python benchmarks/slimfit_memory.py`` (``--depth 2 --batch-size 8`` for a quick check).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from lit_methods.callbacks.slimfit import SlimFit
from lit_methods.nets import ViT


def measure(slimfit: SlimFit, args: argparse.Namespace) -> tuple[int, int | None]:
    """Saved-activation bytes (and CUDA peak bytes) of one step with ``slimfit``'s freezing and storage."""
    torch.manual_seed(0)
    device = torch.device(args.device)
    vit = ViT(
        num_classes=10,
        in_channels=3,
        img_size=args.image_size,
        patch_size=args.patch_size,
        embed_dim=args.embed_dim,
        depth=args.depth,
        num_heads=args.num_heads,
    ).to(device)
    slimfit.setup(None, vit, "fit")
    slimfit.apply_schedule()
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    labels = torch.arange(args.batch_size, device=device) % 10
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    with slimfit.saved_activation_hooks():
        loss = F.cross_entropy(vit(images), labels)
    loss.backward()
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return slimfit.step_saved_bytes, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--patch-size", type=int, default=4)
    parser.add_argument("--embed-dim", type=int, default=192)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--num-heads", type=int, default=3)
    parser.add_argument("--freeze-ratio", type=float, default=0.9)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print(
        f"ViT depth {args.depth}, width {args.embed_dim}, {args.image_size}px / patch {args.patch_size}, "
        f"batch {args.batch_size}, device {args.device}"
    )
    plain = {"quantize_gelu": False, "quantized_linears": (), "quantize_attention": False, "layernorm_keep_ratio": None}
    ratio = args.freeze_ratio
    configurations = {
        "full fine-tuning (reference)": SlimFit(freeze_ratio=0.0, **plain),
        f"freeze {ratio}": SlimFit(**(plain | {"freeze_ratio": ratio})),
        "4-bit GELU inputs": SlimFit(**(plain | {"freeze_ratio": 0.0, "quantize_gelu": True})),
        "8-bit fc2 inputs + attention operands": SlimFit(
            **(plain | {"freeze_ratio": 0.0, "quantized_linears": (r"(^|\.)mlp\.fc2$",), "quantize_attention": True})
        ),
        f"freeze {ratio} + frozen-LayerNorm pruning 0.1": SlimFit(
            **(plain | {"freeze_ratio": ratio, "layernorm_keep_ratio": 0.1})
        ),
        f"SlimFit defaults (freeze {ratio}, all of the above)": SlimFit(freeze_ratio=ratio),
    }
    reference = None
    print(f"{'configuration':<52} {'saved bytes':>14} {'ratio':>7} {'CUDA peak bytes':>16}")
    for name, slimfit in configurations.items():
        saved, peak = measure(slimfit, args)
        reference = reference or saved
        peak_text = f"{peak:>16,}" if peak is not None else f"{'-':>16}"
        print(f"{name:<52} {saved:>14,} {saved / reference:>7.3f} {peak_text}")


if __name__ == "__main__":
    main()
