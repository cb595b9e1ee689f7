"""Ranks under a memory budget: which layer gets how much of the subspace, as plain arithmetic over byte costs.

A projected layer's optimizer state is affine in its rank r: ``fixed + per_rank * r`` bytes (the moments of the
projected gradient have r rows or columns, P has r columns, a DCT projector r indices). Given one weight per layer
(its curvature trace, or its gradient energy outside the current subspace), ``allocate_ranks`` makes ranks
proportional to the weights, clamped to [min_rank, max_rank], with the total within the budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class LayerCost:
    """Bytes of one projected layer's state as a function of its rank."""

    fixed: int
    per_rank: int
    max_rank: int  # the most rank worth giving it (below the point where it would hold more than dense state)

    def bytes(self, rank: int) -> int:
        return self.fixed + self.per_rank * rank


def min_budget(costs: Sequence[LayerCost], other_bytes: int = 0) -> int:
    """The smallest budget that fits every layer at rank 1, plus ``other_bytes`` (the dense part's state)."""
    return other_bytes + sum(c.bytes(1) for c in costs)


def allocate_ranks(
    weights: Sequence[float],
    costs: Sequence[LayerCost],
    budget: int,
    min_ranks: Sequence[int] | None = None,
) -> list[int]:
    """Ranks proportional to ``weights`` (negative weights count as 0) with ``sum(cost.bytes(rank)) <= budget``.

    Water-filling: r_l = clamp(lam * w_l, min_rank_l, max_rank_l) with the largest lam that fits, rounded down; the
    bytes rounding frees go, one rank at a time, to the layer furthest below its share (largest w_l / (r_l + 1)).
    ``min_ranks`` (default 1 each) must fit the budget themselves.
    """
    if len(weights) != len(costs):
        raise ValueError("one weight per layer cost")
    if budget < min_budget(costs):
        raise ValueError(f"a budget of {budget} bytes cannot hold every layer at rank 1 ({min_budget(costs)} bytes)")
    lows = [1] * len(costs) if min_ranks is None else [max(1, min(r, c.max_rank)) for r, c in zip(min_ranks, costs)]
    if sum(c.bytes(r) for c, r in zip(costs, lows)) > budget:
        raise ValueError(f"the minimum ranks {lows} do not fit a budget of {budget} bytes")
    w = [max(float(x), 0.0) for x in weights]
    if not any(w):
        w = [1.0] * len(w)
    free = budget - sum(c.fixed for c in costs)

    def ranks_at(lam: float) -> list[float]:
        return [min(max(lam * wl, lo), c.max_rank) for wl, lo, c in zip(w, lows, costs)]

    def used(ranks: Sequence[float]) -> float:
        return sum(c.per_rank * r for c, r in zip(costs, ranks))

    low, high = 0.0, max(c.max_rank / wl for wl, c in zip(w, costs) if wl > 0)
    for _ in range(100):  # bisection on lam: used() is non-decreasing in it
        mid = (low + high) / 2
        low, high = (mid, high) if used(ranks_at(mid)) <= free else (low, mid)
    ranks = [max(lo, int(r)) for lo, r in zip(lows, ranks_at(low))]
    left = free - used(ranks)
    while True:
        candidates = [i for i, c in enumerate(costs) if ranks[i] < c.max_rank and c.per_rank <= left]
        if not candidates:
            return ranks
        best = max(candidates, key=lambda i: (w[i] / (ranks[i] + 1), -i))
        ranks[best] += 1
        left -= costs[best].per_rank
