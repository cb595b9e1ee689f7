"""Low-rank optimizer state under DDP.

DDP all-reduces gradients before the optimizer step, so every rank projects the same gradient. Each refresh
is computed on one rank (layer i on rank i % world size) and broadcast, so ranks agree on the subspace
bit for bit even where a decomposition is not bitwise reproducible, and the refresh work is shared.
"""

from __future__ import annotations

import inspect
from typing import Any

import lightning.pytorch as pl
import torch.distributed as dist
from lightning.fabric.strategies.registry import _StrategyRegistry
from lightning.pytorch.strategies import DDPStrategy
from torch.nn.parallel import DistributedDataParallel

from lightning_lowrank.config import LowRankConfig
from lightning_lowrank.optim import ProjectedOptimizer
from lightning_lowrank.strategies.mixin import LowRankMixin


class LowRankDDPStrategy(LowRankMixin, DDPStrategy):
    """``DDPStrategy`` with projected optimizer state: ``Trainer(strategy="lowrank_ddp", devices=N)``."""

    strategy_name = "lowrank_ddp"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # DDPStrategy hands unknown keywords to torch's DDP at setup; catch a misspelt option now instead.
        allowed = set(inspect.signature(DistributedDataParallel.__init__).parameters) - {"self", "module"}
        unknown = sorted(set(self._ddp_kwargs) - allowed)
        if unknown:
            raise ValueError(
                f"Unknown option(s) {unknown} for LowRankDDPStrategy. Low-rank options: "
                f"{', '.join(sorted(LowRankConfig.field_names()))}; other keywords go to DistributedDataParallel."
            )

    def setup_optimizers(self, trainer: pl.Trainer) -> None:
        super().setup_optimizers(trainer)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for opt in self.optimizers:
                if isinstance(opt, ProjectedOptimizer):
                    opt.shard_refreshes()

    @classmethod
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        for name, start_method in (
            ("lowrank_ddp", "popen"),
            ("lowrank_ddp_spawn", "spawn"),
            ("lowrank_ddp_fork", "fork"),
            ("lowrank_ddp_notebook", "fork"),
        ):
            strategy_registry.register(
                name, cls, description=f"DDP ({start_method}) with low-rank optimizer state", start_method=start_method
            )
