"""Test hygiene (after lightning-bolts' conftest): no leaked env vars, process groups or determinism flags."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist

# Under pytest-xdist (`make test` runs one worker per core) each worker computes on one thread: tiny nets gain
# nothing from intra-op threads, and two workers of two threads each would oversubscribe the cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

# No test talks to wandb's servers: the wandb tests switch to offline mode themselves.
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(autouse=True)
def restore_env_variables() -> Iterator[None]:
    """Restore the environment after each test (Lightning and wandb set variables while they run)."""
    saved = os.environ.copy()
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(autouse=True)
def teardown_process_group() -> Iterator[None]:
    yield
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture(autouse=True)
def reset_deterministic_algorithms() -> Iterator[None]:
    yield
    torch.use_deterministic_algorithms(False)


@pytest.fixture(autouse=True)
def restore_num_threads() -> Iterator[None]:
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def in_tmp_dir(tmp_path, monkeypatch) -> Iterator[os.PathLike]:
    """Run the test with the working directory in a fresh temporary folder (logs and checkpoints land there)."""
    monkeypatch.chdir(tmp_path)
    yield tmp_path


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the files holding real-data (``slow``) or 2-process (``ddp``) checks first, keeping the order otherwise:
    with one pytest-xdist worker per core and each file on one worker (``make test``), the long files then start
    early and the short ones fill the gaps, instead of one long file finishing alone at the end."""
    heavy = {item.path for item in items if item.get_closest_marker("slow") or item.get_closest_marker("ddp")}
    items.sort(key=lambda item: item.path not in heavy)
