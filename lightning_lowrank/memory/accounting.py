"""Exact byte accounting of parameters, gradients and optimizer state, read off the tensors themselves.

Nothing here is estimated: every figure is a sum of ``numel * element_size`` over live tensors, so
it holds on CPU as on GPU. The peak allocated figure is the allocator's own and is CUDA-only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_lowrank.optim.projected import ProjectedOptimizer

PROJECTOR_PREFIX = "proj"  # every projector's per-layer state key starts with it (proj, proj_idx, proj_codes, ...)
_STEP_BYTES = torch.tensor(0.0).element_size()  # torch's optimizers keep ``step`` as a float32 scalar tensor
RULE_NAMES = {"adamw": "AdamW", "sgd": "SGD", "adafactor": "Adafactor"}


def tensor_bytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def baseline_state_bytes(param: Tensor, group: dict) -> int:
    """Bytes the module's own torch optimizer (the group's rule, dense) holds for ``param`` once it has stepped:
    AdamW/Adam two moments and a step; SGD a momentum buffer (none without momentum); Adafactor a step and
    row/column statistics (a full variance for vectors)."""
    rule, es = group.get("rule", "adamw"), param.element_size()
    if rule == "sgd":
        return tensor_bytes(param) if group.get("momentum", 0) else 0
    if rule == "adafactor":
        if param.dim() < 2:
            return tensor_bytes(param) + _STEP_BYTES
        rows, cols = param.numel() // param.shape[-1], param.numel() // param.shape[-2]
        return (rows + cols) * es + _STEP_BYTES
    return 2 * tensor_bytes(param) + _STEP_BYTES


@dataclass(frozen=True)
class LayerMemory:
    """One projected weight. ``state_bytes`` includes its own projector storage (P or indices)."""

    name: str
    shape: tuple[int, int]
    rank: int
    projector: str
    state_bytes: int
    projector_bytes: int
    baseline_bytes: int
    refreshes: int | None = None  # with a SubspaceRefresh callback: refreshes done
    skipped: int | None = None  # refreshes the adaptive rule skipped against a fixed gap
    refresh_seconds: float | None = None
    gap: int | None = None  # the layer's current refresh gap

    @property
    def saving_bytes(self) -> int:
        return self.baseline_bytes - self.state_bytes


@dataclass(frozen=True)
class MemoryReport:
    """Totals in bytes. Optimizer state = dense part + projected part + projector storage.

    ``grad_bytes`` is what the trainable parameters' ``.grad`` buffers take during a step (Lightning may
    already have freed them when the report is made at the end of training).

    ``baseline_state_bytes`` is what the module's own optimizer (dense AdamW, SGD or Adafactor) would hold for the
    same stepped parameters; ``baseline`` names it.

    ``probe`` is a ``CurvatureProbe``'s cost (its ``probe_stats``: calls, seconds, extra_bytes, step_seconds, ratio)
    when one runs: the curvature figures are not free, and this is where their price is shown next to the savings.
    """

    layers: tuple[LayerMemory, ...]
    param_bytes: int
    grad_bytes: int
    dense_state_bytes: int
    projected_state_bytes: int
    projector_bytes: int
    shared_basis_bytes: int
    baseline_state_bytes: int
    peak_allocated_bytes: int | None = None
    quantization_saving_bytes: int = 0  # what quantized projection matrices would take more in the weight dtype
    baseline: str = "AdamW"
    memory_budget: int | None = None  # the optimizers' memory_budget, when ranks are allocated under one
    probe: Mapping[str, float] | None = field(default=None, hash=False)  # a dict: kept out of the hash

    @property
    def optimizer_state_bytes(self) -> int:
        return self.dense_state_bytes + self.projected_state_bytes + self.projector_bytes

    @property
    def saving_bytes(self) -> int:
        return self.baseline_state_bytes - self.optimizer_state_bytes

    @property
    def budget_used_percent(self) -> float | None:
        """Optimizer state as a share of ``memory_budget`` (None without a budget)."""
        return None if not self.memory_budget else 100.0 * self.optimizer_state_bytes / self.memory_budget

    @property
    def saving_percent(self) -> float:
        return 100.0 * self.saving_bytes / self.baseline_state_bytes if self.baseline_state_bytes else 0.0

    def as_metrics(self, prefix: str = "lowrank/") -> dict[str, float]:
        """Flat scalar figures for a Lightning logger."""
        metrics = {
            "param_bytes": self.param_bytes,
            "grad_bytes": self.grad_bytes,
            "optimizer_state_bytes": self.optimizer_state_bytes,
            "dense_state_bytes": self.dense_state_bytes,
            "projected_state_bytes": self.projected_state_bytes,
            "projector_bytes": self.projector_bytes,
            "baseline_state_bytes": self.baseline_state_bytes,
            "saving_bytes": self.saving_bytes,
            "saving_percent": self.saving_percent,
            "quantization_saving_bytes": self.quantization_saving_bytes,
        }
        if self.peak_allocated_bytes is not None:
            metrics["peak_allocated_bytes"] = self.peak_allocated_bytes
        if self.memory_budget is not None:
            metrics["memory_budget"] = self.memory_budget
            metrics["budget_used_percent"] = self.budget_used_percent
            for layer in self.layers:
                metrics[f"rank/{layer.name}"] = layer.rank
        for key, value in (self.probe or {}).items():
            metrics[f"probe_{key}"] = value
        for layer in self.layers:
            for key in ("refreshes", "skipped", "refresh_seconds", "gap"):
                if getattr(layer, key) is not None:
                    metrics[f"{key}/{layer.name}"] = getattr(layer, key)
        return {prefix + k: float(v) for k, v in metrics.items()}


def account_memory(
    optimizers: Iterable[Optimizer],
    params: Iterable[Tensor],
    names: Mapping[Tensor, str],
    device: torch.device | None = None,
    refresh_stats: Mapping[str, Mapping[str, float]] | None = None,
    probe: Mapping[str, float] | None = None,
) -> MemoryReport:
    """Account ``params`` (the model's) and the state of ``optimizers``; ``names`` labels projected layers,
    ``refresh_stats`` (by name: refreshes, skipped, seconds, gap) adds refresh counters to them and ``probe`` (a
    ``CurvatureProbe``'s ``probe_stats``) is passed through to the report."""
    refresh_stats = refresh_stats or {}
    params = list({id(p): p for p in params}.values())
    layers: list[LayerMemory] = []
    dense_state = projected_state = projector = shared = adamw = quant_saving = 0
    baseline = "AdamW"
    budget = None
    for opt in optimizers:
        if getattr(opt, "memory_budget", None) is not None:
            budget = (budget or 0) + opt.memory_budget
        projected_params = _projected(opt)
        group_of = {p: g for g in opt.param_groups for p in g["params"]}
        baseline = RULE_NAMES.get(opt.param_groups[0].get("rule", "adamw"), type(opt).__name__)
        for p, state in opt.state.items():
            if not state:
                continue
            adamw += baseline_state_bytes(p, group_of[p])
            total = sum(tensor_bytes(v) for v in state.values() if isinstance(v, Tensor))
            if p in projected_params:
                own = sum(tensor_bytes(v) for k, v in state.items() if k.startswith(PROJECTOR_PREFIX))
                projected_state += total - own
                projector += own
                group = projected_params[p]
                rank = opt.layer_rank(p)
                name = names.get(p, "?")
                bits = group.get("projector_bits")
                if "proj_codes" in state:
                    quant_saving += min(p.shape) * rank * p.element_size() - own
                stats = refresh_stats.get(name, {})
                layers.append(
                    LayerMemory(
                        name,
                        tuple(p.shape),
                        rank,
                        group["projector"] + (f"/int{bits}" if bits else ""),
                        total,
                        own,
                        baseline_state_bytes(p, group_of[p]),
                        _opt_int(stats.get("refreshes")),
                        _opt_int(stats.get("skipped")),
                        stats.get("seconds"),
                        _opt_int(stats.get("gap")),
                    )
                )
            else:
                dense_state += total
        if isinstance(opt, ProjectedOptimizer):
            bases = sum(tensor_bytes(b) for b in opt.dct_bases().values())
            shared += bases
            projector += bases
    peak = None
    if device is not None and device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    return MemoryReport(
        layers=tuple(sorted(layers, key=lambda layer: layer.name)),
        param_bytes=sum(tensor_bytes(p) for p in params),
        grad_bytes=sum(tensor_bytes(p) for p in params if p.requires_grad),
        dense_state_bytes=dense_state,
        projected_state_bytes=projected_state,
        projector_bytes=projector,
        shared_basis_bytes=shared,
        baseline_state_bytes=adamw,
        peak_allocated_bytes=peak,
        quantization_saving_bytes=quant_saving,
        baseline=baseline,
        probe=None if probe is None else dict(probe),
        memory_budget=budget,
    )


def _opt_int(value: float | None) -> int | None:
    return None if value is None else int(value)


def _projected(opt: Optimizer) -> dict[Tensor, dict]:
    if not isinstance(opt, ProjectedOptimizer):
        return {}
    return {p: group for group in opt.param_groups for p, on in zip(group["params"], opt._mask(group)) if on}
