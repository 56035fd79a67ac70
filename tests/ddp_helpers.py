"""Run a function in a 2-process CPU (gloo) group and collect each rank's result.

Each process gets the environment that torchrun would set (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT), so a
``Trainer(accelerator="cpu", devices=world_size, strategy="ddp")`` built inside it joins the group as under
torchrun; plain ``torch.distributed`` code can call :func:`init_gloo` instead.
"""

from __future__ import annotations

import io
import os
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_gloo() -> None:
    """Join the gloo group described by the environment (set by :func:`run_distributed`)."""
    dist.init_process_group("gloo", rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, queue: Any) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world_size),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        NODE_RANK="0",
        LOCAL_WORLD_SIZE=str(world_size),
    )
    try:
        # The result travels as torch.save bytes: a tensor put on the queue as it is would be passed as a shared-memory
        # file descriptor that this process serves, and the parent's read fails (connection reset) once it has exited.
        buffer = io.BytesIO()
        torch.save(fn(*args), buffer)
        queue.put((rank, "ok", buffer.getvalue()))
    except BaseException:  # report the failure to the parent instead of hanging it
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# Processes start from a fork server that has imported these once (per test process), not from a fresh interpreter
# that imports torch and Lightning again for every rank of every test: a clean start like "spawn" (the server has run
# no computation, so no threads or process group leak into the ranks), at a fraction of the cost.
_PRELOAD = ["torch", "lightning", "lit_methods", "lit_methods.datamodules", "lit_methods.callbacks"]


def run_distributed(fn: Callable, *args: Any, world_size: int = 2, timeout: float = 300.0) -> list[Any]:
    """Call ``fn(*args)`` in ``world_size`` new processes; returns the results ordered by rank.

    ``fn`` must be importable (defined at module level); it reads its rank from ``os.environ["RANK"]``.
    """
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors = []
    for _ in range(world_size):
        rank, status, value = queue.get(timeout=timeout)
        if status == "error":
            errors.append(f"rank {rank}:\n{value}")
        else:
            value = torch.load(io.BytesIO(value), weights_only=False)
        results[rank] = value
    for p in procs:
        p.join(timeout)
        if p.is_alive():
            p.kill()
    if errors:
        raise RuntimeError("distributed run failed\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]
