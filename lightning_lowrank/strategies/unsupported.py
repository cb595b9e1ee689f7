"""Names for sharded strategies that are not supported yet, so the user gets a reason, not 'unknown strategy'.

DeepSpeed owns the optimizer itself. (FSDP2 is ``lowrank_fsdp``, ``strategies/fsdp.py``.)
"""

from __future__ import annotations

from typing import Any

from lightning.fabric.strategies.registry import _StrategyRegistry


class _UnsupportedShardedStrategy:
    def __init__(self, requested: str, **_: Any) -> None:
        raise ValueError(
            f"strategy={requested!r} is not supported yet: DeepSpeed owns the optimizer and its state. Use "
            "strategy='lowrank' (one device), 'lowrank_ddp' (several devices) or 'lowrank_fsdp' (FSDP2)."
        )

    @classmethod
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        for name in ("lowrank_deepspeed",):
            strategy_registry.register(name, cls, description="not supported yet (raises)", requested=name)
