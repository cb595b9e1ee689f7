"""Low-rank optimizer state under DDP, for Fabric: ``Fabric(strategy="lowrank_ddp", devices=N)``.

As ``LowRankDDPStrategy`` (``strategies/ddp.py``): DDP averages gradients before the step, every rank projects the same
gradient, each refresh is computed on one rank and broadcast (``ProjectedOptimizer.shard_refreshes``), and
``low_rank_comm=True`` all-reduces each projected gradient in its subspace with the same DDP communication hook
(``strategies/comm.py``).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.strategies import DDPStrategy
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

from lightning_lowrank.config import LowRankConfig
from lightning_lowrank.fabric.mixin import LowRankFabricMixin
from lightning_lowrank.optim import ProjectedOptimizer
from lightning_lowrank.selection import warn_user
from lightning_lowrank.strategies.checks import check_bool, check_keywords, unknown_options_message
from lightning_lowrank.strategies.comm import (
    CommBytes,
    LowRankCommState,
    check_low_rank_comm_options,
    check_optimizers,
    low_rank_allreduce_hook,
)


class LowRankFabricDDPStrategy(LowRankFabricMixin, DDPStrategy):
    """Fabric's ``DDPStrategy`` with projected optimizer state (the Fabric twin of ``LowRankDDPStrategy``).

    Args:
        low_rank_comm: all-reduce each projected gradient in its subspace (P^T g instead of g) with a DDP
            communication hook, except at steps where the layer refreshes its subspace; ``p.grad`` of a projected
            weight then holds P P^T g_avg. Refused with options that read the gradient outside the subspace (see
            ``LowRankDDPStrategy``). ``fabric.clip_gradients(..., max_norm=...)`` then sees the norm of that
            projected-back gradient (a warning says so). ``comm_bytes`` lists the bytes all-reduced per step.
        **kwargs: ``LowRankFabricMixin``'s (the low-rank options), then Fabric's ``DDPStrategy``'s and
            ``DistributedDataParallel``'s.
    """

    strategy_name = "lowrank_ddp"

    def __init__(self, *args: Any, low_rank_comm: bool = False, **kwargs: Any) -> None:
        check_keywords(type(self).__name__, kwargs)
        check_bool("low_rank_comm", low_rank_comm)
        super().__init__(*args, **kwargs)
        self.low_rank_comm = low_rank_comm
        self._comm_state: LowRankCommState | None = None
        self._warned_clip = False
        if low_rank_comm:
            check_low_rank_comm_options(self.lowrank_config.optimizer_options(), "the strategy")
        # Fabric's DDPStrategy hands unknown keywords to torch's DDP at setup; catch a misspelt option now instead.
        allowed = set(inspect.signature(DistributedDataParallel.__init__).parameters) - {"self", "module"}
        unknown = sorted(set(self._ddp_kwargs) - allowed)
        if unknown:
            known = allowed | LowRankConfig.field_names()
            rest = "other keywords go to Fabric's DDPStrategy and DistributedDataParallel"
            raise ValueError(unknown_options_message(type(self).__name__, unknown, known, rest))

    def setup_module(self, module: nn.Module) -> DistributedDataParallel:
        wrapped = super().setup_module(module)
        if self.low_rank_comm:
            self._comm_state = LowRankCommState(lambda: self._lowrank_optimizers)
            wrapped.register_comm_hook(self._comm_state, low_rank_allreduce_hook)
        return wrapped

    def setup_optimizer(self, optimizer: Optimizer) -> Optimizer:
        new = super().setup_optimizer(optimizer)
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if isinstance(new, ProjectedOptimizer) and distributed:
            new.shard_refreshes()  # layer i's refresh on rank i % world, broadcast: the ranks agree on P
        if self.low_rank_comm:
            check_optimizers([new])  # a param group may override the strategy's options
        return new

    def clip_gradients_norm(self, module: nn.Module, optimizer: Optimizer, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.low_rank_comm and not self._warned_clip:
            self._warned_clip = True
            warn_user(
                "low_rank_comm=True: gradient clipping by norm sees P P^T g (the part of each projected gradient that "
                "was all-reduced) for projected weights, and their full gradient at steps where they refresh their "
                "subspace, so the norm is smaller than without low_rank_comm."
            )
        return super().clip_gradients_norm(module, optimizer, *args, **kwargs)

    @property
    def comm_bytes(self) -> list[CommBytes]:
        """Per optimizer step, the bytes this rank all-reduced (``sent``) and those a plain all-reduce would have
        (``full``); empty without ``low_rank_comm``."""
        return list(self._comm_state.history) if self._comm_state is not None else []
