"""Memory-efficient low-rank gradient optimization for PyTorch Lightning.

``import lightning_lowrank`` registers the strategy names (``"lowrank"``, ``"lowrank_ddp"``, ...).
"""

from lightning_lowrank.callbacks import CurvatureProbe, MemoryPhases, SubspaceRefresh
from lightning_lowrank.config import LowRankConfig
from lightning_lowrank.memory import MemoryReport, Plan, account_memory, plan, render_memory_report
from lightning_lowrank.optim import ProjectedAdamW, ProjectedOptimizer
from lightning_lowrank.strategies import LowRankDDPStrategy, LowRankStrategy

__version__ = "0.1.0"

__all__ = [
    "CurvatureProbe",
    "LowRankConfig",
    "LowRankDDPStrategy",
    "LowRankStrategy",
    "MemoryPhases",
    "MemoryReport",
    "Plan",
    "ProjectedAdamW",
    "ProjectedOptimizer",
    "SubspaceRefresh",
    "account_memory",
    "plan",
    "render_memory_report",
]
