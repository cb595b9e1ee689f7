"""Trion's layers under DDP, split over the ranks as ista-daslab-optimizers' ``Trion.step`` splits them: each layer's
column choice and Newton-Schulz on one rank, shared with the others in one collective. Plain torch.distributed."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_lowrank.optim.distributed.collectives import share_refreshes
from lightning_lowrank.optim.projection.bases import is_left
from lightning_lowrank.optim.state.host_ints import advance
from lightning_lowrank.optim.update import functional, trion


def trion_over_ranks(layers: Sequence[Any], group: dict[str, Any], shard: tuple[int, int, Any]) -> int:
    """Trion's layers under DDP, split as the reference splits them: layer i's column choice and Newton-Schulz on rank
    i % world, (m, NS(m), indices) shared in one collective (``collectives.share_refreshes``), then on every rank the
    buffer's feedback and the update, so every rank keeps the whole buffer (a checkpoint holds all of it) and the same
    weights. Returns the bytes shared."""
    rank, world, process_group = shard
    ns, shared = functional.trion_ns(group), []
    for slot, layer in enumerate(layers):
        p, state, owner = layer.param, layer.state, slot % world
        advance(state["step"])
        buffer = state["momentum_buffer"]
        buffer.add_(p.grad.to(buffer.dtype))
        _, scorer, dct = functional.trion_settings(p, buffer, group, layer.ctx.basis)
        low_shape = (layer.ctx.rank, p.shape[1]) if is_left(p.shape) else (p.shape[0], layer.ctx.rank)
        layout = [
            ("low", low_shape, buffer.dtype),
            ("ortho", low_shape, buffer.dtype),
            ("idx", (layer.ctx.rank,), torch.int64),
        ]
        part: dict[str, Tensor] = {}
        if owner == rank:
            part["low"], part["idx"] = trion.trion_select(p.grad, buffer, layer.ctx.rank, scorer, dct=dct)
            part["ortho"] = ns(part["low"]).to(buffer.dtype)
        shared.append((part, layout, owner))
    sent = share_refreshes(shared, rank, process_group, layers[0].param.device)
    for layer, (part, _, _) in zip(layers, shared):
        p, buffer = layer.param, layer.state["momentum_buffer"]
        scaling, scorer, dct = functional.trion_settings(p, buffer, group, layer.ctx.basis)
        trion.trion_feedback(buffer, part["low"], part["idx"], group["momentum"], scorer, dct=dct)
        trion.trion_apply(
            p, part["ortho"], part["idx"], float(group["lr"]), group["weight_decay"], scaling, scorer, dct=dct
        )
    return sent
