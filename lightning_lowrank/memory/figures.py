"""What a memory report holds: the figures (bytes per layer, module, group and state kind) and how they read.

Data only: the figures are filled in by ``accounting.account_memory`` (or the planner) and drawn by ``report``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import Tensor

from lightning_lowrank.memory.groups import GROUPS
from lightning_lowrank.optim.state.layout import STATE_KINDS

# Labels of the optimizer state's kinds (``STATE_KINDS``: every state tensor falls in exactly one).
KIND_LABELS = {
    "dense_moments": "dense moments",
    "projected_moments": "projected moments",
    "projection": "projection (P, indices, seeds)",
    "residual": "residual state",
    "curvature": "curvature state",
    "scalars": "step/rank counters",
    "protected_bases": "protected bases",
}


def tensor_bytes(t: Tensor) -> int:
    """The unit every figure is a sum of: a live tensor's ``numel * element_size``."""
    return t.numel() * t.element_size()


def empty_kinds() -> dict[str, int]:
    """Zero bytes for every state kind, so that every split names all of them."""
    return dict.fromkeys(STATE_KINDS, 0)


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
        """Bytes saved against the dense baseline (negative: more than it)."""
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
        """Bytes saved against the dense baseline (negative: more than it)."""
        return self.baseline_bytes - self.state_bytes


@dataclass(frozen=True)
class ModuleMemory(_StateTotals):
    """One module (a layer) and the parameters it owns directly: ``state_by_kind`` splits their optimizer state
    (see ``STATE_KINDS``), ``baseline_bytes`` is what the module's own dense optimizer would hold for the stepped
    ones. A parameter owned by the model itself is its own row, under its parameter name. ``frozen_bytes`` is the
    part of ``param_bytes`` that does not train (``requires_grad=False``): no gradient, no optimizer state."""

    name: str
    group: str
    kind: str  # the module's class name ("" when unknown or for a parameter the model holds itself)
    param_bytes: int
    state_by_kind: Mapping[str, int] = field(hash=False)
    baseline_bytes: int
    projected: int = 0  # how many of its weights are projected
    rank: int | None = None  # the (largest) rank of its projected weights
    frozen_bytes: int = 0

    @property
    def frozen(self) -> bool:
        """Every parameter it owns is frozen: it trains nothing and holds no optimizer state."""
        return self.param_bytes > 0 and self.frozen_bytes == self.param_bytes


@dataclass(frozen=True)
class GroupMemory(_StateTotals):
    """The modules of one group (attention, MLP, embeddings, other), summed; ``modules`` counts them all, ``frozen``
    those of them that train nothing (``ModuleMemory.frozen``)."""

    name: str
    modules: int
    projected: int
    param_bytes: int
    state_by_kind: Mapping[str, int] = field(hash=False)
    baseline_bytes: int
    frozen: int = 0
    frozen_bytes: int = 0

    @property
    def trainable(self) -> int:
        """The modules that train (hold optimizer state once stepped): ``modules - frozen``."""
        return self.modules - self.frozen


