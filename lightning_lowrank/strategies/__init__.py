"""Lightning strategies; importing this module registers their names with Lightning."""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_lowrank.strategies.ddp import LowRankDDPStrategy
from lightning_lowrank.strategies.fsdp import LowRankFSDPStrategy
from lightning_lowrank.strategies.mixin import LowRankMixin
from lightning_lowrank.strategies.single import LowRankStrategy
from lightning_lowrank.strategies.unsupported import _UnsupportedShardedStrategy


def register_strategies() -> None:
    """Register ``lowrank``, ``lowrank_ddp``, ``lowrank_ddp_spawn``, ``lowrank_ddp_fork``, ``lowrank_fsdp``
    (idempotent)."""
    if "lowrank" in StrategyRegistry:
        return
    for cls in (LowRankStrategy, LowRankDDPStrategy, LowRankFSDPStrategy, _UnsupportedShardedStrategy):
        cls.register_strategies(StrategyRegistry)


register_strategies()

__all__ = ["LowRankDDPStrategy", "LowRankFSDPStrategy", "LowRankMixin", "LowRankStrategy", "register_strategies"]
