"""Lightning-free curvature probes (HVP, Hutchinson, power iteration) that callbacks call lazily."""

from lightning_lowrank.curvature.estimators import (
    EigenResult,
    HutchinsonResult,
    hutchinson,
    hvp,
    rademacher_like,
    subspace_diagonal,
    top_eigenvalues,
)

__all__ = [
    "EigenResult",
    "HutchinsonResult",
    "hutchinson",
    "hvp",
    "rademacher_like",
    "subspace_diagonal",
    "top_eigenvalues",
]
