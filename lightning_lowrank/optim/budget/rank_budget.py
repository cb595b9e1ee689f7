"""``memory_budget``: one byte budget for the whole optimizer, shared out as per-layer ranks (``RankBudget``).

The cost model is ``costs.py``, the allocation ``allocate.py``; ``RankBudget`` decides the ranks of the layers due at a
refresh and keeps them in their state. Also here: the check that keeps weights dense where projecting them would
cost bytes (Adafactor's, SGD without momentum's), ``keep_dense_where_projection_costs``.

Both take the optimizer's parameters as ``(param, group, projected)`` triples (``ProjectedOptimizer.placements``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_lowrank.optim.budget.allocate import LayerCost, allocate_ranks, min_budget
from lightning_lowrank.optim.budget.costs import dense_state_bytes, layer_cost, projection_saving
from lightning_lowrank.optim.projection.bases import effective_rank, project, projected_dim
from lightning_lowrank.optim.projection.projectors import shares_dct_basis
from lightning_lowrank.optim.rank_zero import warn_rank_zero
from lightning_lowrank.optim.state.host_ints import read_int
from lightning_lowrank.optim.state.storage import state_dtype
from lightning_lowrank.optim.update.rules import projected_rule

RANK_FLOOR = 0.5  # under memory_budget, the share of an even split's rank that every layer keeps
# A projected layer's state for the budget, by the memory report's kind (``state_layout``): its rank and gradient
# energy (``RankBudget.reallocate``, under memory_budget) and its Hessian trace
# (``ProjectedOptimizer.set_layer_curvature``).
STATE_KEYS = {"rank": "scalars", "residual_energy": "curvature", "curvature_trace": "curvature"}
Placement = tuple[Tensor, dict[str, Any], bool]  # (param, its group, projected)


def budget_bytes(placements: Iterable[Placement]) -> tuple[int, dict[Tensor, LayerCost]]:
    """What a budget must hold besides the projected layers, and each projected layer's cost model."""
    placements = list(placements)
    costs = {p: layer_cost(p, g) for p, g, on in placements if on}
    other = sum(dense_state_bytes(p, g) for p, g, on in placements if not on and p.requires_grad)
    dct = {_dct_basis(p, g) for p, g, on in placements if on and shares_dct_basis(g)}
    other += sum(d * d * dtype.itemsize for d, dtype in dct)  # the shared DCT bases
    return other, costs


def _dct_basis(p: Tensor, group: dict[str, Any]) -> tuple[int, torch.dtype]:
    """The (size, dtype) of the shared DCT basis a layer scores with: built in the layers' state dtype."""
    return projected_dim(p.shape, group["side"]), state_dtype(group, p.dtype)


class RankBudget:
    """Per-layer ranks under ``memory_budget`` bytes: checked when the optimizer is built, decided at refreshes."""

    def __init__(self, memory_budget: int, rank_by: str) -> None:
        self.memory_budget, self.rank_by = memory_budget, rank_by

    def check_fits(self, placements: list[Placement]) -> None:
        for _, group, on in placements:
            for key in ("state_bits", "projector_bits"):
                if group[key] is not None and on:
                    raise ValueError(
                        f"memory_budget allocates ranks for full-precision state; it does not support {key}="
                        f"{group[key]!r} yet. Use one or the other."
                    )
        other, costs = budget_bytes(placements)
        needed = min_budget(list(costs.values()), other)
        if needed > self.memory_budget:
            raise ValueError(
                f"memory_budget={self.memory_budget} bytes cannot hold this optimizer's state: the dense part and "
                f"shared bases take {other} bytes and {len(costs)} projected layers at rank 1 take "
                f"{needed - other} more, so it needs at least {needed} bytes. Raise the budget or project fewer layers."
            )

    def reallocate(
        self,
        due: list[tuple[Tensor, dict[str, Any], dict[str, Tensor]]],
        old: Mapping[Tensor, Tensor],
        states: Mapping[Tensor, dict[str, Tensor]],
        placements: list[Placement],
    ) -> dict[Tensor, int]:
        """The new rank of each due layer (param, group, state); ``old``: the current P of those that have one.

        Weights: curvature traces when every stepped layer has one (``rank_by="curvature"``), else the gradient energy
        outside the current subspace, measured now for due layers (all of it for a layer without a subspace yet).
        Layers shrink before others grow, and a layer grows only into bytes free at that moment: the layers that are
        not due keep their rank, and layers not seen yet keep rank 1 reserved. Records the energy in each due layer's
        state; the caller stores the ranks (and creates the state of layers first seen at theirs).
        """
        for p, group, state in due:
            grad = p.grad.float()
            energy = grad.square().sum()
            if p in old:
                energy = energy - project(grad, old[p].float(), group["side"]).square().sum()
            state["residual_energy"] = energy.clamp(min=0).cpu()
        other, costs = budget_bytes(placements)
        layers = list(costs)
        stepped = [p for p in layers if "rank" in states[p]]
        key = "residual_energy"
        if self.rank_by == "curvature" and stepped and all("curvature_trace" in states[p] for p in stepped):
            key = "curvature_trace"
        weights = [float(states[p].get(key, 0.0)) for p in layers]
        room, cost_list = self.memory_budget - other, list(costs.values())
        # Each layer keeps at least RANK_FLOOR of the rank an even split of the budget gives it: curvature and
        # gradient energy move the rest. Without a floor, layers with a small trace (attention queries and keys)
        # fall to rank 1 and training suffers (examples/README.md, budget table).
        even = allocate_ranks([1.0] * len(layers), cost_list, room)
        floors = [max(1, int(RANK_FLOOR * r)) for r in even]
        targets = dict(zip(layers, allocate_ranks(weights, cost_list, room, floors)))
        current = {p: read_int(states[p]["rank"]) if "rank" in states[p] else 1 for p in layers}
        free = self.memory_budget - other - sum(costs[p].bytes(current[p]) for p in layers)
        ranks = {}
        for p, _, _ in sorted(due, key=lambda item: targets[item[0]] - current[item[0]]):
            cost = costs[p]
            affordable = current[p] + free // cost.per_rank if cost.per_rank else cost.max_rank
            new = max(1, min(targets[p], affordable))
            free -= cost.per_rank * (new - current[p])
            current[p] = ranks[p] = new
        return ranks


