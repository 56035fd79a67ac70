"""Small builders shared by the distillation tests: digits data and tiny modules attached to it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

import torch

from lit_methods.datamodules import DigitsDataModule
from lit_methods.distillation import DistillationModule, EvaluationSettings

TINY_NET = dict(num_classes=10, in_channels=1, image_size=8, net_depth=2, net_width=16)
# the shared evaluation setting of the family's real-data checks: 3 small ConvNets, 150 epochs, DSA
EVALUATION = EvaluationSettings(num_nets=3, epochs=150, batch_size=256, depth=2, width=32, seed=0)


@contextmanager
def one_intra_op_thread() -> Iterator[None]:
    """One intra-op thread for fixtures wider than a test (the autouse per-test fixture runs after them): tiny nets
    on a shared CPU run many times faster; the previous count is restored."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@cache
def digits() -> DigitsDataModule:
    datamodule = DigitsDataModule(batch_size=64, num_workers=0)
    datamodule.setup("fit")
    return datamodule


def attached(cls: type[DistillationModule], **kwargs: Any) -> DistillationModule:
    """``cls`` with the tiny net on 8x8 digits, real data attached (no trainer)."""
    module = cls(**(TINY_NET | kwargs))
    datamodule = digits()
    module.attach_real_data(
        datamodule.train_images,
        datamodule.train_labels,
        datamodule.to_inputs,
        lambda: (datamodule.test_images, datamodule.test_labels),
    )
    return module


def distill(module: DistillationModule, steps: int) -> DistillationModule:
    """Run ``steps`` training steps of ``module`` (attached) with a plain SGD loop equal to the module's step."""
    from tests.helpers import cpu_trainer

    trainer = cpu_trainer(max_steps=steps, max_epochs=-1, limit_train_batches=1.0)
    trainer.fit(module, datamodule=digits())
    return module
