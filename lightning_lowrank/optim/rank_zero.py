"""Warnings said once per job: on process 0 of a torch.distributed run (every rank reaches the same conclusion)."""

from __future__ import annotations

import warnings

import torch.distributed as dist


def is_rank_zero() -> bool:
    """True without torch.distributed, or on its rank 0."""
    return not dist.is_available() or not dist.is_initialized() or dist.get_rank() == 0


def warn_rank_zero(message: str, stacklevel: int = 2) -> None:
    """``warnings.warn`` on rank 0 only; ``stacklevel`` counts from the caller, as for ``warnings.warn``."""
    if is_rank_zero():
        warnings.warn(message, stacklevel=stacklevel + 1)
