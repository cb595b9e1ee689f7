"""Exact byte accounting of parameters, gradients and optimizer state, read off the tensors themselves.

Nothing here is estimated: every figure is a sum of ``numel * element_size`` over live tensors, so
it holds on CPU as on GPU. The peak allocated figure is the allocator's own and is CUDA-only.
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_lowrank.optim.projected import ProjectedOptimizer
from lightning_lowrank.optim.rank_zero import warn_rank_zero

PROJECTOR_PREFIX = "proj"  # every projector's per-layer state key starts with it (proj, proj_idx, proj_codes, ...)
_STEP_BYTES = torch.tensor(0.0).element_size()  # torch's optimizers keep ``step`` as a float32 scalar tensor
RULE_NAMES = {"adamw": "AdamW", "sgd": "SGD", "adafactor": "Adafactor"}

# Optimizer state by kind. Every state tensor falls in exactly one, so the kinds add up to the optimizer state.
STATE_KINDS = ("dense_moments", "projected_moments", "projection", "residual", "curvature", "scalars")
KIND_LABELS = {
    "dense_moments": "dense moments",
    "projected_moments": "projected moments",
    "projection": "projection (P, indices, seeds)",
    "residual": "residual state",
    "curvature": "curvature state",
    "scalars": "step/rank counters",
}
MOMENT_KEYS = frozenset({"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "row_var", "col_var"})
MOMENT_KEYS |= {"variance", "sum_sq"}
RESIDUAL_KEYS = frozenset({"residual_norm"})
CURVATURE_KEYS = frozenset({"hessian", "hessian_updates", "curvature_trace", "residual_energy"})
SCALAR_KEYS = frozenset({"step", "rank"})
QUANTIZED_SUFFIXES = ("_codes", "_absmax", "_shape")  # 8-bit moments: {key}_codes, {key}_absmax, {key}_shape

# Module groups, by module type first, then by the deepest part of the qualified name that names one.
GROUPS = ("attention", "mlp", "embeddings", "other")
GROUP_LABELS = {"attention": "Attention", "mlp": "MLP", "embeddings": "Embeddings", "other": "Other"}
ATTENTION_WORDS = ("attn", "attention", "q_proj", "k_proj", "v_proj", "o_proj", "query", "key", "value")
MLP_WORDS = ("mlp", "fc", "ffn", "gate_proj", "up_proj", "down_proj", "feed_forward")
MAX_NAMED = 8  # layers named in a warning before the list is cut to "... and N more"


def state_kind(key: str, projected: bool, value: Tensor | None = None) -> str:
    """The kind of optimizer state ``key`` holds for a projected (or dense) parameter.

    Projector keys start with ``proj``; an 8-bit moment's ``_codes``/``_absmax``/``_shape`` count as that moment
    (or as curvature for Sophia's ``hessian``). A key this list does not know (another optimizer's buffer) counts as
    a moment unless it is a single number, which counts with the step counters.
    """
    if key.startswith(PROJECTOR_PREFIX):
        return "projection"
    base = key
    for suffix in QUANTIZED_SUFFIXES:
        if key.endswith(suffix):
            base = key[: -len(suffix)]
            break
    if base in CURVATURE_KEYS:
        return "curvature"
    if base in RESIDUAL_KEYS:
        return "residual"
    moments = "projected_moments" if projected else "dense_moments"
    if base in MOMENT_KEYS:
        return moments
    if base in SCALAR_KEYS or (value is not None and value.numel() <= 1):
        return "scalars"
    return moments


def module_group(name: str, module: nn.Module | None = None) -> str:
    """``embeddings`` for an ``nn.Embedding``/``nn.EmbeddingBag``; else ``attention`` or ``mlp`` from the deepest
    part of the qualified name that contains one of their words (``blocks.0.attn.q_proj`` -> attention,
    ``blocks.0.mlp.fc1`` -> mlp); else ``other``."""
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return "embeddings"
    for part in reversed(name.lower().split(".")):
        if any(word in part for word in ATTENTION_WORDS):
            return "attention"
        if any(word in part for word in MLP_WORDS):
            return "mlp"
    return "other"


def max_rss_bytes() -> int:
    """The process's maximum resident set size so far (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss) if sys.platform == "darwin" else int(rss) * 1024


def _empty_kinds() -> dict[str, int]:
    return dict.fromkeys(STATE_KINDS, 0)


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
    state_by_kind: Mapping[str, int] = field(default_factory=dict, hash=False)  # state_bytes split by STATE_KINDS

    @property
    def saving_bytes(self) -> int:
        return self.baseline_bytes - self.state_bytes


