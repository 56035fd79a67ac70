"""Small builders shared by the tests."""

from __future__ import annotations

from typing import Any

import lightning as L


def cpu_trainer(**overrides: Any) -> L.Trainer:
    """A quiet single-process CPU Trainer for tests: no logger, checkpoints, progress bar or summary."""
    defaults: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return L.Trainer(**(defaults | overrides))
