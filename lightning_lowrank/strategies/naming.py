"""Projected optimizers named after the torch optimizer they replace, so tools that name an optimizer by its class
read the same with and without the strategy.

Lightning's ``LearningRateMonitor`` names each key ``"lr-" + optimizer.__class__.__name__`` (``lr-AdamW``, with
``/pg1``, ``/pg2`` for param groups) and tells two optimizers of one class apart by ``type(optimizer)``
(``lr-AdamW``, ``lr-AdamW-1``). With the optimizer swapped for a plain ``ProjectedOptimizer`` every key would read
``lr-ProjectedOptimizer``, and a run's dashboards would change with the strategy. So the strategy builds, for a
``torch.optim.AdamW``, an instance of ``ProjectedOptimizer_AdamW``: an empty subclass of ``ProjectedOptimizer`` (or of
``LayerwiseProjectedOptimizer``) whose ``__name__`` is ``"AdamW"``. Nothing else differs: ``isinstance(opt,
ProjectedOptimizer)`` holds, ``state_dict`` does not record the class, and one class per (base, torch optimizer) keeps
the monitor's per-type numbering what it is without the strategy (``lr-AdamW``, ``lr-SGD``; ``lr-AdamW-1`` for a
second AdamW).

Why a subclass rather than something lighter: overriding ``__class__`` would make ``isinstance(opt,
torch.optim.AdamW)`` true, which it is not (its state is not AdamW's); naming the LR-scheduler configs covers only
optimizers that have a scheduler. The classes are made once, at import, for every supported optimizer, and bound in
this module under their ``__qualname__``, so ``pickle`` finds them by name. Their ``repr`` (``<class
'lightning_lowrank.strategies.naming.ProjectedOptimizer_AdamW'>``) still says what they are.
"""

from __future__ import annotations

from torch.optim import Optimizer

from lightning_lowrank.optim import SUPPORTED_OPTIMIZERS, ProjectedOptimizer
from lightning_lowrank.optim.layerwise import LayerwiseProjectedOptimizer

BASES: tuple[type[ProjectedOptimizer], ...] = (ProjectedOptimizer, LayerwiseProjectedOptimizer)


def _make(base: type[ProjectedOptimizer], replaced: type[Optimizer]) -> type[ProjectedOptimizer]:
    name = replaced.__name__
    namespace = {
        "__module__": __name__,
        "__qualname__": f"{base.__name__}_{name}",
        "__doc__": f"A ``{base.__name__}`` built from a ``torch.optim.{name}``, named after it (see ``{__name__}``).",
        "replaces": replaced,
    }
    return type(name, (base,), namespace)


_NAMED: dict[tuple[type[ProjectedOptimizer], type[Optimizer]], type[ProjectedOptimizer]] = {
    (base, replaced): _make(base, replaced) for base in BASES for replaced in SUPPORTED_OPTIMIZERS
}
globals().update({cls.__qualname__: cls for cls in _NAMED.values()})  # where pickle looks them up


def named_after(replaced: type[Optimizer], base: type[ProjectedOptimizer]) -> type[ProjectedOptimizer]:
    """The subclass of ``base`` named after ``replaced`` (``base`` itself for a class that cannot be projected, whose
    ``from_optimizer`` then raises the error naming the supported ones)."""
    return _NAMED.get((base, replaced), base)
