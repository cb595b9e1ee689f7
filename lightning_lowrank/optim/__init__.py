"""Projected optimizers: plain torch, no Lightning."""

from lightning_lowrank.optim.options import SUPPORTED_OPTIMIZERS, OptimizerOptions
from lightning_lowrank.optim.projected import ProjectedAdamW, ProjectedOptimizer
from lightning_lowrank.optim.projection.bases import PROJECTORS
from lightning_lowrank.optim.update.residuals import RESIDUALS
from lightning_lowrank.optim.update.rules import RULES

__all__ = [
    "OptimizerOptions",
    "PROJECTORS",
    "RESIDUALS",
    "RULES",
    "SUPPORTED_OPTIMIZERS",
    "ProjectedAdamW",
    "ProjectedOptimizer",
]
