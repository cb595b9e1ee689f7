"""Memory accounting (computes) and the rich report (draws)."""

from lightning_lowrank.memory.accounting import LayerMemory, MemoryReport, account_memory
from lightning_lowrank.memory.report import format_bytes, render_memory_report

__all__ = ["LayerMemory", "MemoryReport", "account_memory", "format_bytes", "render_memory_report"]
