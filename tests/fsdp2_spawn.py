"""What the FSDP2 tests share: 2 CPU processes with gloo (``torch.multiprocessing.spawn``) and a model sharded as
``lowrank_fsdp`` shards one (``fully_shard`` on each ``nn.Linear``, then on the root)."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def process_group(rank: int, port: int) -> Iterator[None]:
    """This worker's gloo process group, destroyed on the way out (also after a failure)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        yield
    finally:
        dist.destroy_process_group()


def shard_linears(model: torch.nn.Module) -> torch.nn.Module:
    """``fully_shard`` on each ``nn.Linear`` of ``model``, then on ``model``, over a 1-D CPU mesh of every rank."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in model.modules():
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model