@dataclass(frozen=True)
class MemoryReport:
    """Totals in bytes. Optimizer state = dense part + projected part + projector storage.

    ``grad_bytes`` is what the trainable parameters' ``.grad`` buffers take during a step (Lightning may
    already have freed them when the report is made at the end of training).

    ``baseline_state_bytes`` is what the module's own optimizer (dense AdamW, SGD or Adafactor) would hold for the
    same stepped parameters; ``baseline`` names it.

    ``grad_bytes`` in layer-wise mode (``LayerwiseProjectedOptimizer``) counts the largest single gradient of the
    parameters it updates, not their sum: each is freed right after its update inside backward (without gradient
    accumulation; with it, dense parameters keep theirs through the window).

    ``frozen_param_bytes`` is the part of ``param_bytes`` that does not train (``requires_grad=False``): it has no
    gradient and no optimizer state, so neither ``grad_bytes`` nor the baseline counts it.

    ``shared_basis_bytes`` (``dct_scorer="matmul"``: one d x d DCT basis per size, shared by the layers of that size)
    is in the optimizer state and its ``projection`` kind, but in no layer's or module's row: the rows plus it add up
    to ``optimizer_state_bytes``.

    ``nonfinite_steps`` counts the optimizer steps skipped because a gradient held an inf or NaN.

    ``ranks`` > 1: the parameters are sharded by FSDP2 over that many ranks and every byte is one rank's (its rows of
    parameters, gradients and moments; replicated P, indices and counters in full), or with ``summed`` the sum over
    all of them (``ranks.sum_over_ranks``). Layer shapes stay global.

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
    nonfinite_steps: int = 0  # optimizer steps skipped for an inf or NaN gradient (``nonfinite="skip"``)
    layerwise: bool = False  # parameters updated in hooks during backward: ``grad_bytes`` is the largest one
    ranks: int = 1  # FSDP2: the ranks the parameters are sharded over; bytes are one rank's unless ``summed``
    summed: bool = False  # every byte figure is the sum over the ``ranks`` ranks (``sum_over_ranks``)
    frozen_param_bytes: int = 0  # of param_bytes, the parameters with requires_grad=False

    @property
    def optimizer_state_bytes(self) -> int:
        """Every byte of optimizer state: dense, projected, and projections."""
        return self.dense_state_bytes + self.projected_state_bytes + self.projector_bytes

    @property
    def state_by_kind(self) -> dict[str, int]:
        """Optimizer state split by ``STATE_KINDS``; the kinds add up to ``optimizer_state_bytes`` (the shared DCT
        bases are in ``projection``). A report built without the split has the dense/projected/projector one."""
        if self.state_kinds is not None:
            return {kind: int(self.state_kinds.get(kind, 0)) for kind in STATE_KINDS}
        kinds = empty_kinds()
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
            kinds = empty_kinds()
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
                    sum(m.frozen for m in members),
                    sum(m.frozen_bytes for m in members),
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
            "frozen_param_bytes": self.frozen_param_bytes,
            "baseline_state_bytes": self.baseline_state_bytes,
            "saving_bytes": self.saving_bytes,
            "saving_percent": self.saving_percent if self.baseline_state_bytes else None,  # undefined against 0 B
            "costly_layers": self.costly_layers(),
            "quantization_saving_bytes": self.quantization_saving_bytes,
            "nonfinite_steps": self.nonfinite_steps,
            "layerwise": self.layerwise,
            "ranks": self.ranks,
            "summed": self.summed,
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
        """Optimizer-state bytes saved against the module's own optimizer held densely (negative: more)."""
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
        """The saving as a share of the baseline; 0.0 when the baseline holds nothing (SGD without momentum), where
        a share is undefined: ``saving_text`` and the JSON (null) say so instead."""
        return 100.0 * self.saving_bytes / self.baseline_state_bytes if self.baseline_state_bytes else 0.0

    def saving_text(self) -> str:
        """The saving as the report prints it, never dressed up: ``1.20 MiB (62.5%)``, ``-804 B (-3.1%; more than
        dense AdamW holds)``, or against a baseline that holds nothing ``0 B (dense SGD holds no state)``."""
        text = format_bytes(self.saving_bytes)
        if not self.baseline_state_bytes:
            return f"{text} (dense {self.baseline} holds no state)"
        more = f"; more than dense {self.baseline} holds" if self.saving_bytes < 0 else ""
        return f"{text} ({self.saving_percent:.1f}%{more})"

    def as_metrics(self, prefix: str = "lowrank/", *, layers: bool = False) -> dict[str, float]:
        """Flat scalar figures for a Lightning logger: the headline totals, the split by kind and the module groups'
        totals, a few dozen columns whatever the model's depth. ``layers=True`` adds one set of columns per module
        and per projected layer (the strategy's ``log_layers``): hundreds for a deep model."""
        metrics = {
            **self._totals(),
            "baseline_state_bytes": self.baseline_state_bytes,
            "saving_bytes": self.saving_bytes,
            "saving_percent": self.saving_percent,
            "quantization_saving_bytes": self.quantization_saving_bytes,
            "nonfinite_steps": self.nonfinite_steps,
        }
        for kind, n in self.state_by_kind.items():
            metrics[f"state/{kind}_bytes"] = n
        if self.frozen_param_bytes:
            metrics["frozen_param_bytes"] = self.frozen_param_bytes
        if self.peak_allocated_bytes is not None:
            metrics["peak_allocated_bytes"] = self.peak_allocated_bytes
        if self.cpu_max_rss_bytes is not None:
            metrics["cpu_max_rss_bytes"] = self.cpu_max_rss_bytes
        for key, value in (self.phases or {}).items():
            metrics[f"phase/{key}" + ("" if key == "samples" else "_peak_bytes")] = value
        for prefix_, rows in (("group", self.groups), ("module", self.modules if layers else ())):
            for row in rows:
                metrics[f"{prefix_}/{row.name}/param_bytes"] = row.param_bytes
                metrics[f"{prefix_}/{row.name}/state_bytes"] = row.state_bytes
                metrics[f"{prefix_}/{row.name}/baseline_bytes"] = row.baseline_bytes
                for kind, n in row.state_by_kind.items() if layers else ():
                    if n:
                        metrics[f"{prefix_}/{row.name}/{kind}_bytes"] = n
        if self.memory_budget is not None:
            metrics["memory_budget"] = self.memory_budget
            metrics["budget_used_percent"] = self.budget_used_percent
        for key, value in (self.probe or {}).items():
            metrics[f"probe_{key}"] = value
        refreshed = [layer for layer in self.layers if layer.refreshes is not None]
        if refreshed:  # the SubspaceRefresh totals; per layer with layers=True
            metrics["refresh/total"] = sum(layer.refreshes or 0 for layer in refreshed)
            metrics["refresh/skipped"] = sum(layer.skipped or 0 for layer in refreshed)
            metrics["refresh/seconds"] = sum(layer.refresh_seconds or 0.0 for layer in refreshed)
        if layers:
            metrics.update(self._layer_metrics())
        return {prefix + k: float(v) for k, v in metrics.items()}

    def _layer_metrics(self) -> dict[str, float]:
        """One column per projected layer and figure: its rank under ``memory_budget``, its refresh counters."""
        metrics: dict[str, float] = {}
        if self.memory_budget is not None:
            for layer in self.layers:
                metrics[f"rank/{layer.name}"] = layer.rank
        for layer in self.layers:
            for key in ("refreshes", "skipped", "refresh_seconds", "gap"):
                if getattr(layer, key) is not None:
                    metrics[f"{key}/{layer.name}"] = getattr(layer, key)
        return metrics


def _figures(row: ModuleMemory | GroupMemory) -> dict[str, Any]:
    return {
        **asdict(row),
        "state_by_kind": dict(row.state_by_kind),
        "state_bytes": row.state_bytes,
        "saving_bytes": row.saving_bytes,
        **({"trainable": row.trainable} if isinstance(row, GroupMemory) else {"frozen": row.frozen}),
    }
