"""The batch contract: every datamodule yields, and every module reads, batches with named fields.

A batch is a ``dict`` (Lightning moves it to the device as it is, ``default_collate`` builds it from per-sample
dicts). Its fields:

* ``inputs``: the images, ``(N, C, H, W)``; ``uint8`` on the fast path until the datamodule's
  ``on_after_batch_transfer`` turns them into ``float32`` (normalized, or in [0, 1] when the datamodule leaves
  normalization to the model).
* ``targets``: class indices ``(N,)`` (or class probabilities ``(N, K)`` after mixing).
* ``views``: the list of augmented views of a self-supervised training batch (in place of ``inputs``).
* named extras, one per-sample tensor each: ``subgroup`` (CIFAR10-B), ``batch_id`` (hard batches), ``index``
  (position in the split), ``client`` (federated), ``task`` (continual), ``forget`` (unlearning).

Plain tuples are still accepted where users or Lightning pass them: ``(inputs,)`` or ``(inputs, targets)``
(:func:`as_batch`). A positional batch with more fields is refused: its extras would have no name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypedDict

from torch import Tensor

__all__ = ["EXTRA_FIELDS", "INPUTS", "TARGETS", "VIEWS", "Batch", "as_batch"]

INPUTS = "inputs"
TARGETS = "targets"
VIEWS = "views"
EXTRA_FIELDS = ("subgroup", "batch_id", "index", "client", "task", "forget")


class Batch(TypedDict, total=False):
    """The named fields of a batch (a plain ``dict`` at run time)."""

    inputs: Tensor
    targets: Tensor
    views: list[Tensor]
    subgroup: Tensor
    batch_id: Tensor
    index: Tensor
    client: Tensor
    task: Tensor
    forget: Tensor


def as_batch(batch: Any) -> dict[str, Any]:
    """``batch`` as a dict of named fields.

    A mapping is returned as a dict (it must hold ``inputs`` or ``views``); a tensor is ``{"inputs": batch}``; a
    tuple or list is ``(inputs,)`` or ``(inputs, targets)``. Anything else, or a positional batch of more than two
    fields, raises a ``TypeError``/``ValueError`` that names what was given.
    """
    if isinstance(batch, Mapping):
        if INPUTS not in batch and VIEWS not in batch:
            raise ValueError(f"a batch needs an {INPUTS!r} or {VIEWS!r} field; got the fields {sorted(batch)}")
        return dict(batch)
    if isinstance(batch, Tensor):
        return {INPUTS: batch}
    if isinstance(batch, (tuple, list)):
        if len(batch) == 1:
            return {INPUTS: batch[0]}
        if len(batch) == 2:
            return {INPUTS: batch[0], TARGETS: batch[1]}
        raise ValueError(
            f"a positional batch holds (inputs,) or (inputs, targets), got {len(batch)} fields: give extras by "
            f"name in a dict batch, e.g. {{'inputs': ..., 'targets': ..., 'subgroup': ...}} "
            f"(known extras: {', '.join(EXTRA_FIELDS)})"
        )
    raise TypeError(f"a batch is a dict of named fields, a tensor or an (inputs, targets) tuple, got {type(batch)}")