class _StateTotals:
    """State summed over kinds, and what it saves against the dense baseline (for rows with ``state_by_kind``)."""

    state_by_kind: Mapping[str, int]
    baseline_bytes: int

    @property
    def state_bytes(self) -> int:
        return sum(self.state_by_kind.values())

    @property
    def saving_bytes(self) -> int:
        return self.baseline_bytes - self.state_bytes


@dataclass(frozen=True)
class ModuleMemory(_StateTotals):
    """One module (a layer) and the parameters it owns directly: ``state_by_kind`` splits their optimizer state
    (see ``STATE_KINDS``), ``baseline_bytes`` is what the module's own dense optimizer would hold for the stepped
    ones. A parameter owned by the model itself is its own row, under its parameter name."""

    name: str
    group: str
    kind: str  # the module's class name ("" when unknown or for a parameter the model holds itself)
    param_bytes: int
    state_by_kind: Mapping[str, int] = field(hash=False)
    baseline_bytes: int
    projected: int = 0  # how many of its weights are projected
    rank: int | None = None  # the (largest) rank of its projected weights


@dataclass(frozen=True)
class GroupMemory(_StateTotals):
    """The modules of one group (attention, MLP, embeddings, other), summed."""

    name: str
    modules: int
    projected: int
    param_bytes: int
    state_by_kind: Mapping[str, int] = field(hash=False)
    baseline_bytes: int


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
    modules: tuple[ModuleMemory, ...] = ()  # every module that owns parameters, in the model's order
    state_kinds: Mapping[str, int] | None = field(default=None, hash=False)  # see state_by_kind
    cpu_max_rss_bytes: int | None = None  # the process's maximum resident set size (the strategy fills it in)
    phases: Mapping[str, float] | None = field(default=None, hash=False)  # a MemoryPhases callback's phase_stats

    @property
    def optimizer_state_bytes(self) -> int:
        return self.dense_state_bytes + self.projected_state_bytes + self.projector_bytes

    @property
    def state_by_kind(self) -> dict[str, int]:
        """Optimizer state split by ``STATE_KINDS``; the kinds add up to ``optimizer_state_bytes`` (the shared DCT
        bases are in ``projection``). A report built without the split has the dense/projected/projector one."""
        if self.state_kinds is not None:
            return {kind: int(self.state_kinds.get(kind, 0)) for kind in STATE_KINDS}
        kinds = _empty_kinds()
        kinds.update(
            dense_moments=self.dense_state_bytes,
            projected_moments=self.projected_state_bytes,
            projection=self.projector_bytes,
        )
        return kinds

    @property
    def groups(self) -> tuple[GroupMemory, ...]:
        """``modules`` summed by group, in the order of ``GROUPS``, groups without modules left out."""
        out = []
        for group in GROUPS:
            members = [m for m in self.modules if m.group == group]
            if not members:
                continue
            kinds = _empty_kinds()
            for m in members:
                for kind, n in m.state_by_kind.items():
                    kinds[kind] += n
            out.append(
                GroupMemory(
                    group,
                    len(members),
                    sum(m.projected for m in members),
                    sum(m.param_bytes for m in members),
                    kinds,
                    sum(m.baseline_bytes for m in members),
                )
            )
        return tuple(out)

    def _totals(self) -> dict[str, int]:
        """The byte totals every export starts with."""
        return {
            "param_bytes": self.param_bytes,
            "grad_bytes": self.grad_bytes,
            "optimizer_state_bytes": self.optimizer_state_bytes,
            "dense_state_bytes": self.dense_state_bytes,
            "projected_state_bytes": self.projected_state_bytes,
            "projector_bytes": self.projector_bytes,
        }

    def as_dict(self) -> dict[str, Any]:
        """Every figure, JSON-ready: the fields, the totals and the per-layer, per-module and per-group splits."""
        out: dict[str, Any] = {
            "baseline": self.baseline,
            **self._totals(),
            "shared_basis_bytes": self.shared_basis_bytes,
            "baseline_state_bytes": self.baseline_state_bytes,
            "saving_bytes": self.saving_bytes,
            "saving_percent": self.saving_percent,
            "quantization_saving_bytes": self.quantization_saving_bytes,
            "state_by_kind": self.state_by_kind,
            "peak_allocated_bytes": self.peak_allocated_bytes,
            "cpu_max_rss_bytes": self.cpu_max_rss_bytes,
            "memory_budget": self.memory_budget,
            "budget_used_percent": self.budget_used_percent,
            "probe": None if self.probe is None else dict(self.probe),
            "phases": None if self.phases is None else dict(self.phases),
            "layers": [
                {**asdict(layer), "shape": list(layer.shape), "saving_bytes": layer.saving_bytes}
                for layer in self.layers
            ],
            "modules": [_figures(m) for m in self.modules],
            "groups": [_figures(g) for g in self.groups],
        }
        return out

    @property
    def saving_bytes(self) -> int:
        return self.baseline_state_bytes - self.optimizer_state_bytes

    def costly_layers(self) -> list[str]:
        """Names of the projected layers whose optimizer state exceeds what the dense baseline would hold for them
        (negative saving). Dense rows are left out: they differ from the baseline by a step counter at most."""
        return [layer.name for layer in self.layers if layer.saving_bytes < 0]

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
            **self._totals(),
            "baseline_state_bytes": self.baseline_state_bytes,
            "saving_bytes": self.saving_bytes,
            "saving_percent": self.saving_percent,
            "quantization_saving_bytes": self.quantization_saving_bytes,
        }
        for kind, n in self.state_by_kind.items():
            metrics[f"state/{kind}_bytes"] = n
        if self.peak_allocated_bytes is not None:
            metrics["peak_allocated_bytes"] = self.peak_allocated_bytes
        if self.cpu_max_rss_bytes is not None:
            metrics["cpu_max_rss_bytes"] = self.cpu_max_rss_bytes
        for key, value in (self.phases or {}).items():
            metrics[f"phase/{key}" + ("" if key == "samples" else "_peak_bytes")] = value
        for prefix_, rows in (("group", self.groups), ("module", self.modules)):
            for row in rows:
                metrics[f"{prefix_}/{row.name}/param_bytes"] = row.param_bytes
                metrics[f"{prefix_}/{row.name}/state_bytes"] = row.state_bytes
                metrics[f"{prefix_}/{row.name}/baseline_bytes"] = row.baseline_bytes
                for kind, n in row.state_by_kind.items():
                    if n:
                        metrics[f"{prefix_}/{row.name}/{kind}_bytes"] = n
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
    *,
    module: nn.Module | None = None,
    phases: Mapping[str, float] | None = None,
) -> MemoryReport:
    """Account ``params`` (the model's) and the state of ``optimizers``; ``names`` labels projected layers,
    ``refresh_stats`` (by name: refreshes, skipped, seconds, gap) adds refresh counters to them and ``probe`` (a
    ``CurvatureProbe``'s ``probe_stats``) is passed through to the report.

    ``module`` (the model) names every parameter's owning module for the per-module and per-group split; without
    it projected weights are named by ``names`` and every other parameter falls in one ``(unnamed)`` row.
    ``phases`` (a ``MemoryPhases``' ``phase_stats``) is passed through."""
    refresh_stats = refresh_stats or {}
    params = list({id(p): p for p in params}.values())
    owners = _owners(module, names)
    rows: dict[str, dict[str, Any]] = {}

    def row_of(p: Tensor) -> dict[str, Any]:
        name, owner = owners.get(id(p), (UNNAMED, None))
        if name not in rows:
            rows[name] = dict(
                name=name,
                group=module_group(name, owner),
                kind=type(owner).__name__ if owner is not None else "",
                param_bytes=0,
                state_by_kind=_empty_kinds(),
                baseline_bytes=0,
                projected=0,
                rank=None,
            )
        return rows[name]

    for p in params:  # rows in the model's order
        row_of(p)["param_bytes"] += tensor_bytes(p)

    layers: list[LayerMemory] = []
    dense_state = projected_state = projector = shared = adamw = quant_saving = 0
    totals = _empty_kinds()
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
            is_projected = p in projected_params
            kinds = _empty_kinds()
            for key, value in state.items():
                if isinstance(value, Tensor):
                    kinds[state_kind(key, is_projected, value)] += tensor_bytes(value)
            p_baseline = baseline_state_bytes(p, group_of[p])
            adamw += p_baseline
            total = sum(kinds.values())
            row = row_of(p)
            row["baseline_bytes"] += p_baseline
            for kind, n in kinds.items():
                row["state_by_kind"][kind] += n
                totals[kind] += n
            if is_projected:
                own = kinds["projection"]
                projected_state += total - own
                projector += own
                group = projected_params[p]
                rank = opt.layer_rank(p)
                row["projected"] += 1
                row["rank"] = max(row["rank"] or 0, rank)
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
                        p_baseline,
                        _opt_int(stats.get("refreshes")),
                        _opt_int(stats.get("skipped")),
                        stats.get("seconds"),
                        _opt_int(stats.get("gap")),
                        kinds,
                    )
                )
            else:
                dense_state += total
        if isinstance(opt, ProjectedOptimizer):
            bases = sum(tensor_bytes(b) for b in opt.dct_bases().values())
            shared += bases
            projector += bases
            totals["projection"] += bases
    peak = None
    if device is not None and device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    report = MemoryReport(
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
        modules=tuple(ModuleMemory(**row) for row in rows.values()),
        state_kinds=totals,
        phases=None if phases is None else dict(phases),
    )
    warn_negative_saving(report)
    return report


