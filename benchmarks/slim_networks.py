"""Parameters, FLOPs and CPU inference time of the slim networks exported by polarization and OTOv2, each against
its dense original, in one run.

Zhi et al., https://arxiv.org/abs/2302.10798 (``lit_methods.compression.Polarization``) and Chen et al.,
https://arxiv.org/abs/2303.06862 (``lit_methods.compression.OTOv2``). Both remove whole channels, so the exported
network (``export_subnetwork`` / ``export_compressed``, built by torch-pruning) is physically smaller; both compute the
same logits as their trained dense model (the script checks it).

Each method trains a ConvNet-``--depth`` of width ``--width`` with batch norm on the 8x8 digits for ``--epochs`` (the
CPU configs' settings: target keep ratio / group sparsity 0.5), exports, and then the dense and slim networks run
inference (eval mode, no grad) on a batch of ``--batch-size`` digits, alternating for ``--repeats`` rounds after one
untimed warm-up; medians are printed with their ratio. FLOPs are counted by ``torch.utils.flop_counter``.

Run: ``python benchmarks/slim_networks.py`` (``--epochs 3 --repeats 5`` for a quick check).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import lightning as L
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lit_methods.compression import OTOv2, Polarization
from lit_methods.datamodules import DigitsDataModule
from lit_methods.nets import ConvNet
from lit_methods.pruning import count_parameters


def flops(net: nn.Module, images: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(images)
    return counter.get_total_flops()


def median_seconds(nets: list[nn.Module], images: torch.Tensor, repeats: int) -> list[float]:
    times: list[list[float]] = [[] for _ in nets]
    with torch.no_grad():
        for net in nets:
            net(images)  # warm-up
        for round_index in range(repeats):
            order = range(len(nets)) if round_index % 2 == 0 else reversed(range(len(nets)))
            for i in order:
                start = time.perf_counter()
                nets[i](images)
                times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=21)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, allocator: default (glibc malloc), "
          f"MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_', 'unset')}")
    datamodule = DigitsDataModule(batch_size=64)
    datamodule.setup("test")
    images = datamodule.to_inputs(datamodule.test_images)
    images = images.repeat(-(-args.batch_size // len(images)), 1, 1, 1)[: args.batch_size]
    shape = dict(in_channels=1, image_size=(8, 8), num_classes=10)

    def backbone() -> ConvNet:
        return ConvNet(num_classes=10, in_channels=1, depth=args.depth, width=args.width, norm="batchnorm", image_size=8)

    steps_per_epoch = 22
    methods = {
        "polarization": Polarization(backbone(), target_keep_ratio=0.5, gate_lr=1.0, lr=0.05, **shape),
        "otov2": OTOv2(backbone(), target_group_sparsity=0.5, partition_step=2 * steps_per_epoch,
                       projection_step=3 * steps_per_epoch, lmbda=0.5, lr=0.05, weight_decay=1e-4,
                       lr_schedule="constant", **shape),
    }
    print(f"ConvNet-{args.depth} width {args.width}, digits 8x8, {args.epochs} epochs, inference batch {args.batch_size}, "
          f"{args.repeats} rounds")
    header = f"{'method':<13}{'params dense':>13}{'params slim':>12}{'ratio':>7}{'MFLOPs dense':>14}{'MFLOPs slim':>12}" \
             f"{'ratio':>7}{'ms dense':>10}{'ms slim':>9}{'speedup':>9}{'acc':>7}{'max |dlogit|':>14}"
    print(header)
    for name, model in methods.items():
        L.seed_everything(0)
        trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=args.epochs, logger=False, limit_val_batches=0,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(model, datamodule=datamodule)
        model.eval()
        slim = model.export_subnetwork() if isinstance(model, Polarization) else model.export_compressed()
        dense = model  # the gated / dense model as trained
        with torch.no_grad():
            logits = dense(images)
            difference = float((slim(images) - logits).abs().max())
            accuracy = float((dense(datamodule.to_inputs(datamodule.test_images)).argmax(1) == datamodule.test_labels)
                             .float().mean())
        plain = model.backbone if isinstance(model, OTOv2) else None
        reference = plain if plain is not None else _without_gates(model)
        dense_params, slim_params = count_parameters(reference), count_parameters(slim)
        dense_flops, slim_flops = flops(reference, images), flops(slim, images)
        dense_s, slim_s = median_seconds([reference, slim], images, args.repeats)
        print(f"{name:<13}{dense_params:>13,}{slim_params:>12,}{slim_params / dense_params:>7.2f}"
              f"{dense_flops / 1e6:>14.1f}{slim_flops / 1e6:>12.1f}{slim_flops / dense_flops:>7.2f}"
              f"{dense_s * 1e3:>10.2f}{slim_s * 1e3:>9.2f}{dense_s / slim_s:>8.2f}x{accuracy:>7.3f}{difference:>14.2e}")


def _without_gates(model: Polarization) -> nn.Module:
    """The dense original of a polarization model: its backbone without the gate hooks (all channels)."""
    model._detach_gates()
    return model.backbone


if __name__ == "__main__":
    main()
