"""The lazy Hessian (``preconditioner="lazy_hessian"``): what a ``CurvatureProbe`` feeds into a layer's state.

The Sophia step itself is a rule (``rules.py``, ``"sophia"``); ``fold_curvature`` only folds a fresh estimate into its
state, ``ProjectedOptimizer.update_curvature`` routes the estimates here. Also which layers take them, and the
per-layer curvature traces that ``memory_budget`` with ``rank_by="curvature"`` reads (``set_layer_curvature``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_lowrank.optim.budget.rank_budget import Placement
from lightning_lowrank.optim.state.storage import moment_view
from lightning_lowrank.optim.update import rules


def fold_curvature(
    param: Tensor,
    state: dict[str, Tensor],
    estimate: Tensor,
    expected: tuple[int, ...],
    group: dict[str, Any],
    dtype: torch.dtype,
) -> None:
    """Fold one layer's fresh curvature diagonal (in its subspace coordinates, shaped ``expected``) into its lazy
    Hessian, reused until the next probe. ``dtype``: the layer's state dtype."""
    if "hessian_updates" not in state:
        raise ValueError(
            "update_curvature got a parameter without a lazy Hessian: it must be projected, in a group "
            "with preconditioner='lazy_hessian', and have taken a step (see curvature_params())"
        )
    if tuple(estimate.shape) != expected:
        raise ValueError(
            f"curvature diagonal for {tuple(param.shape)} must have shape {expected} (P's coordinates), "
            f"got {tuple(estimate.shape)}"
        )
    state["hessian_updates"] += 1
    with moment_view(state, "sophia", group, dtype) as moments:
        rules.fold_curvature_(
            moments["hessian"],
            estimate,
            int(state["hessian_updates"]),
            group["hessian_beta"],
            group["hessian_bias_correction"],
        )


def curvature_params(placements: list[Placement], states: Mapping[Tensor, dict[str, Tensor]]) -> list[Tensor]:
    """The projected weights of ``preconditioner="lazy_hessian"`` groups that have stepped (hold a lazy Hessian)."""
    return [
        p for p, g, on in placements if on and g["preconditioner"] == "lazy_hessian" and "hessian_updates" in states[p]
    ]


def set_layer_curvature(
    traces: Mapping[Tensor, float], states: Mapping[Tensor, dict[str, Tensor]], projected: set[Tensor]
) -> None:
    """Record each projected layer's Hessian trace (layers that have not stepped yet are skipped)."""
    for p, trace in traces.items():
        if p not in projected:
            raise ValueError(f"set_layer_curvature got a parameter of shape {tuple(p.shape)} that is not projected")
        if "step" in states[p]:
            states[p]["curvature_trace"] = torch.tensor(float(trace))
