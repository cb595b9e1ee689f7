"""Projected optimizers: plain torch, no Lightning."""

from lightning_lowrank.optim.projected_adamw import SUPPORTED_OPTIMIZERS, ProjectedAdamW
from lightning_lowrank.optim.projection import PROJECTORS

__all__ = ["PROJECTORS", "SUPPORTED_OPTIMIZERS", "ProjectedAdamW"]
