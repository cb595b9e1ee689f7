"""When each layer refreshes its subspace: fixed gaps, a warm-up, and Q-GaLore's lazy (adaptive) rule.

Plain Python, no torch or Lightning: ``RefreshSchedule`` turns what the optimizer reports about each refresh
into the step of the layer's next refresh. The ``SubspaceRefresh`` callback is the glue around it.

Two forms of the lazy rule (``RefreshPolicy.rule``):

* ``"lazy"`` (ours): the next refresh is ``gap`` updates after the last one; after a growth the queue starts over
  (``queue_size`` fresh refreshes must agree again); the gap is capped at ``max_gap`` (default 16 x every).
* ``"qgalore"``: q-galore-torch 1.0's ``GaLoreProjector`` exactly: a layer refreshes at the updates that are
  multiples of its current gap, the queue is kept after a growth (so the gap can grow at consecutive refreshes),
  and there is no cap. The similarity fed to it should be the signed leading cosine, as Q-GaLore's.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

RULES = ("lazy", "qgalore")


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
    starts with a refresh at update ``warmup``; warm-up refreshes, and the first regular one (which compares with
    a warm-up subspace only ``warmup_every`` updates old), do not enter the queue. ``rule``: see the module doc;
    ``"qgalore"`` has no cap, so it refuses a ``max_gap``."""

    every: int = 200
    warmup: int = 0
    warmup_every: int = 1
    adaptive: bool = False
    cos_threshold: float = 0.4
    queue_size: int = 5
    gamma_proj: float = 2.0
    max_gap: int | None = None
    rule: str = "lazy"

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"rule must be one of {', '.join(map(repr, RULES))}, got {self.rule!r}")
        if self.rule == "qgalore" and self.max_gap is not None:
            raise ValueError(
                f"max_gap={self.max_gap!r} contradicts rule='qgalore' (Q-GaLore's gap has no cap): leave max_gap "
                "unset, or use rule='lazy' for a capped gap"
            )
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
    def gap_cap(self) -> int | None:
        if self.rule == "qgalore":
            return None
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
        if policy.adaptive and similarity is not None and step > policy.warmup:
            layer.history = (layer.history + [similarity])[-policy.queue_size :]
            if (
                len(layer.history) == policy.queue_size
                and sum(layer.history) / policy.queue_size >= policy.cos_threshold
            ):
                grown, cap = int(layer.gap * policy.gamma_proj), policy.gap_cap
                layer.gap = grown if cap is None else min(grown, cap)
                if policy.rule == "lazy":
                    layer.history = []  # k fresh refreshes must agree again before the next growth
        if step < policy.warmup:
            layer.next_refresh = min(step + min(policy.warmup_every, layer.gap), policy.warmup)
        elif policy.rule == "qgalore":  # the next multiple of the gap (counted from the end of the warm-up)
            layer.next_refresh = policy.warmup + ((step - policy.warmup) // layer.gap + 1) * layer.gap
        else:
            layer.next_refresh = step + layer.gap
        return True

    def skipped(self, name: str, completed_steps: int) -> int:
        """Refreshes a fixed ``every``-step schedule would have done by now that this one did not."""
        base = self.base_gaps.get(name, self.policy.every)
        return max(0, math.ceil(completed_steps / base) - self.layer(name).refreshes)

    def state_dict(self) -> dict[str, Any]:
        return {"layers": {name: asdict(layer) for name, layer in self.layers.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.layers = {name: LayerSchedule(**values) for name, values in state["layers"].items()}
