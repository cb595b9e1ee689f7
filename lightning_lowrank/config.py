"""The user's low-rank settings, validated once when the strategy is constructed."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from dataclasses import InitVar, asdict, dataclass, fields
from typing import Literal

from lightning_lowrank.optim.checks import check_choice, check_choices, field_choices
from lightning_lowrank.optim.option_help import args_docstring, option_docs
from lightning_lowrank.optim.options import PROJECTED_RULES, LowRankOptions

# Keywords that name an option by an older name: old name -> the option's name.
DEPRECATED_NAMES = {"projected_rule": "inner"}


@dataclass(frozen=True)
class LowRankConfig(LowRankOptions):
    """What the strategy applies to every projected weight: every ``LowRankOptions`` field (defined, documented
    and checked in ``lightning_lowrank.optim.options``), plus which modules to project.

    A weight whose smaller side is <= ``rank`` stays dense (with a warning at setup): projecting it saves nothing.
    ``rank=None`` projects nothing: the module's optimizer with its full state, inside a ``ProjectedOptimizer`` (what
    ``ProtectedSubspaces`` needs to confine updates without low-rank state).

    ``inner`` is the optimizer's ``projected_rule`` (its description is that option's); ``projected_rule=`` is still
    accepted here, deprecated, for configs written before it was renamed. The optimizer's param groups keep the key
    ``projected_rule`` (checkpoints carry it).

    Args:
        target_modules: module-name globs to project (default: every ``nn.Linear`` but output heads).
        exclude: module-name globs never to project.
    """

    rank: int | None = 128  # None: no projected layer (full optimizer state)
    # Not a field: a deprecated keyword only, so the strategies' signatures and LightningCLI show one name (``inner``).
    # Read as an attribute it is None; the rule is ``inner`` (``optimizer_options()["projected_rule"]``).
    projected_rule: InitVar[str | None] = None
    inner: Literal[PROJECTED_RULES] | None = None
    target_modules: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()

    def __post_init__(self, projected_rule: str | None) -> None:  # type: ignore[override]
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0):
            raise ValueError(f"rank must be a positive int, got {self.rank!r} (or None: no low-rank state)")
        check_choices(self, LowRankConfig)  # ``inner`` by the name the user gave it
        if projected_rule is not None:
            warnings.warn(
                f"projected_rule={projected_rule!r} is deprecated: the strategies call this option `inner`; pass "
                f"inner={projected_rule!r}",
                DeprecationWarning,
                stacklevel=_outside_stacklevel(),
            )
            check_choice("projected_rule", projected_rule, field_choices(LowRankConfig)["inner"])
            if self.inner not in (None, projected_rule):
                raise ValueError(
                    f"inner={self.inner!r} and projected_rule={projected_rule!r} name the same option; give inner only"
                )
            object.__setattr__(self, "inner", projected_rule)
        LowRankOptions(**self.optimizer_options())  # every section's checks, with the option by the optimizer's name
        object.__setattr__(self, "target_modules", _patterns("target_modules", self.target_modules))
        object.__setattr__(self, "exclude", _patterns("exclude", self.exclude) or ())

    @classmethod
    def field_names(cls) -> frozenset[str]:
        """The keywords a ``LowRankConfig`` takes: its fields and the deprecated names of some (``DEPRECATED_NAMES``),
        so a strategy hands every one of them here. ``option_names``: the fields only."""
        return cls.option_names() | frozenset(DEPRECATED_NAMES)

    @classmethod
    def option_names(cls) -> frozenset[str]:
        """The options by their current names (the fields; what the strategies' signatures list)."""
        return frozenset(f.name for f in fields(cls))

    @classmethod
    def option_docs(cls) -> dict[str, str]:
        """Each option's description, from the ``Args:`` blocks of the options' docstrings (``inner``: the one of the
        optimizer's ``projected_rule``)."""
        return option_docs(cls, renamed={new: old for old, new in DEPRECATED_NAMES.items()})

    @classmethod
    def args_docstring(cls) -> str:
        """A docstring whose ``Args:`` block describes every option: for a signature built from the fields (the
        strategies' ``__init__``), where jsonargparse (LightningCLI's ``--help``) reads each option's help."""
        return args_docstring("The low-rank options (``LowRankConfig``'s fields).", cls.option_docs())

    def optimizer_options(self) -> dict:
        """The keyword arguments for ``ProjectedOptimizer`` (``inner`` is its ``projected_rule``)."""
        options = asdict(self)
        del options["target_modules"], options["exclude"]
        options["projected_rule"] = options.pop("inner")
        return options


def _outside_stacklevel() -> int:
    """The ``stacklevel`` of a warning given in the caller of this function that names the first frame outside this
    package (the user's code that passed the option), whatever way led here (a strategy, ``plan``, directly)."""
    frame, level = sys._getframe(1), 1  # the caller, which warns: stacklevel 1
    while frame is not None and frame.f_globals.get("__name__", "").startswith("lightning_lowrank"):
        frame, level = frame.f_back, level + 1
    return level


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
