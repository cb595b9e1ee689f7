"""Projected optimizers: plain torch, no Lightning."""

from lightning_lowrank.optim.projected import SUPPORTED_OPTIMIZERS, ProjectedAdamW, ProjectedOptimizer
from lightning_lowrank.optim.projection import PROJECTORS
from lightning_lowrank.optim.residuals import RESIDUALS
from lightning_lowrank.optim.rules import RULES

__all__ = ["PROJECTORS", "RESIDUALS", "RULES", "SUPPORTED_OPTIMIZERS", "ProjectedAdamW", "ProjectedOptimizer"]
