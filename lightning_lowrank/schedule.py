"""When each layer refreshes its subspace: fixed gaps, a warm-up, and Q-GaLore's lazy (adaptive) rule.

Plain Python, no torch or Lightning: ``RefreshSchedule`` turns what the optimizer reports about each refresh
into the step of the layer's next refresh. The ``SubspaceRefresh`` callback is the glue around it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class LayerSchedule:
    """One layer's schedule and counters; plain values so it goes into a checkpoint as is."""

    gap: int
    next_refresh: int = 0  # the layer's update count at which it refreshes next
    history: list[float] = field(default_factory=list)  # similarities of the last refreshes
    refreshes: int = 0
    seconds: float = 0.0
    last_refresh_step: int = -1


@dataclass(frozen=True)
class RefreshPolicy:
    """``every`` steps; ``warmup_every`` during the first ``warmup`` steps; with ``adaptive``, a layer whose last
    ``queue_size`` refreshes all left its subspace nearly unchanged (mean similarity >= ``cos_threshold``) gets its
    gap multiplied by ``gamma_proj``, up to ``max_gap`` (Q-GaLore's names and defaults). The regular schedule
    starts with a refresh at update ``warmup``."""

    every: int = 200
    warmup: int = 0
    warmup_every: int = 1
    adaptive: bool = False
    cos_threshold: float = 0.4
    queue_size: int = 5
    gamma_proj: float = 2.0
    max_gap: int | None = None

    def __post_init__(self) -> None:
        for name in ("every", "warmup_every", "queue_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"warmup must be an int >= 0 (steps), got {self.warmup!r}")
        if not 0.0 <= self.cos_threshold <= 1.0:
            raise ValueError(f"cos_threshold must be in [0, 1] (a similarity), got {self.cos_threshold!r}")
        if not self.gamma_proj > 1.0:
            raise ValueError(
                f"gamma_proj must be > 1 (the factor a lazy layer's gap grows by), got {self.gamma_proj!r}"
            )
        if self.max_gap is not None and self.max_gap < self.every:
            raise ValueError(f"max_gap must be >= every ({self.every}), got {self.max_gap!r}")

    @property
    def gap_cap(self) -> int:
        return self.max_gap if self.max_gap is not None else 16 * self.every


class RefreshSchedule:
    """Per-layer schedules keyed by layer name."""

    def __init__(self, policy: RefreshPolicy, base_gaps: dict[str, int] | None = None) -> None:
        self.policy = policy
        self.base_gaps = base_gaps or {}
        self.layers: dict[str, LayerSchedule] = {}

    def layer(self, name: str) -> LayerSchedule:
        if name not in self.layers:
            self.layers[name] = LayerSchedule(gap=self.base_gaps.get(name, self.policy.every))
        return self.layers[name]

    def is_due(self, name: str, completed_steps: int) -> bool:
        return completed_steps >= self.layer(name).next_refresh

    def record(self, name: str, step: int, similarity: float | None, seconds: float) -> bool:
        """Account one refresh done at the layer's update count ``step``; False if it was already counted."""
        layer = self.layer(name)
        if step == layer.last_refresh_step:
            return False
        layer.last_refresh_step = step
        layer.refreshes += 1
        layer.seconds += seconds
        policy = self.policy
        if policy.adaptive and similarity is not None:
            layer.history = (layer.history + [similarity])[-policy.queue_size :]
            if (
                len(layer.history) == policy.queue_size
                and sum(layer.history) / policy.queue_size >= policy.cos_threshold
            ):
                layer.gap = min(int(layer.gap * policy.gamma_proj), policy.gap_cap)
                layer.history = []  # k fresh refreshes must agree again before the next growth
        in_warmup = step < policy.warmup
        layer.next_refresh = step + (min(policy.warmup_every, layer.gap) if in_warmup else layer.gap)
        return True

    def skipped(self, name: str, completed_steps: int) -> int:
        """Refreshes a fixed ``every``-step schedule would have done by now that this one did not."""
        base = self.base_gaps.get(name, self.policy.every)
        return max(0, math.ceil(completed_steps / base) - self.layer(name).refreshes)

    def state_dict(self) -> dict[str, Any]:
        return {"layers": {name: asdict(layer) for name, layer in self.layers.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.layers = {name: LayerSchedule(**values) for name, values in state["layers"].items()}
