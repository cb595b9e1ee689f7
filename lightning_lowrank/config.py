"""The user's low-rank settings, validated once when the strategy is constructed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

from lightning_lowrank.optim.checks import check_choice
from lightning_lowrank.optim.options import PROJECTED_RULES, LowRankOptions


@dataclass(frozen=True)
class LowRankConfig(LowRankOptions):
    """What the strategy applies to every projected weight: every ``LowRankOptions`` field (defined, documented
    and checked in ``lightning_lowrank.optim.options``), plus which modules to project.

    A weight whose smaller side is <= ``rank`` stays dense (with a warning at setup): projecting it saves nothing.
    ``rank=None`` projects nothing: the module's optimizer with its full state, inside a ``ProjectedOptimizer`` (what
    ``ProtectedSubspaces`` needs to confine updates without low-rank state).

    inner: the strategy's name for ``projected_rule`` (``"subset_norm"``); give one or the other.
    target_modules: module-name globs to project (default: every ``nn.Linear`` but output heads).
    exclude: module-name globs never to project.
    """

    rank: int | None = 128  # None: no projected layer (full optimizer state)
    inner: str | None = None
    target_modules: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0):
            raise ValueError(f"rank must be a positive int, got {self.rank!r} (or None: no low-rank state)")
        if self.inner is not None:
            check_choice("inner", self.inner, (None, *PROJECTED_RULES))  # by the name the user gave it
            if self.projected_rule not in (None, self.inner):
                raise ValueError(
                    f"inner={self.inner!r} and projected_rule={self.projected_rule!r} name the same option; give one"
                )
            object.__setattr__(self, "projected_rule", self.inner)
        super().__post_init__()
        object.__setattr__(self, "target_modules", _patterns("target_modules", self.target_modules))
        object.__setattr__(self, "exclude", _patterns("exclude", self.exclude) or ())

    @classmethod
    def field_names(cls) -> frozenset[str]:
        return frozenset(f.name for f in fields(cls))

    def optimizer_options(self) -> dict:
        """The keyword arguments for ``ProjectedOptimizer``."""
        options = asdict(self)
        del options["target_modules"], options["exclude"], options["inner"]
        return options


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
