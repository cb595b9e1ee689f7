"""The user's low-rank settings, validated once when the strategy is constructed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lightning_lowrank.optim.projection import PROJECTORS


@dataclass(frozen=True)
class LowRankConfig:
    """What the strategy applies to every projected weight.

    A weight whose smaller side is <= ``rank`` stays dense (with a warning at setup): projecting it saves nothing.
    """

    rank: int = 128
    projector: str = "svd"
    update_gap: int = 200
    scale: float = 1.0
    target_modules: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"rank must be a positive int, got {self.rank!r}")
        if self.projector not in PROJECTORS:
            raise ValueError(f"Unknown projector {self.projector!r}; allowed: {', '.join(map(repr, PROJECTORS))}")
        if isinstance(self.update_gap, bool) or not isinstance(self.update_gap, int) or self.update_gap < 1:
            raise ValueError(f"update_gap must be an int >= 1 (steps between refreshes), got {self.update_gap!r}")
        if not isinstance(self.scale, (int, float)) or isinstance(self.scale, bool) or not self.scale > 0:
            raise ValueError(f"scale must be a number > 0, got {self.scale!r}")
        object.__setattr__(self, "target_modules", _patterns("target_modules", self.target_modules))
        object.__setattr__(self, "exclude", _patterns("exclude", self.exclude) or ())


def _patterns(kind: str, value: Sequence[str] | str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = (value,)
    value = tuple(value)
    if kind == "target_modules" and not value:
        raise ValueError("target_modules must name at least one pattern; pass None for the default selection")
    for pattern in value:
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"{kind} entries must be non-empty strings (globs over module names), got {pattern!r}")
    return value
