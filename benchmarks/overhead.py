"""Overhead of ``Trainer`` + :class:`~lit_methods.base.ImageClassifier` over a hand-written PyTorch loop.

Both sides train ResNet-20 (``lit_methods.nets.ResNet20``, 10 classes) for one epoch on the CPU from the same
``DataLoader(TensorDataset(x, y), batch_size=--batch-size)`` over ``--num-batches`` batches of pre-generated random,
already normalized, in-memory floats, with SGD (lr 0.1, momentum 0.9, Nesterov, weight decay 5e-4), the classifier's
per-step cosine ``LambdaLR`` and cross-entropy, and update the same torchmetrics top-1/top-5 ``MulticlassAccuracy``
every step; ``torch.set_num_threads(os.cpu_count())`` for both.

Each round builds a fresh model from the same seed for each side (not timed), then times the hand loop (optimizer
and scheduler creation, the epoch, the epoch-end metric compute) and ``trainer.fit`` (everything inside it; the
``Trainer`` is built before the timer). A callback also times Lightning's batch loop alone (first
``on_train_batch_start`` to last ``on_train_batch_end``), next to the same span of the hand loop. The sides run
interleaved for ``--repeats`` rounds after one untimed warm-up round, alternating which goes first (hand, Lightning |
Lightning, hand | ...) because the second run of a round was measured 2-3% slower on a busy 2-core CPU. Medians are
printed, with the largest parameter/buffer difference between the two trained models (0: they did the same work).
Goal: Lightning / hand <= 1.03x.

Run: ``python benchmarks/overhead.py`` (``--num-batches 5 --repeats 1`` for a quick check).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
import warnings
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from lit_methods.base import ImageClassifier, WarmupCosine
from lit_methods.nets import ResNet20

NUM_CLASSES = 10
GOAL = 1.03


class BatchLoopTimer(L.Callback):
    """Wall-clock span from the first ``on_train_batch_start`` to the last ``on_train_batch_end``."""

    def __init__(self) -> None:
        self.start: float | None = None
        self.end = 0.0

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.start is None:
            self.start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.end = time.perf_counter()


def hand_epoch(model: nn.Module, batches: DataLoader) -> float:
    """One epoch doing what ``ImageClassifier`` does under the Trainer; returns the batch-loop span in seconds."""
    # ImageClassifier.train_metrics: top-1 and top-5 micro accuracy, updated every step, computed at epoch end.
    metrics = MetricCollection(
        {
            "acc": MulticlassAccuracy(NUM_CLASSES, average="micro"),
            "acc_top5": MulticlassAccuracy(NUM_CLASSES, top_k=5, average="micro"),
        }
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(0, len(batches)))
    model.train()
    start = time.perf_counter()
    for images, targets in batches:
        logits = model(images)
        loss = F.cross_entropy(logits, targets)
        # Lightning logs the loss tensor itself (no .item(), so no sync), so the hand loop reads no value either.
        metrics.update(logits.detach(), targets)
        optimizer.zero_grad()  # set_to_none=True, as Lightning's default
        loss.backward()
        optimizer.step()
        scheduler.step()
    span = time.perf_counter() - start
    metrics.compute()
    metrics.reset()
    return span


def max_difference(a: nn.Module, b: nn.Module) -> float:
    pairs = zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    return max((x.double() - y.double()).abs().max().item() for x, y in pairs)


def time_hand(seed: int, batches: DataLoader) -> tuple[float, float, nn.Module]:
    """A fresh seeded ResNet-20 (not timed), then one hand epoch; (epoch s, batch loop s, trained model)."""
    torch.manual_seed(seed)
    model = ResNet20(num_classes=NUM_CLASSES)
    start = time.perf_counter()
    loop = hand_epoch(model, batches)
    return time.perf_counter() - start, loop, model


def time_lightning(seed: int, batches: DataLoader) -> tuple[float, float, nn.Module]:
    """A fresh seeded classifier and Trainer (not timed), then ``trainer.fit``; (fit s, batch loop s, backbone)."""
    torch.manual_seed(seed)
    module = ImageClassifier(ResNet20(num_classes=NUM_CLASSES), num_classes=NUM_CLASSES)
    timer = BatchLoopTimer()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[timer],
    )
    start = time.perf_counter()
    trainer.fit(module, train_dataloaders=batches)
    seconds = time.perf_counter() - start
    assert timer.start is not None
    return seconds, timer.end - timer.start, module.backbone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-batches", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds of one hand epoch and one fit")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    for message in ("does not have many workers", "no `val_dataloader`", "LeafSpec", "is an instance of `nn.Module`"):
        warnings.filterwarnings("ignore", f".*{message}.*")

    generator = torch.Generator().manual_seed(args.seed)
    num_samples = args.num_batches * args.batch_size
    images = torch.randn(num_samples, 3, 32, 32, generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (num_samples,), generator=generator)
    batches = DataLoader(TensorDataset(images, labels), batch_size=args.batch_size)
    print(f"torch {torch.__version__}, lightning {L.__version__}, torch.get_num_threads(): {torch.get_num_threads()}")
    print(
        f"ResNet-20, {args.num_batches} batches of {args.batch_size} per epoch, "
        f"{args.repeats} interleaved rounds after 1 warm-up round, load average {os.getloadavg()[0]:.2f}\n"
    )
    time_hand(args.seed, batches)  # warm-up round
    time_lightning(args.seed, batches)
    hand: list[float] = []
    hand_loop: list[float] = []
    fit: list[float] = []
    fit_loop: list[float] = []
    difference: list[float] = []
    for round_index in range(args.repeats):
        # Alternate which side goes first (see the module docstring).
        if round_index % 2 == 0:
            hand_run, fit_run = time_hand(args.seed, batches), time_lightning(args.seed, batches)
        else:
            fit_run, hand_run = time_lightning(args.seed, batches), time_hand(args.seed, batches)
        hand.append(hand_run[0])
        hand_loop.append(hand_run[1])
        fit.append(fit_run[0])
        fit_loop.append(fit_run[1])
        difference.append(max_difference(hand_run[2], fit_run[2]))

    header = f"{'':<22} {'epoch s':>9} {'ms/step':>9} {'batch loop s':>13}"
    print(header)
    print("-" * len(header))
    for name, epoch, loop in (("hand-written loop", hand, hand_loop), ("Trainer.fit", fit, fit_loop)):
        seconds = statistics.median(epoch)
        print(f"{name:<22} {seconds:>9.3f} {1e3 * seconds / args.num_batches:>9.1f} {statistics.median(loop):>13.3f}")
    ratio = statistics.median(fit) / statistics.median(hand)
    loop_ratio = statistics.median(fit_loop) / statistics.median(hand_loop)
    rounds = (f"{f / h:.3f} ({'hand' if i % 2 == 0 else 'fit'} first)" for i, (f, h) in enumerate(zip(fit, hand)))
    print(f"\nper round, lightning/hand: {', '.join(rounds)}")
    print(f"max |parameter/buffer difference| between the two trained models: {max(difference):.3g}")
    paired = statistics.median(f / h for f, h in zip(fit, hand, strict=True))
    print(
        f"ratio lightning/hand (medians): {ratio:.3f}x whole epoch, {loop_ratio:.3f}x batch loop "
        f"(median of the per-round ratios {paired:.3f}x); goal <= {GOAL}x: {'met' if ratio <= GOAL else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
