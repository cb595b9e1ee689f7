"""Memory accounting (computes), the rich report (draws) and the planner (the report before training)."""

from lightning_lowrank.memory.accounting import account_memory, memory_report
from lightning_lowrank.memory.equal_bytes import equal_memory_rank
from lightning_lowrank.memory.figures import LayerMemory, MemoryReport, format_bytes
from lightning_lowrank.memory.plan import Plan, plan
from lightning_lowrank.memory.presets import PRESETS, llama_preset
from lightning_lowrank.memory.ranks import sum_over_ranks
from lightning_lowrank.memory.report import render_memory_report

__all__ = [
    "PRESETS",
    "LayerMemory",
    "MemoryReport",
    "Plan",
    "account_memory",
    "equal_memory_rank",
    "format_bytes",
    "llama_preset",
    "memory_report",
    "plan",
    "render_memory_report",
    "sum_over_ranks",
]
