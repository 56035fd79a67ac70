"""Evaluate a saved synthetic set with the shared protocol: ``python -m lit_methods.distillation.evaluate SET.pt``.

Any method's exported set (``synsets/synset_step=N.pt``, written at every checkpoint) is trained on by fresh
ConvNets and tested on the real test split of the datamodule named by ``--data`` (a class path), turned into the
set's space (normalized, pixels, or ZCA with the matrix stored in the file). Prints and returns the mean and std.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence

import torch

from lit_methods.distillation.synset import EvaluationSettings, evaluate_synset, load_synset

__all__ = ["main"]


def main(args: Sequence[str] | None = None) -> tuple[float, float]:
    parser = argparse.ArgumentParser(prog="python -m lit_methods.distillation.evaluate", description=__doc__)
    parser.add_argument("synset", help="a synthetic-set .pt file")
    parser.add_argument(
        "--data", required=True, help="datamodule class path, e.g. lit_methods.datamodules.DigitsDataModule"
    )
    parser.add_argument("--data-dir", default="data")
    defaults = EvaluationSettings()
    parser.add_argument("--num-nets", type=int, default=defaults.num_nets)
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--depth", type=int, default=defaults.depth)
    parser.add_argument("--width", type=int, default=defaults.width)
    parser.add_argument("--no-dsa", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    options = parser.parse_args(args)

    module_name, _, class_name = options.data.rpartition(".")
    datamodule_class = getattr(importlib.import_module(module_name), class_name)
    synset = load_synset(options.synset)
    if synset["space"] not in ("normalized", "pixels", "zca"):
        raise ValueError(f"{options.synset}: unknown space {synset['space']!r}")
    space_normalized = synset["space"] == "normalized"
    datamodule = datamodule_class(data_dir=options.data_dir, normalize=space_normalized, num_workers=0)
    load_synset(options.synset, datamodule.num_classes, (datamodule.in_channels, *datamodule.image_size))
    datamodule.setup("test")
    test_images = datamodule.to_inputs(datamodule.test_images).float()
    if synset["space"] == "zca":
        flat = test_images.reshape(len(test_images), -1)
        test_images = ((flat - synset["zca_mean"]) @ synset["zca_matrix"]).reshape(test_images.shape)
    settings = EvaluationSettings(
        num_nets=options.num_nets,
        epochs=options.epochs,
        lr=options.lr,
        batch_size=options.batch_size,
        depth=options.depth,
        width=options.width,
        dsa=not options.no_dsa,
        seed=options.seed,
    )
    device = torch.device(options.device)
    mean, std, _ = evaluate_synset(
        synset["images"].to(device),
        synset["labels"].to(device),
        test_images.to(device),
        datamodule.test_labels.to(device),
        settings,
        synset["lr"],
    )
    print(f"{options.synset}: test accuracy {100 * mean:.2f} +- {100 * std:.2f} over {options.num_nets} nets")
    return mean, std


if __name__ == "__main__":
    main()
