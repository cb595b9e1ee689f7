"""Names for sharded strategies that are not supported yet, so the user gets a reason, not 'unknown strategy'.

FSDP hands the optimizer flattened 1-D shards of each weight, so a 2-D projection would need the
full gradient gathered first; DeepSpeed owns the optimizer itself.
"""

from __future__ import annotations

from typing import Any

from lightning.fabric.strategies.registry import _StrategyRegistry


class _UnsupportedShardedStrategy:
    def __init__(self, requested: str, **_: Any) -> None:
        raise ValueError(
            f"strategy={requested!r} is not supported yet: lightning_lowrank projects whole 2-D gradients, which "
            "FSDP and DeepSpeed shard. Use strategy='lowrank' (one device) or 'lowrank_ddp' (several devices)."
        )

    @classmethod
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        for name in ("lowrank_fsdp", "lowrank_deepspeed"):
            strategy_registry.register(name, cls, description="not supported yet (raises)", requested=name)
