"""The rank at which one projector holds what another holds: DCT against SVD at equal optimizer memory.

The DCT keeps r int64 indices per layer where SVD keeps a d x r P, so at the same rank it holds less; the frontier
study (docs/benchmarks.md) compares them at equal bytes, and this is how a user gets that rank for their own model.
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

from lightning_lowrank.memory.plan import plan


def equal_memory_rank(model: nn.Module, rank: int, projector: str = "dct", like: str = "svd", **options: Any) -> int:
    """The largest rank at which ``projector`` holds no more optimizer state for ``model`` than ``like`` holds at
    ``rank`` (both planned on a meta twin of the model, with the same other ``options``: any ``LowRankStrategy``
    option). On the demo model (examples/byte_lm.py) SVD ranks 16, 32 and 64 give DCT ranks 19, 39 and 80.

    The rank stays below every 2-D weight's smaller side (where a weight would stay dense). Raises ValueError when even
    ``rank`` holds more under ``projector`` than under ``like``.
    """

    def state(r: int, which: str) -> int:
        with warnings.catch_warnings():  # what the planner says of a rank the search only tries is noise here
            warnings.simplefilter("ignore")
            return plan(model, rank=r, projector=which, **options).report.optimizer_state_bytes

    budget, start = state(rank, like), state(rank, projector)
    if start > budget:
        raise ValueError(
            f"projector={projector!r} at rank {rank} already holds more optimizer state than {like!r} at the same rank "
            f"({start} > {budget} bytes); there is no larger rank within {like!r}'s bytes."
        )
    # State grows with rank until a rank reaches a weight's smaller side, where that weight goes dense: search below.
    ceiling = min((min(p.shape) for p in model.parameters() if p.ndim == 2), default=rank + 1)
    low, high = rank, min(2 * rank, ceiling)
    while high < ceiling and state(high, projector) <= budget:  # a rank past the budget, then bisect
        low, high = high, min(2 * high, ceiling)
    if high == ceiling and state(high - 1, projector) <= budget:
        return high - 1
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if state(middle, projector) <= budget else (low, middle)
    return low
