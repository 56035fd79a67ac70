"""Step time of :class:`~lit_methods.callbacks.error_feedback_dp.ErrorFeedbackDP` against a non-private step and opacus.

All sides train a GroupNorm ResNet-20 (``lit_methods.nets.ResNet20(norm="groupnorm")`` inside an
``ImageClassifier``, 10 classes) with plain SGD (lr 0.1) on the same pre-generated random CIFAR-shaped batches
(``--batch-size`` images of 3x32x32, already on the device), in hand-written loops so that only the step differs:

- ``non-private``: forward, backward, ``optimizer.step()``.
- ``ErrorFeedbackDP ... (book-keeping)``: what the callback costs under a single-process Trainer with
  ``per_sample_method="book_keeping"`` (the default ``"auto"`` picks it for this net): the forward and backward
  that Lightning runs, with the callback's hooks recording layer inputs and output gradients and the backward
  computing input gradients only (no batch gradient of the parameters), then ``privatized_gradients_from_backward``
  (per-sample norms, clipped and raw sums, error feedback, noise) written into ``p.grad``, then the step.
  ``error_feedback`` True (DiceSGD) and False (DPSGD-GC).
- ``ErrorFeedbackDP DiceSGD (vmap)``: the same with ``per_sample_method="vmap"``: the ordinary forward and
  backward, then ``privatized_gradients`` (torch.func per-sample gradients of the batch), then the step.
- ``opacus GradSampleModule``: ``opacus.GradSampleModule`` (hook-based per-sample gradients) + ``DPOptimizer``
  (clip 1, noise 1): forward, backward, ``optimizer.step()``. The reference of the goal.
- ``opacus ghost clipping``: ``GradSampleModuleFastGradientClipping(use_ghost_clipping=True)`` +
  ``DPOptimizerFastGradientClipping`` + ``DPLossFastGradientClipping`` (its backward runs twice: once for the
  norms, once on the re-weighted loss), a second reference.

Each round times ``--steps`` steps of every side after one untimed warm-up step, with the sides' order rotated each
round; the median and the best step time over all rounds are printed with their ratios (on a loaded machine the
best is the steadier figure). Goals (from the issue): ErrorFeedbackDP /
non-private <= 1.3x, ErrorFeedbackDP / opacus <= 0.6x.

After the ratios, the book-keeping steps are timed part by part (forward, backward with the recording hooks,
``privatized_gradients_from_backward``: per-sample norms, ghost or materialized per layer, clipped and raw sums,
feedback and noise; optimizer step), and one DPSGD-GC ``privatized_gradients_from_backward`` call is broken down
by operator with ``torch.profiler``, to show where the time goes.

Run: ``python benchmarks/dp_step.py`` (``--steps 2 --repeats 1`` for a quick check); ``--device cuda`` on a GPU.
On CPU, glibc's malloc hands the freed per-sample gradients (tens of MB) back to the system every step and the next
step page-faults them in again; ``MALLOC_MMAP_THRESHOLD_=4000000000 MALLOC_TRIM_THRESHOLD_=4000000000 python
benchmarks/dp_step.py`` keeps them (as jemalloc or tcmalloc would); every side runs under the same setting.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

from lit_methods.callbacks.error_feedback_dp import ErrorFeedbackDP
from lit_methods import ImageClassifier
from lit_methods.nets import ResNet20

GOAL_VS_NON_PRIVATE = 1.3
GOAL_VS_OPACUS = 0.6


def make_model(device: torch.device) -> ImageClassifier:
    torch.manual_seed(0)
    return ImageClassifier(ResNet20(norm="groupnorm")).to(device).train()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def non_private_step(
    device: torch.device,
) -> Callable[[torch.Tensor, torch.Tensor], None]:
    model = make_model(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def step(images: torch.Tensor, targets: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        model.compute_loss(model(images), targets).backward()
        optimizer.step()

    return step


def error_feedback_dp_step(
    device: torch.device, error_feedback: bool, per_sample_method: str
) -> Callable[[torch.Tensor, torch.Tensor], None]:
    model = make_model(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    dp = ErrorFeedbackDP(
        clip_norm=1.0, noise_multiplier=1.0, error_feedback=error_feedback, per_sample_method=per_sample_method
    )
    if per_sample_method == "book_keeping":
        dp.attach_book_keeping(model, parameter_gradients=False)  # what setup does in one process

    def step(images: torch.Tensor, targets: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        model.compute_loss(model(images), targets).backward()
        if per_sample_method == "book_keeping":
            update = dp.privatized_gradients_from_backward(model)
        else:
            update = dp.privatized_gradients(model, images, targets)
        for name, param in model.named_parameters():
            param.grad = update[name]
        dp.steps += 1
        optimizer.step()

    return step


def book_keeping_parts(device: torch.device, error_feedback: bool, batches: list, repeats: int) -> dict[str, float]:
    """Median seconds of each part of the book-keeping step over ``repeats`` passes over ``batches[1:]``."""
    model = make_model(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    dp = ErrorFeedbackDP(clip_norm=1.0, noise_multiplier=1.0, error_feedback=error_feedback)
    dp.attach_book_keeping(model, parameter_gradients=False)
    parts: dict[str, list[float]] = {"forward": [], "backward (hooks)": [], "privatize": [], "optimizer step": []}

    def timed(part: str, run: Callable[[], object]) -> object:
        synchronize(device)
        start = time.perf_counter()
        result = run()
        synchronize(device)
        parts[part].append(time.perf_counter() - start)
        return result

    for index, (images, targets) in enumerate(batches * repeats):
        optimizer.zero_grad(set_to_none=True)
        loss = timed("forward", lambda: model.compute_loss(model(images), targets))
        timed("backward (hooks)", loss.backward)
        update = timed("privatize", lambda: dp.privatized_gradients_from_backward(model))
        for name, param in model.named_parameters():
            param.grad = update[name]
        dp.steps += 1
        timed("optimizer step", optimizer.step)
        if index == 0:  # warm-up
            for values in parts.values():
                values.clear()
    return {part: statistics.median(values) for part, values in parts.items()}


def privatize_by_operator(device: torch.device, error_feedback: bool, batch: tuple, rows: int = 8) -> str:
    """torch.profiler's table of the ``rows`` costliest operators (by self time, grouped by input shapes) of one
    ``privatized_gradients_from_backward`` call, after one untimed step."""
    from torch.profiler import ProfilerActivity, profile

    model = make_model(device)
    dp = ErrorFeedbackDP(clip_norm=1.0, noise_multiplier=1.0, error_feedback=error_feedback)
    dp.attach_book_keeping(model, parameter_gradients=False)
    images, targets = batch
    for index in range(2):
        model.compute_loss(model(images), targets).backward()
        if index == 0:
            dp.privatized_gradients_from_backward(model)
            dp.steps += 1
            continue
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities, record_shapes=True) as profiler:
            dp.privatized_gradients_from_backward(model)
            synchronize(device)
    averages = profiler.key_averages(group_by_input_shape=True)
    return averages.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=28, max_shapes_column_width=60)


def opacus_step(device: torch.device, batch_size: int) -> Callable[[torch.Tensor, torch.Tensor], None]:
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    model = GradSampleModule(make_model(device).backbone)
    optimizer = DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        expected_batch_size=batch_size,
    )

    def step(images: torch.Tensor, targets: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), targets).backward()
        optimizer.step()

    return step


def opacus_ghost_clipping_step(device: torch.device, batch_size: int) -> Callable[[torch.Tensor, torch.Tensor], None]:
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    backbone = make_model(device).backbone
    model = GradSampleModuleFastGradientClipping(backbone, max_grad_norm=1.0, use_ghost_clipping=True)
    optimizer = DPOptimizerFastGradientClipping(
        torch.optim.SGD(model.parameters(), lr=0.1),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        expected_batch_size=batch_size,
    )
    criterion = DPLossFastGradientClipping(model, optimizer, torch.nn.CrossEntropyLoss())

    def step(images: torch.Tensor, targets: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        criterion(model(images), targets).backward()
        optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per side and round")
    parser.add_argument("--repeats", type=int, default=3, help="rounds")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    device = torch.device(args.device)
    torch.set_num_threads(os.cpu_count() or 1)
    generator = torch.Generator().manual_seed(0)
    batches = [
        (
            torch.randn(args.batch_size, 3, 32, 32, generator=generator).to(device),
            torch.randint(0, 10, (args.batch_size,), generator=generator).to(device),
        )
        for _ in range(args.steps + 1)
    ]
    sides = {
        "non-private": non_private_step(device),
        "ErrorFeedbackDP DiceSGD (book-keeping)": error_feedback_dp_step(device, True, "book_keeping"),
        "ErrorFeedbackDP DPSGD-GC (book-keeping)": error_feedback_dp_step(device, False, "book_keeping"),
        "ErrorFeedbackDP DiceSGD (vmap)": error_feedback_dp_step(device, True, "vmap"),
        "opacus GradSampleModule": opacus_step(device, args.batch_size),
        "opacus ghost clipping": opacus_ghost_clipping_step(device, args.batch_size),
    }
    times: dict[str, list[float]] = {name: [] for name in sides}
    names = list(sides)
    for round_index in range(args.repeats):
        order = names[round_index % len(names) :] + names[: round_index % len(names)]
        for name in order:
            step = sides[name]
            step(*batches[0])  # warm-up
            synchronize(device)
            for images, targets in batches[1:]:
                start = time.perf_counter()
                step(images, targets)
                synchronize(device)
                times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(values) for name, values in times.items()}
    print(
        f"GroupNorm ResNet-20, batch {args.batch_size}, {args.device}, {torch.get_num_threads()} threads, "
        f"{args.repeats} rounds x {args.steps} steps; load average {os.getloadavg()}"
    )
    print("uptime:", subprocess.run(["uptime"], check=True, capture_output=True, text=True).stdout.strip())
    allocator = {name: value for name, value in os.environ.items() if name.startswith("MALLOC_")}
    print("glibc malloc settings:", allocator or "defaults")
    print(f"{'side':42s} {'median step (s)':>16s} {'range (s)':>20s}")
    for name, values in times.items():
        print(f"{name:42s} {median[name]:16.4f} {min(values):9.4f}-{max(values):<9.4f}")
    best = {name: min(values) for name, values in times.items()}
    for label, stat in (("median", median), ("best (least disturbed by other load)", best)):
        print(f"ratios of the {label} step times:")
        for name in names[1:4]:
            vs_plain = stat[name] / stat["non-private"]
            vs_opacus = stat[name] / stat["opacus GradSampleModule"]
            vs_ghost = stat[name] / stat["opacus ghost clipping"]
            print(
                f"  {name}: {vs_plain:.2f}x non-private (goal <= {GOAL_VS_NON_PRIVATE}x: "
                f"{'met' if vs_plain <= GOAL_VS_NON_PRIVATE else 'NOT met'}), {vs_opacus:.2f}x opacus (goal <= "
                f"{GOAL_VS_OPACUS}x: {'met' if vs_opacus <= GOAL_VS_OPACUS else 'NOT met'}), "
                f"{vs_ghost:.2f}x opacus ghost clipping"
            )
    print("book-keeping step by part (median s; in brackets, over the best non-private step):")
    for error_feedback, label in ((True, "DiceSGD"), (False, "DPSGD-GC")):
        parts = book_keeping_parts(device, error_feedback, batches, args.repeats)
        shares = ", ".join(f"{part} {value:.4f} ({value / best['non-private']:.2f}x)" for part, value in parts.items())
        print(f"  {label}: {shares}")
    print("DPSGD-GC privatize step by operator (torch.profiler, one step; the per-sample weight gradients of the")
    print("convolutions are the convolution_backward rows of batch 1 and B * C_out channels):")
    print(privatize_by_operator(device, False, batches[1]))


if __name__ == "__main__":
    main()