def keep_dense_where_projection_costs(
    placements: list[Placement], memory_budget: int | None, names: Mapping[Tensor, str] | None
) -> list[Tensor]:
    """Turn off the projection of weights whose dense rule holds less state than their projection would (in their
    group's ``lowrank_mask``); returns them.

    SGD without momentum holds nothing, so any projection (P, indices, even a seed) is pure overhead: those
    weights always stay dense. Adafactor's second moment is factored (m + n numbers): projected, a weight holds
    the rule's state for R plus its projector, which for an SVD-like P (d x r) is already more. Checked at the
    group's rank (at rank 1 under ``memory_budget``, which then caps each layer at the rank that still saves); a
    DCT basis shared by ``dct_scorer="matmul"`` counts once against the savings of the layers that would need it.
    One warning per reason names the weights kept dense.
    """
    candidates: list[tuple[int, Tensor, dict[str, Any], int]] = []  # (index, weight, group, saving)
    stateless: list[tuple[int, Tensor, dict[str, Any], int]] = []  # momentum-free SGD: nothing to save
    bases_in_use: set[tuple[int, torch.dtype]] = set()  # DCT bases that projected non-Adafactor weights hold
    for index, (p, group, on) in enumerate(placements):
        if on and projected_rule(group) == "sgd" and group["rule"] == "sgd" and not group["momentum"]:
            stateless.append((index, p, group, 0))
        elif on and projected_rule(group) == "adafactor":
            rank = 1 if memory_budget is not None else effective_rank(p.shape, group["rank"])
            candidates.append((index, p, group, projection_saving(p, group, rank, memory_budget)))
        elif on and shares_dct_basis(group):
            bases_in_use.add(_dct_basis(p, group))
    kept = [c for c in candidates if c[3] <= 0]
    per_basis: dict[tuple[int, torch.dtype], list] = {}
    for c in candidates:
        if c[3] > 0 and shares_dct_basis(c[2]):
            per_basis.setdefault(_dct_basis(c[1], c[2]), []).append(c)
    for (d, dtype), members in per_basis.items():
        if (d, dtype) not in bases_in_use and sum(c[3] for c in members) <= d * d * dtype.itemsize:
            kept += members
    if not kept and not stateless:
        return []
    dense_ids = {id(c[1]) for c in (*kept, *stateless)}
    groups = {id(g): g for _, g, _ in placements}
    for group in groups.values():
        if any(id(p) in dense_ids for p in group["params"]):
            mask = [on for p, g, on in placements if g is group]
            group["lowrank_mask"] = [on and id(p) not in dense_ids for p, on in zip(group["params"], mask)]
    if stateless:
        warn_rank_zero(
            f"SGD without momentum keeps no optimizer state, so projecting its weights could only add state (P, "
            f"its indices or a seed) and would replace SGD's step by a step inside a subspace: "
            f"{_labels(stateless, names)} {'is' if len(stateless) == 1 else 'are'} trained with plain dense SGD "
            "instead (keeping no state at all, as torch.optim.SGD). Use momentum > 0 to project them: the momentum "
            "buffer is what projection shrinks.",
            stacklevel=3,
        )
    if kept:
        projectors = ", ".join(sorted({repr(c[2]["projector"]) for c in kept}))
        warn_rank_zero(
            f"Adafactor's factored second moment holds only m + n numbers per weight, and projecting "
            f"{len(kept)} of {len(candidates)} Adafactor weight(s) with projector={projectors} would hold more "
            f"optimizer state than that (the projected state plus P, its indices or a shared d x d DCT basis): "
            f"{_labels(kept, names)}. They are trained with dense Adafactor instead. An SVD P (d x r) always costs "
            "more; a seed (projector='random') or a DCT index set (projector='dct', dct_scorer='fft') at a small "
            "rank can save.",
            stacklevel=3,
        )
    return [c[1] for c in sorted((*kept, *stateless), key=lambda c: c[0])]


def _labels(kept: list[tuple[int, Tensor, dict[str, Any], int]], names: Mapping[Tensor, str] | None) -> str:
    """``name (shape)`` of the first eight weights kept dense (``#index`` without a name), then how many more."""
    names = names or {}
    kept = sorted(kept, key=lambda c: c[0])
    labels = [f"{names[p]} {tuple(p.shape)}" if p in names else f"#{i} {tuple(p.shape)}" for i, p, _, _ in kept]
    return ", ".join(labels[:8]) + (f" and {len(labels) - 8} more" if len(labels) > 8 else "")
