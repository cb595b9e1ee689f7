"""The swap every low-rank strategy makes, Trainer's (``LowRankMixin.setup_optimizers``) and Fabric's
(``LowRankFabricMixin.setup_optimizer``) alike: the user's torch optimizer for a ``ProjectedOptimizer`` over the
selected weights, its LR scheduler pointed at the new one, and the checks of what the options need from the rest of
the run."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import Tensor
from torch.optim import Optimizer

from lightning_lowrank.config import LowRankConfig
from lightning_lowrank.optim import SUPPORTED_OPTIMIZERS, ProjectedOptimizer
from lightning_lowrank.optim.options import supported_names
from lightning_lowrank.selection import warn_user
from lightning_lowrank.strategies.naming import named_after


def swap_optimizer(
    old: Optimizer,
    selected: Mapping[Tensor, str],
    cfg: LowRankConfig,
    fallback: str,
    base: type[ProjectedOptimizer] = ProjectedOptimizer,
    warn: Callable[[str], None] = warn_user,
) -> Optimizer:
    """``old`` rebuilt as a ``base`` over ``selected`` ({weight: module name}) and named after ``old``'s class (so
    ``LearningRateMonitor`` keys and messages read "AdamW"); ``old`` itself when it is projected already, or when its
    class cannot be projected and ``fallback="dense"`` (said through ``warn``). Otherwise an unsupported class raises
    ``from_optimizer``'s ``TypeError``, which names the supported ones."""
    if isinstance(old, ProjectedOptimizer):
        return old
    if type(old) not in SUPPORTED_OPTIMIZERS and fallback == "dense":
        warn(
            f"{type(old).__name__} cannot be projected (supported: {supported_names()}); fallback='dense' keeps it "
            "unchanged, so its parameters hold full-size optimizer state."
        )
        return old
    return named_after(type(old), base).from_optimizer(old, selected, **cfg.optimizer_options())


def name_parameters(optimizers: Sequence[Optimizer], names: Mapping[Tensor, str]) -> None:
    """Give each projected optimizer the module's parameter names, for its messages (a non-finite gradient)."""
    for opt in optimizers:
        if isinstance(opt, ProjectedOptimizer):
            opt.param_names.update(names)


def projected_names(optimizers: Sequence[Optimizer], selected: Mapping[Tensor, str]) -> dict[Tensor, str]:
    """The selected weights the optimizers do project, with their module names (Adafactor keeps dense the weights
    where projecting would save nothing)."""
    projected = {id(p) for opt in optimizers if isinstance(opt, ProjectedOptimizer) for p in opt.projected_params()}
    return {p: name for p, name in selected.items() if id(p) in projected}


def rebind_scheduler(scheduler: Any, old: Optimizer, new: Optimizer) -> None:
    """Point ``scheduler`` (and any nested in SequentialLR / ChainedScheduler) at ``new`` where it held ``old``.

    Without this a resumed run freezes the LR: ``load_state_dict`` gives ``new`` fresh group dicts that the old
    optimizer, still held by the scheduler, never sees."""
    if getattr(scheduler, "optimizer", None) is old:
        scheduler.optimizer = new
    for child in getattr(scheduler, "_schedulers", ()):
        rebind_scheduler(child, old, new)


def check_curvature_sources(cfg: LowRankConfig, optimizers: Sequence[Optimizer], callbacks: Sequence[Any]) -> None:
    """Options that consume curvature need a ``CurvatureProbe`` that measures it: say so before the first step."""
    # Imported here: the callbacks import Lightning, whose import registers the strategies (``_registration.py``),
    # so a module-level import would be circular when the first thing imported is a callback.
    from lightning_lowrank.callbacks.curvature_probe import CurvatureProbe

    measured = {e for c in callbacks if isinstance(c, CurvatureProbe) for e in c.estimators}
    projected = [opt for opt in optimizers if isinstance(opt, ProjectedOptimizer)]
    if cfg.preconditioner == "lazy_hessian" and "subspace_diagonal" not in measured:
        raise ValueError(
            "preconditioner='lazy_hessian' reuses a curvature diagonal that a CurvatureProbe measures: add "
            "CurvatureProbe(every=10, estimators=('subspace_diagonal',), samples=1) (Sophia refreshes it every 10 "
            "steps) to the Trainer's callbacks, or drop the preconditioner."
        )
    if cfg.memory_budget is not None:
        if len(projected) > 1:
            raise ValueError(
                f"memory_budget is one budget for one optimizer, but configure_optimizers returned {len(projected)} "
                "that are projected; return one optimizer (with several param groups if needed)."
            )
        if cfg.rank_by == "curvature" and "trace" not in measured:
            warn_user(
                "memory_budget with rank_by='curvature' takes each layer's Hessian trace from a CurvatureProbe with "
                "'trace' in its estimators, and there is none: ranks follow the gradient energy outside each "
                "subspace (rank_by='residual') instead."
            )
