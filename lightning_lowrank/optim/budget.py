"""``memory_budget``: one byte budget for the whole optimizer, shared out as per-layer ranks (``BudgetMixin``).

The cost model is ``costs.py``, the allocation ``ranks.py``; this mixin keeps the ranks in the optimizer's state and
decides them at refreshes. It also holds the check that keeps Adafactor weights dense where projecting costs bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_lowrank.optim.costs import dense_state_bytes, layer_cost, projected_rule, projection_saving
from lightning_lowrank.optim.host_ints import read_int
from lightning_lowrank.optim.options import state_dtype
from lightning_lowrank.optim.projection import effective_rank, project, projected_dim
from lightning_lowrank.optim.projectors import LayerContext
from lightning_lowrank.optim.rank_zero import warn_rank_zero
from lightning_lowrank.optim.ranks import LayerCost, allocate_ranks, min_budget

RANK_FLOOR = 0.5  # under memory_budget, the share of an even split's rank that every layer keeps
# A projected layer's state for the budget, by the memory report's kind (``state_layout``): its rank and gradient
# energy (``_reallocate``, under memory_budget) and its Hessian trace (``ProjectedOptimizer.set_layer_curvature``).
KEY_KINDS = {"rank": "scalars", "residual_energy": "curvature", "curvature_trace": "curvature"}


class BudgetMixin:
    """Per-layer ranks under ``memory_budget``, for ``ProjectedOptimizer``."""

    memory_budget: int | None
    rank_by: str

    def budget_bytes(self) -> tuple[int, dict[Tensor, LayerCost]]:
        """What the budget must hold besides the projected layers, and each projected layer's cost model."""
        costs = {p: layer_cost(p, g) for g in self.param_groups for p, on in zip(g["params"], self._mask(g)) if on}
        other = 0
        for group in self.param_groups:
            for p, on in zip(group["params"], self._mask(group)):
                if not on and p.requires_grad:
                    other += dense_state_bytes(p, group)
        dct = {
            (projected_dim(p.shape, g["side"]), state_dtype(g, p.dtype))  # built in the layers' state dtype
            for g in self.param_groups
            if g["projector"] == "dct" and g["dct_scorer"] == "matmul"
            for p, on in zip(g["params"], self._mask(g))
            if on
        }
        other += sum(d * d * dtype.itemsize for d, dtype in dct)  # the shared DCT bases
        return other, costs

    def _keep_dense_where_projection_costs(self, names: Mapping[Tensor, str] | None) -> list[Tensor]:
        """Turn off the projection of weights whose dense rule holds less state than their projection would.

        SGD without momentum holds nothing, so any projection (P, indices, even a seed) is pure overhead: those
        weights always stay dense. Adafactor's second moment is factored (m + n numbers): projected, a weight holds
        the rule's state for R plus its projector, which for an SVD-like P (d x r) is already more. Checked at the
        group's rank (at rank 1 under ``memory_budget``, which then caps each layer at the rank that still saves); a
        DCT basis shared by ``dct_scorer="matmul"`` counts once against the savings of the layers that would need it.
        One warning per reason names the weights kept dense; returns them.
        """
        candidates: list[tuple[int, Tensor, dict[str, Any], int]] = []  # (index, weight, group, saving)
        stateless: list[tuple[int, Tensor, dict[str, Any], int]] = []  # momentum-free SGD: nothing to save
        bases_in_use: set[tuple[int, torch.dtype]] = set()  # DCT bases that projected non-Adafactor weights hold
        index = -1
        for group in self.param_groups:
            for p, on in zip(group["params"], self._mask(group)):
                index += 1
                shared = group["projector"] == "dct" and group["dct_scorer"] == "matmul"
                if on and projected_rule(group) == "sgd" and group["rule"] == "sgd" and not group["momentum"]:
                    stateless.append((index, p, group, 0))
                elif on and projected_rule(group) == "adafactor":
                    rank = 1 if self.memory_budget is not None else effective_rank(p.shape, group["rank"])
                    candidates.append((index, p, group, projection_saving(p, group, rank, self.memory_budget)))
                elif on and shared:
                    bases_in_use.add((projected_dim(p.shape, group["side"]), state_dtype(group, p.dtype)))
        kept = [c for c in candidates if c[3] <= 0]
        per_basis: dict[tuple[int, torch.dtype], list] = {}
        for c in candidates:
            if c[3] > 0 and c[2]["projector"] == "dct" and c[2]["dct_scorer"] == "matmul":
                key = (projected_dim(c[1].shape, c[2]["side"]), state_dtype(c[2], c[1].dtype))
                per_basis.setdefault(key, []).append(c)
        for (d, dtype), members in per_basis.items():
            if (d, dtype) not in bases_in_use and sum(c[3] for c in members) <= d * d * dtype.itemsize:
                kept += members
        if not kept and not stateless:
            return []
        dense_ids = {id(c[1]) for c in (*kept, *stateless)}
        for group in self.param_groups:
            mask = self._mask(group)
            if any(id(p) in dense_ids for p in group["params"]):
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

    def _reallocate(self, due: list[tuple[Tensor, dict[str, Any], LayerContext]], old: dict[Tensor, Tensor]) -> None:
        """Give the due layers their ranks under the budget (layers first seen get their state here).

        Weights: curvature traces when every stepped layer has one (``rank_by="curvature"``), else the gradient energy
        outside the current subspace, measured now for due layers (all of it for a layer without a subspace yet).
        Layers shrink before others grow, and a layer grows only into bytes free at that moment: the layers that are
        not due keep their rank, and layers not seen yet keep rank 1 reserved.
        """
        for p, group, _ in due:
            grad = p.grad.float()
            energy = grad.square().sum()
            if p in old:
                energy = energy - project(grad, old[p].float(), group["side"]).square().sum()
            self.state[p]["residual_energy"] = energy.clamp(min=0).cpu()
        other, costs = self.budget_bytes()
        layers = list(costs)
        stepped = [p for p in layers if "rank" in self.state[p]]
        key = "residual_energy"
        if self.rank_by == "curvature" and stepped and all("curvature_trace" in self.state[p] for p in stepped):
            key = "curvature_trace"
        weights = [float(self.state[p].get(key, 0.0)) for p in layers]
        room, cost_list = self.memory_budget - other, list(costs.values())
        # Each layer keeps at least RANK_FLOOR of the rank an even split of the budget gives it: curvature and
        # gradient energy move the rest. Without a floor, layers with a small trace (attention queries and keys)
        # fall to rank 1 and training suffers (examples/README.md, budget table).
        even = allocate_ranks([1.0] * len(layers), cost_list, room)
        floors = [max(1, int(RANK_FLOOR * r)) for r in even]
        targets = dict(zip(layers, allocate_ranks(weights, cost_list, room, floors)))
        current = {p: read_int(self.state[p]["rank"]) if "rank" in self.state[p] else 1 for p in layers}
        free = self.memory_budget - other - sum(costs[p].bytes(current[p]) for p in layers)
        for p, group, ctx in sorted(due, key=lambda item: targets[item[0]] - current[item[0]]):
            cost = costs[p]
            affordable = current[p] + free // cost.per_rank if cost.per_rank else cost.max_rank
            new = max(1, min(targets[p], affordable))
            free -= cost.per_rank * (new - current[p])
            current[p] = new
            if "rank" not in self.state[p]:
                self._init_projected_state(p, group, new)
            self.state[p]["rank"] = torch.tensor(new, dtype=torch.int64)
            ctx.rank = new

    def _check_budget_fits(self) -> None:
        for group in self.param_groups:
            for key in ("state_bits", "projector_bits"):
                if group[key] is not None and any(self._mask(group)):
                    raise ValueError(
                        f"memory_budget allocates ranks for full-precision state; it does not support {key}="
                        f"{group[key]!r} yet. Use one or the other."
                    )
        other, costs = self.budget_bytes()
        needed = min_budget(list(costs.values()), other)
        if needed > self.memory_budget:
            raise ValueError(
                f"memory_budget={self.memory_budget} bytes cannot hold this optimizer's state: the dense part and "
                f"shared bases take {other} bytes and {len(costs)} projected layers at rank 1 take "
                f"{needed - other} more, so it needs at least {needed} bytes. Raise the budget or project fewer layers."
            )


def _labels(kept: list[tuple[int, Tensor, dict[str, Any], int]], names: Mapping[Tensor, str] | None) -> str:
    """``name (shape)`` of the first eight weights kept dense (``#index`` without a name), then how many more."""
    names = names or {}
    kept = sorted(kept, key=lambda c: c[0])
    labels = [f"{names[p]} {tuple(p.shape)}" if p in names else f"#{i} {tuple(p.shape)}" for i, p, _, _ in kept]
    return ", ".join(labels[:8]) + (f" and {len(labels) - 8} more" if len(labels) > 8 else "")
