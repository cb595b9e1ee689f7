"""Shared by the FSDP2 probes: run ``fn(rank, *args)`` in 2 CPU processes with gloo and a 1-D device mesh.

Not a probe itself; each probe script imports it (the scripts run from any directory: ``python
benchmarks/fsdp2_probe/<probe>.py``). Output lines are prefixed with the rank and printed in rank order at the end
of each section where that matters, so two processes do not interleave half-lines.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable[..., Any], port: int, args: tuple[Any, ...]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        fn(rank, *args)
    finally:
        dist.barrier()
        dist.destroy_process_group()


def run(fn: Callable[..., Any], *args: Any) -> None:
    """Spawn ``WORLD`` processes running ``fn(rank, *args)`` inside an initialised gloo process group."""
    mp.spawn(_entry, args=(fn, _free_port(), args), nprocs=WORLD, join=True)


def mesh():
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (WORLD,))


def ordered(rank: int, lines: list[str]) -> None:
    """Print ``lines`` rank by rank (rank 0 first), each prefixed ``[rank]``."""
    for r in range(WORLD):
        if r == rank:
            for line in lines:
                print(f"[{rank}] {line}", flush=True)
        dist.barrier()
