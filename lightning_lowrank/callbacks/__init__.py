"""Lightning callbacks: they decide *when*; the strategy and optimizer decide *how*."""

from lightning_lowrank.callbacks.curvature_probe import CurvatureProbe
from lightning_lowrank.callbacks.memory_phases import MemoryPhases
from lightning_lowrank.callbacks.protected_subspaces import ProtectedSubspaces
from lightning_lowrank.callbacks.subspace_refresh import SubspaceRefresh

__all__ = ["CurvatureProbe", "MemoryPhases", "ProtectedSubspaces", "SubspaceRefresh"]
