"""The lazy-Hessian API of ``ProjectedOptimizer`` (``preconditioner="lazy_hessian"``): what a ``CurvatureProbe``
feeds in, and the per-layer curvature traces that ``memory_budget`` with ``rank_by="curvature"`` reads.

The Sophia step itself is a rule (``rules.py``, ``"sophia"``); this mixin only folds fresh estimates into its state.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from lightning_lowrank.optim import rules


class LazyHessianMixin:
    """Curvature in, for ``ProjectedOptimizer`` (which owns ``state`` and the param groups)."""

    def wants_curvature(self) -> bool:
        """Whether some group uses ``preconditioner="lazy_hessian"`` and so waits for ``update_curvature``."""
        return any(g["preconditioner"] == "lazy_hessian" and any(self._mask(g)) for g in self.param_groups)

    def curvature_params(self) -> list[Tensor]:
        """The projected weights whose lazy Hessian ``update_curvature`` refreshes (those that have stepped)."""
        return [
            p
            for g in self.param_groups
            if g["preconditioner"] == "lazy_hessian"
            for p, on in zip(g["params"], self._mask(g))
            if on and "hessian_updates" in self.state[p]
        ]

    @torch.no_grad()
    def update_curvature(self, diagonals: Mapping[Tensor, Tensor]) -> None:
        """Fold fresh curvature diagonals into the lazy Hessians, reused until the next call.

        Each diagonal is in the layer's current subspace coordinates, shaped like its projected gradient: what
        ``lightning_lowrank.curvature.subspace_diagonal`` returns for ``projection_matrix(param)``.
        """
        for p, estimate in diagonals.items():
            index, group = self._locate(p)
            state = self.state[p]
            if "hessian_updates" not in state:
                raise ValueError(
                    "update_curvature got a parameter without a lazy Hessian: it must be projected, in a group "
                    "with preconditioner='lazy_hessian', and have taken a step (see curvature_params())"
                )
            expected = self._projected_shape(p, group)
            if tuple(estimate.shape) != expected:
                raise ValueError(
                    f"curvature diagonal for {tuple(p.shape)} must have shape {expected} (P's coordinates), "
                    f"got {tuple(estimate.shape)}"
                )
            state["hessian_updates"] += 1
            with self._moments(p, "sophia", group) as moments:
                rules.fold_curvature_(
                    moments["hessian"],
                    estimate,
                    int(state["hessian_updates"]),
                    group["hessian_beta"],
                    group["hessian_bias_correction"],
                )

    def set_layer_curvature(self, traces: Mapping[Tensor, float]) -> None:
        """Record each projected layer's Hessian trace; with ``memory_budget`` and ``rank_by="curvature"`` the next
        refreshes give rank in proportion to it. Layers that have not stepped yet are skipped."""
        for p, trace in traces.items():
            if not self.is_projected(p):
                raise ValueError(f"set_layer_curvature got a parameter of shape {tuple(p.shape)} that is not projected")
            if self.state[p]:
                self.state[p]["curvature_trace"] = torch.tensor(float(trace))
