"""Memory-efficient low-rank gradient optimization for PyTorch Lightning.

The strategy names (``"lowrank"``, ``"lowrank_ddp"``, ...) are registered with Lightning, in the Trainer's and in
Fabric's registry, as soon as both this package and ``lightning.pytorch`` are imported, in either order. Names are
loaded on first use, so ``import lightning_lowrank.optim`` (plain torch) does not load Lightning.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

from lightning_lowrank._registration import register_when_lightning_loads

__version__ = "0.1.0"

_EXPORTS = {
    "CurvatureProbe": "lightning_lowrank.callbacks",
    "MemoryPhases": "lightning_lowrank.callbacks",
    "ProtectedSubspaces": "lightning_lowrank.callbacks",
    "SubspaceRefresh": "lightning_lowrank.callbacks",
    "LowRankConfig": "lightning_lowrank.config",
    "MemoryReport": "lightning_lowrank.memory",
    "Plan": "lightning_lowrank.memory",
    "account_memory": "lightning_lowrank.memory",
    "equal_memory_rank": "lightning_lowrank.memory",
    "plan": "lightning_lowrank.memory",
    "render_memory_report": "lightning_lowrank.memory",
    "ProjectedAdamW": "lightning_lowrank.optim",
    "ProjectedOptimizer": "lightning_lowrank.optim",
    "LowRankDDPStrategy": "lightning_lowrank.strategies",
    "LowRankFabricDDPStrategy": "lightning_lowrank.fabric",
    "LowRankFabricFSDPStrategy": "lightning_lowrank.fabric",
    "LowRankFabricStrategy": "lightning_lowrank.fabric",
    "LowRankFSDPStrategy": "lightning_lowrank.strategies",
    "LowRankStrategy": "lightning_lowrank.strategies",
    "to_dense_checkpoint": "lightning_lowrank.checkpoint",
    # the memory report without Lightning (issue 28)
    "memory_report": "lightning_lowrank.memory",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lightning_lowrank' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    setattr(sys.modules[__name__], name, value)
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


register_when_lightning_loads()
