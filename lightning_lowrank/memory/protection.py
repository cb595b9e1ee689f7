"""The planner's protected subspaces (issue 25): the bases ``ProtectedSubspaces`` would hand the optimizer.

``plan(..., protect=ratio)`` plans ``ProtectedSubspaces(ratio, schedule="uniform", target_modules=...,
exclude=...)`` at its first task: the same weights (its pattern checks, then ``select_lowrank_params``),
the same k per layer, and the real ``ProjectedOptimizer.protect`` given meta U (m x k) and V (n x k). ``protect``
stores each side as the smaller of the basis and its complement (a full QR of the basis, which runs on meta tensors),
so the planned bytes are what the optimizer stores, in the report's "protected bases" kind.

The figure is the first task's, and every task's under ``schedule="uniform"``: a progressive schedule protects more
in each later task, and an adaptive one sets each layer's later k from its measured importance.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_lowrank.memory.figures import MemoryReport, format_bytes
from lightning_lowrank.optim.projected import ProjectedOptimizer
from lightning_lowrank.selection import select_lowrank_params

# ProtectedSubspaces._begin_task's k: floor(ratio x min(m, n)) with its slack for binary rounding (0.29 x 100 is
# 28.999...), capped at min(m, n). Kept equal to the callback's (tests/memory/test_plan_protected.py checks a real run).
_SLACK = 1e-9


def protected_rank(ratio: float, shape: Sequence[int]) -> int:
    """k for a weight of ``shape`` under ``ratio``: ``ProtectedSubspaces``' uniform schedule."""
    side = min(shape)
    return min(math.floor(ratio * side + _SLACK), side)


def protect_takes_bits() -> bool:
    """Whether this version's ``ProjectedOptimizer.protect`` stores quantized bases (its ``bits`` argument)."""
    return "bits" in inspect.signature(ProjectedOptimizer.protect).parameters


@dataclass(frozen=True)
class PlannedProtection:
    """What ``plan(protect=...)`` protects: the ratio, the callback's normalised patterns and the bases' bits."""

    ratio: float
    targets: tuple[str, ...] | None
    exclude: tuple[str, ...]
    bits: int | None = None

    @classmethod
    def from_options(
        cls,
        protect: float | None,
        targets: Sequence[str] | str | None,
        exclude: Sequence[str] | str,
        bits: int | None,
        *,
        layerwise: bool,
        fsdp: int | None,
    ) -> PlannedProtection | None:
        """Checked before anything is built, as ``ProtectedSubspaces`` checks them (None: no protection)."""
        if protect is None:
            options = (("protect_targets", targets), ("protect_exclude", exclude or None), ("protect_bits", bits))
            given = [f"{name}={value!r}" for name, value in options if value is not None]
            if given:
                raise ValueError(f"plan() got {', '.join(given)} without protect=RATIO: they shape its protection")
            return None
        if isinstance(protect, bool) or not isinstance(protect, (int, float)) or not 0.0 <= protect <= 1.0:
            raise ValueError(
                f"plan(protect=...) is ProtectedSubspaces' ratio, the share of min(m, n) protected: a number in "
                f"[0, 1], got {protect!r}"
            )
        if layerwise or fsdp is not None:
            what = "layerwise=True" if layerwise else f"fsdp={fsdp} (lowrank_fsdp, FSDP2)"
            raise ValueError(
                f"plan(protect=...) with {what}: ProtectedSubspaces refuses it at setup (layer-wise updates run in "
                "gradient hooks, where they are not confined; a sharded weight has no whole matrix for its SVD). "
                "Plan protection with layerwise=False and without fsdp."
            )
        if bits is not None and not protect_takes_bits():
            raise ValueError(
                f"plan(protect_bits={bits!r}): this version's ProjectedOptimizer.protect stores the bases in "
                "float32 only (it has no bits argument); leave protect_bits out"
            )
        return cls(
            float(protect), _patterns("protect_targets", targets), _patterns("protect_exclude", exclude) or (), bits
        )

    def apply(self, model: nn.Module, optimizers: Sequence[Optimizer]) -> dict[str, tuple[int, int]]:
        """Hand each targeted weight's meta bases to its optimizer's ``protect``, as the callback's first task does;
        (k, min(m, n)) of every targeted layer, by name (k = 0: not protected)."""
        try:
            targets = select_lowrank_params(model, self.targets, self.exclude)
        except ValueError as error:  # a pattern that matches nothing: the message names the candidates
            raise ValueError(f"plan(protect=...) as ProtectedSubspaces: {error}") from None
        if not targets:
            raise ValueError(
                "plan(protect=...) found no weight to protect: ProtectedSubspaces targets every trainable nn.Linear "
                "but output heads by default, and this model has none; name the layers with protect_targets=[...]"
            )
        owners = {p: opt for opt in optimizers for g in opt.param_groups for p in g["params"]}
        missing = [name for p, name in targets.items() if not isinstance(owners.get(p), ProjectedOptimizer)]
        if missing:
            raise ValueError(
                f"plan(protect=...): ProtectedSubspaces confines updates through a ProjectedOptimizer, and "
                f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not in one; give every targeted weight "
                "to the optimizer, or leave the layer out (protect_exclude)"
            )
        options = {} if self.bits is None else {"bits": self.bits}
        ranks = {}
        for p, name in targets.items():
            k = protected_rank(self.ratio, p.shape)
            ranks[name] = (k, min(p.shape))
            if k:
                U, V = (_meta_basis(side, k, p) for side in p.shape)
                owners[p].protect({p: (U, V)}, **options)
        return ranks

    def note(self, report: MemoryReport, ranks: Mapping[str, tuple[int, int]]) -> str:
        """The verdict's line: what the bases take, and that it is the first task's figure."""
        protected = [k for k, _ in ranks.values() if k]
        frozen = sum(k == side for k, side in ranks.values())
        bits = f", {self.bits}-bit" if self.bits is not None else ""
        span = f"k from {min(protected)} to {max(protected)}" if protected else "k = 0: nothing protected"
        span += f"; {frozen} frozen, k = min(m, n), as the callback warns" if frozen else ""
        return (
            f"protected bases (ProtectedSubspaces(ratio={self.ratio:g}){bits}): "
            f"{format_bytes(report.state_by_kind.get('protected_bases', 0))} for {len(protected)} of {len(ranks)} "
            f"targeted layers ({span}), counted in the low-rank optimizer state (the dense row's optimizer does not "
            "protect). This is the first task's figure, every task's with schedule='uniform': 'progressive' protects "
            "more in each later task, and 'adaptive' sets later tasks' k per layer from its importance."
        )


def _patterns(kind: str, value: Sequence[str] | str | None) -> tuple[str, ...] | None:
    """As ``ProtectedSubspaces`` reads its ``target_modules`` and ``exclude`` (its module-level ``_patterns``; the
    planner does not import the callback, which would load Lightning): a string is one pattern, None the default."""
    if value is None:
        return None
    value = (value,) if isinstance(value, str) else tuple(value)
    if kind == "protect_targets" and not value:
        raise ValueError("plan(protect_targets=...) must name at least one pattern; None for the callback's default")
    for pattern in value:
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"plan({kind}=...) entries must be non-empty strings (module-name globs), got {pattern!r}")
    return value


def _meta_basis(rows: int, k: int, weight: Tensor) -> Tensor:
    """An m x k (or n x k) basis on meta in the callback's SVD dtype: float32, float64 for a float64 weight."""
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    return torch.empty(rows, k, dtype=dtype, device="meta")
