"""What a layer's optimizer state costs in bytes: the model behind ``memory_budget`` and the Adafactor check.

Bytes are counted from the buffers the rule itself creates (built on the meta device), so a new rule or buffer is
counted without being named here. The report measures the real state; these functions predict it before it exists.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_lowrank.optim.budget.allocate import LayerCost
from lightning_lowrank.optim.projection.bases import projected_dim, projected_shape
from lightning_lowrank.optim.state import storage
from lightning_lowrank.optim.state.storage import state_dtype
from lightning_lowrank.optim.update import rules
from lightning_lowrank.optim.update.rules import projected_rule

META = torch.device("meta")
SCALAR_BYTES = 64  # bound on a projected layer's scalar state (step, rank, counters, weights) for the budget

# Bytes per unit of rank of each projector's storage, for a weight of smaller side d and element size es.
PROJECTOR_BYTES_PER_RANK = {
    "svd": lambda d, es: d * es,
    "rsvd": lambda d, es: d * es,
    "online_pca": lambda d, es: d * es,
    "dct": lambda d, es: 8,  # int64 indices
    "random": lambda d, es: 0,  # a seed
    "gaussian": lambda d, es: 0,  # a seed
}


def meta_bytes(buffers: Mapping[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in buffers.values())


def dense_state_bytes(param: Tensor, group: Mapping[str, Any]) -> int:
    """A dense parameter's rule buffers plus its step counter (none for SGD without momentum: ``storage.stateless``)."""
    if storage.stateless(group):
        return 0
    return meta_bytes(rules.init_state(group["rule"], tuple(param.shape), param.dtype, META)) + 4


def layer_cost(param: Tensor, group: Mapping[str, Any]) -> LayerCost:
    """A projected layer's state bytes as a function of its rank (moments, P or its indices, scalars), its moments
    and P in the state dtype (``storage.state_dtype``); the dense alternative in the weight's."""
    rule, dtype = projected_rule(group), state_dtype(group, param.dtype)

    def moments(rank: int) -> int:
        return meta_bytes(rules.init_state(rule, projected_shape(param.shape, rank, group["side"]), dtype, META))

    d, es = projected_dim(param.shape, group["side"]), dtype.itemsize
    fixed = moments(0) + SCALAR_BYTES
    per_rank = moments(1) - moments(0) + PROJECTOR_BYTES_PER_RANK[group["projector"]](d, es)
    dense = meta_bytes(rules.init_state(group["rule"], tuple(param.shape), param.dtype, META))
    top = min(param.shape)  # the rank is clamped to the smaller side whichever side P is on
    worth = (dense - fixed) // per_rank if per_rank else top  # above this the layer would hold more than dense state
    return LayerCost(fixed, per_rank, max(1, min(group["rank"], top, worth)))


def state_bytes(rule: str, shape: tuple[int, ...], dtype: torch.dtype, group: Mapping[str, Any]) -> int:
    """Bytes of the rule's buffers for a gradient of ``shape``, as ``storage`` keeps them (``storage.buffer_bytes``:
    as they are, or in 8 bits under ``state_bits``)."""
    return sum(storage.buffer_bytes(t, group) for t in rules.init_state(rule, shape, dtype, META).values())


def projector_bytes(param: Tensor, group: Mapping[str, Any], rank: int) -> int:
    """Bytes of one layer's projector at ``rank``: P (d x r, or its 8/4-bit codes with a float32 scale and zero per
    group), DCT indices, or a seed. A DCT basis shared by ``dct_scorer="matmul"`` is not in it. P is in the state
    dtype (``storage.state_dtype``)."""
    d, kind, bits = projected_dim(param.shape, group["side"]), group["projector"], group["projector_bits"]
    es = state_dtype(group, param.dtype).itemsize
    if kind in ("random", "gaussian"):
        return 8  # an int64 seed
    if bits is None or kind == "dct":
        return PROJECTOR_BYTES_PER_RANK[kind](d, es) * rank
    n = d * rank
    return -(-n * bits // 8) + 8 * -(-n // min(group["proj_group_size"], n))


def projection_saving(param: Tensor, group: Mapping[str, Any], rank: int, memory_budget: int | None = None) -> int:
    """Optimizer-state bytes that projecting ``param`` at ``rank`` saves against training it densely in the same
    optimizer (same rule, same ``state_bits``); negative where the projection costs. The step counter is on both
    sides; a projected layer's own scalars (Fira's and APOLLO's last norm, the budget's rank and energy) count."""
    dense = state_bytes(group["rule"], tuple(param.shape), param.dtype, group)
    rule, shape = projected_rule(group), projected_shape(param.shape, rank, group["side"])
    projected = state_bytes(rule, shape, state_dtype(group, param.dtype), group) + projector_bytes(param, group, rank)
    projected += (4 if group["residual"] in ("fira", "apollo") else 0) + (12 if memory_budget is not None else 0)
    return dense - projected
