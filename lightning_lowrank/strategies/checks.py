"""What the strategies refuse when they are built (or, for the precision plugin, when the Trainer is), so a bad
keyword or combination fails at ``LowRankStrategy(...)`` / ``Trainer(...)`` rather than at ``fit``.

What only the model or the Trainer's other arguments decide (manual optimization, ``gradient_clip_val``, the
optimizer class, the modules a pattern matches, a ``CurvatureProbe`` for ``lazy_hessian``) is refused at setup,
before the first step (``mixin.py``).
"""

from __future__ import annotations

import difflib
import inspect
import os
from collections.abc import Callable, Iterable
from typing import Any

from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import Strategy

from lightning_lowrank.config import LowRankConfig
from lightning_lowrank.optim.layerwise import LAYERWISE_COMPILE
from lightning_lowrank.strategies.mixin import LowRankMixin

# The mixin's keywords that must be a bool (``check_bool``).
BOOL_KEYWORDS = ("memory_report", "memory_plan", "layerwise", "log_layers")

LAYERWISE_SCALER = (
    "layerwise=True does not support a GradScaler (precision='16-mixed'): the scaler checks every gradient for "
    "inf/NaN before deciding to step, and layer-wise mode has already stepped each weight by then. Use "
    "precision='bf16-mixed' (no scaler) or '32-true', or layerwise=False."
)
LAYERWISE_BUDGET = (
    "layerwise=True does not support memory_budget: the budget allocates ranks jointly over all the layers due to "
    "refresh at a step, and layer-wise updates refresh one layer at a time. Drop one of them."
)


def unknown_options_message(owner: str, unknown: Iterable[str], allowed: Iterable[str], rest: str) -> str:
    """Which keywords are unknown, the closest known one, and what is allowed (``rest``: where other keywords go)."""
    unknown = sorted(unknown)
    allowed = sorted(allowed)
    close = [m for name in unknown for m in difflib.get_close_matches(name, allowed, n=1)]
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    return (
        f"Unknown option(s) {unknown} for {owner}.{hint} Low-rank options: "
        f"{', '.join(sorted(LowRankConfig.option_names()))}; {rest}."
    )


def check_keywords(owner: str, kwargs: dict[str, Any], base_init: Callable[..., None] | None = None) -> None:
    """Before the strategy is built: the mixin's keywords' types, and (with ``base_init``, the Lightning base's
    ``__init__``, which takes no ``**kwargs``) keywords that neither the low-rank options nor the base know."""
    for key in BOOL_KEYWORDS:
        if key in kwargs:
            check_bool(key, kwargs[key])
    if "memory_json" in kwargs:
        value = kwargs["memory_json"]
        if isinstance(value, os.PathLike):
            kwargs["memory_json"] = value = os.fspath(value)  # a pathlib.Path is a path, as a str is
        if not (isinstance(value, bool) or (isinstance(value, str) and value)):
            raise ValueError(
                f"memory_json must be True (next to the logger's files), False (no file) or a file path, got {value!r}"
            )
    if base_init is None:
        return
    keywords = set(inspect.signature(LowRankMixin.__init__).parameters) | set(inspect.signature(base_init).parameters)
    known = (keywords - {"self", "args", "kwargs"}) | LowRankConfig.field_names()
    unknown = set(kwargs) - known
    if unknown:
        base = base_init.__qualname__.split(".")[0]
        others = sorted(keywords - {"self", "args", "kwargs"})
        # Python's own class for an unexpected keyword argument.
        raise TypeError(unknown_options_message(owner, unknown, known, f"other keywords: {', '.join(others)} ({base})"))


def check_bool(key: str, value: Any) -> None:
    """A switch must be a bool: ``bool("no")`` is True, so a string would silently turn it on."""
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be True or False, got {value!r}")


def check_combinations(strategy: Any) -> None:
    """After the strategy is built: combinations of its keywords that cannot work together."""
    if strategy.layerwise and strategy.lowrank_config.memory_budget is not None:
        raise ValueError(LAYERWISE_BUDGET)
    if strategy.layerwise and strategy.lowrank_config.compile:
        raise ValueError(LAYERWISE_COMPILE)


def _get_precision_plugin(self: Any) -> Precision:
    return Strategy.precision_plugin.fget(self)


def _set_precision_plugin(self: Any, plugin: Precision | None) -> None:
    if getattr(self, "layerwise", False) and getattr(plugin, "scaler", None) is not None:
        raise ValueError(LAYERWISE_SCALER)
    Strategy.precision_plugin.fset(self, plugin)


# Lightning's ``precision_plugin`` property, refusing a GradScaler under ``layerwise=True``. The Trainer hands the
# strategy its precision plugin while it is constructed (``precision="16-mixed"`` or ``plugins=[...]``), so the
# refusal comes at ``Trainer(...)``; the strategies bind it as their ``precision_plugin``.
precision_plugin_property = property(
    _get_precision_plugin, _set_precision_plugin, doc="The precision plugin (a GradScaler is refused with layerwise)."
)