def warn_negative_saving(report: MemoryReport) -> None:
    """One warning when ``report`` shows a negative saving, naming the layers that hold more state than dense (the
    first ``MAX_NAMED``), or the shared DCT bases when no layer does. Silent when everything saves or breaks even."""
    costly = report.costly_layers()
    if not costly and report.saving_bytes >= 0:
        return
    base = report.baseline
    total = f"in total it saves {format_bytes(report.saving_bytes)} ({report.saving_percent:.1f}%)"
    if costly:
        by_name = {layer.name: layer for layer in report.layers}
        shown = []
        for name in costly[:MAX_NAMED]:
            layer = by_name.get(name)
            detail = f" (rank {layer.rank}, {layer.projector})" if layer else ""
            shown.append(name + detail)
        more = f" and {len(costly) - MAX_NAMED} more" if len(costly) > MAX_NAMED else ""
        message = (
            f"{len(costly)} layer(s) hold more optimizer state than dense {base} would (negative saving): "
            f"{', '.join(shown)}{more}; {total}. A rank near the smaller side, or a P (d x r) next to a small dense "
            "state (Adafactor's), costs more than it saves: lower `rank`, pick a projector that stores less "
            "(dct, random), or leave these layers out (`exclude`)."
        )
    elif report.shared_basis_bytes:
        message = (
            f"The low-rank state holds more than dense {base} would: every layer saves, but the shared DCT bases "
            f"({format_bytes(report.shared_basis_bytes)}) outweigh it; {total}. dct_scorer='fft' keeps no d x d basis."
        )
    else:
        message = (
            f"The low-rank state holds more than dense {base} would: no projected layer costs more, but the step "
            f"counters {base} does not keep outweigh the saving; {total}."
        )
    warn_rank_zero(message, stacklevel=3)


