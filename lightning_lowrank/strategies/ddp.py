"""Low-rank optimizer state under DDP.

DDP all-reduces gradients before the optimizer step, so every rank projects the same gradient
and computes the same subspace and update.
"""

from __future__ import annotations

from lightning.fabric.strategies.registry import _StrategyRegistry
from lightning.pytorch.strategies import DDPStrategy

from lightning_lowrank.strategies.mixin import LowRankMixin


class LowRankDDPStrategy(LowRankMixin, DDPStrategy):
    """``DDPStrategy`` with projected optimizer state: ``Trainer(strategy="lowrank_ddp", devices=N)``."""

    strategy_name = "lowrank_ddp"

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
