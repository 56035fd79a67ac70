"""Class-incremental metrics from an accuracy matrix, and the matrix as a table and a heat-map.

``matrix[t, j]`` is the accuracy on the test samples of task ``j`` after training task ``t`` (NaN where not
measured). From it and the test-sample counts of the tasks:

* the accuracy on all seen classes after task ``t`` (sample-weighted over tasks ``0..t``), whose mean over ``t`` is the
  *average incremental accuracy* (Rebuffi et al., iCaRL, arXiv:1611.07725) and whose last value is the *final
  accuracy* (not the same number: report which);
* the average *forgetting* of the tasks before the last: the drop from a reference accuracy to the final one. The
  reference is the best accuracy on the task before the last task (``"max"``, Chaudhry et al., arXiv:1801.10112,
  used by PASS/NAPA-VQ) or the accuracy right after learning it (``"first"``, Avalanche's ``StreamForgetting``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "accuracy_matrix_table",
    "average_forgetting",
    "average_incremental_accuracy",
    "save_accuracy_matrix_heatmap",
    "seen_class_accuracy",
]


def _check_square(matrix: Tensor) -> None:
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] < 1:
        raise ValueError(f"an accuracy matrix is square (tasks x tasks), got shape {tuple(matrix.shape)}")


def seen_class_accuracy(matrix: Tensor, task_sizes: Sequence[int] | Tensor) -> Tensor:
    """Per row ``t``: the accuracy on the test samples of tasks ``0..t``, weighted by their counts ``task_sizes``."""
    matrix = torch.as_tensor(matrix, dtype=torch.float64)
    _check_square(matrix)
    sizes = torch.as_tensor(task_sizes, dtype=torch.float64)
    if sizes.shape != (matrix.shape[0],) or (sizes <= 0).any():
        raise ValueError(f"task_sizes must hold {matrix.shape[0]} positive counts, got {sizes.tolist()}")
    rows = []
    for t in range(matrix.shape[0]):
        seen = matrix[t, : t + 1]
        if torch.isnan(seen).any():
            raise ValueError(f"row {t} of the accuracy matrix lacks the accuracy of a seen task: {seen.tolist()}")
        rows.append((seen * sizes[: t + 1]).sum() / sizes[: t + 1].sum())
    return torch.stack(rows)


def average_incremental_accuracy(matrix: Tensor, task_sizes: Sequence[int] | Tensor) -> float:
    """Mean over the tasks of the accuracy on all classes seen so far (:func:`seen_class_accuracy`)."""
    return float(seen_class_accuracy(matrix, task_sizes).mean())


def average_forgetting(matrix: Tensor, reference: Literal["max", "first"] = "max") -> float:
    """Mean over the tasks ``j`` before the last of ``reference_j - matrix[-1, j]`` (see the module doc); 0 for a
    single task."""
    matrix = torch.as_tensor(matrix, dtype=torch.float64)
    _check_square(matrix)
    if reference not in ("max", "first"):
        raise ValueError(f"reference must be 'max' or 'first', got {reference!r}")
    last = matrix.shape[0] - 1
    if last == 0:
        return 0.0
    drops = []
    for j in range(last):
        if reference == "first":
            ref = matrix[j, j]
        else:
            ref = matrix[j:last, j].max()
        drops.append(ref - matrix[last, j])
    values = torch.stack(drops)
    if torch.isnan(values).any():
        raise ValueError("the accuracy matrix lacks an entry that forgetting needs (NaN on or below the diagonal)")
    return float(values.mean())


def accuracy_matrix_table(matrix: Tensor, digits: int = 2) -> str:
    """The matrix as a Markdown table in percent (rows: after training task t; columns: test task j)."""
    matrix = torch.as_tensor(matrix, dtype=torch.float64)
    _check_square(matrix)
    n = matrix.shape[0]
    lines = ["| after \\ on | " + " | ".join(f"task {j}" for j in range(n)) + " |", "|---" * (n + 1) + "|"]
    for t in range(n):
        cells = ["" if math.isnan(v) else f"{100 * v:.{digits}f}" for v in matrix[t].tolist()]
        lines.append(f"| task {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def save_accuracy_matrix_heatmap(matrix: Tensor, path: str | Path, title: str = "accuracy matrix") -> Path:
    """Save the matrix as a PNG heat-map (percent in every cell) at ``path``; returns the path."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    matrix = torch.as_tensor(matrix, dtype=torch.float64)
    _check_square(matrix)
    n = matrix.shape[0]
    size = max(3.0, 0.5 * n + 1.5)
    fig, ax = plt.subplots(figsize=(size, size))
    image = ax.imshow(100 * matrix.numpy(), vmin=0, vmax=100, cmap="viridis")
    if n <= 20:
        for t in range(n):
            for j in range(n):
                value = matrix[t, j].item()
                if not math.isnan(value):
                    ax.text(j, t, f"{100 * value:.0f}", ha="center", va="center", color="w", fontsize=8)
    ax.set_xlabel("test task")
    ax.set_ylabel("after training task")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="accuracy (%)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