def format_bytes(n: float) -> str:
    """Binary units, two decimals below 100 and none above: 0 B, 812 B, 1.50 KiB, 23.45 MiB, 1000 MiB."""
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            break
        n /= 1024
    if unit == "B":
        return f"{sign}{int(n)} B"
    return f"{sign}{n:.0f} {unit}" if n >= 100 else f"{sign}{n:.2f} {unit}"


UNNAMED = "(unnamed)"


def _owners(module: nn.Module | None, names: Mapping[Tensor, str]) -> dict[int, tuple[str, nn.Module | None]]:
    """id(param) -> (row name, owning module): the module's qualified name, or the parameter's for one the model
    holds itself."""
    owners: dict[int, tuple[str, nn.Module | None]] = {}
    if module is not None:
        for module_name, m in module.named_modules():
            for param_name, p in m.named_parameters(recurse=False):
                if id(p) not in owners:  # tied weights: the first owner
                    owners[id(p)] = (module_name, m) if module_name else (param_name, None)
    for p, name in names.items():
        owners.setdefault(id(p), (name, None))
    return owners


def _figures(row: ModuleMemory | GroupMemory) -> dict[str, Any]:
    return {
        **asdict(row),
        "state_by_kind": dict(row.state_by_kind),
        "state_bytes": row.state_bytes,
        "saving_bytes": row.saving_bytes,
    }


def _opt_int(value: float | None) -> int | None:
    return None if value is None else int(value)


def _projected(opt: Optimizer) -> dict[Tensor, dict]:
    if not isinstance(opt, ProjectedOptimizer):
        return {}
    return {p: group for group in opt.param_groups for p, on in zip(group["params"], opt.projection_mask(group)) if on}
