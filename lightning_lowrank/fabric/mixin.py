"""Where a Fabric strategy swaps the user's optimizer for a projected one: ``fabric.setup(model, optimizer)``
(``setup_module_and_optimizers``) or ``fabric.setup_module(model)`` then ``fabric.setup_optimizers(optimizer)``.

``LowRankFabricMixin`` goes first in the bases of a concrete Fabric strategy so Fabric's ``isinstance`` checks still see
its own base class. The options are ``LowRankConfig``'s, as for the Trainer strategies (``strategies/mixin.py``); what
only a Trainer has (the end of training, loggers, callbacks, an optimizer closure) is refused with what to do instead.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

from lightning_lowrank.config import LowRankConfig
from lightning_lowrank.memory import MemoryReport, memory_report, render_memory_report
from lightning_lowrank.selection import strategy_selection
from lightning_lowrank.strategies.swap import (
    check_curvature_sources,
    name_parameters,
    projected_names,
    rebind_scheduler,
    swap_optimizer,
)

_REPORT = "render_memory_report(fabric.strategy.memory_report()) (or fabric.strategy.print_memory_report())"
# The Trainer strategies' keywords that need a Trainer, with what to do in a Fabric loop instead. Off values (False)
# are accepted, so one dict of options can serve both.
TRAINER_ONLY = {
    "memory_report": f"Fabric has no end of training to print the report at: call {_REPORT} where your loop ends",
    "memory_json": "Fabric has no log dir to write it to: json.dump(fabric.strategy.memory_report().as_dict(), f)",
    "log_layers": "Fabric logs what you give it: fabric.log_dict(fabric.strategy.memory_report().as_metrics())",
    "memory_plan": "plan before fabric.setup yourself: lightning_lowrank.plan(model, **options).render()",
    "layerwise": (
        "layer-wise updates need to know which backward is a step's last, which the Trainer's optimizer closure "
        "tells them and a Fabric loop (fabric.backward, then optimizer.step()) does not; use "
        "Trainer(strategy=LowRankStrategy(layerwise=True)), or drop layerwise"
    ),
}


def refuse_trainer_only(owner: str, kwargs: dict[str, Any]) -> None:
    """Pop the Trainer-only keywords from ``kwargs``; any set to something but False raises, saying why."""
    for key, why in TRAINER_ONLY.items():
        value = kwargs.pop(key, False)
        if value is not False:
            raise ValueError(f"{owner} does not take {key}={value!r}: {why}.")


class LowRankFabricMixin:
    """Adds low-rank optimizer state and a memory report to a Lightning Fabric strategy.

    Keyword arguments: every ``LowRankConfig`` field (``rank``, ``projector``, ``update_gap``, ``scale``,
    ``residual``, ``target_modules``, ``exclude``, ...; see ``LowRankStrategy``), and ``fallback``: for an optimizer
    class that cannot be projected, ``"error"`` (default) or ``"dense"`` (keep it unchanged, with a warning). Any other
    keyword goes to the Fabric base strategy.

    The swap: ``setup_optimizer`` (called by ``fabric.setup`` and ``fabric.setup_optimizers``) builds
    ``ProjectedOptimizer.from_optimizer(optimizer, weights)`` over the weights ``LowRankStrategy`` would select in the
    module(s) set up so far. It shares the torch optimizer's param-group dicts, so an LR scheduler built on the torch
    optimizer still sets the learning rate; one passed to ``fabric.setup(..., scheduler=...)`` is also pointed at the
    projected optimizer (which keeps it right across ``load_state_dict``).
    """

    def __init__(self, *args: Any, fallback: str = "error", **kwargs: Any) -> None:
        owner = type(self).__name__
        refuse_trainer_only(owner, kwargs)
        options = {name: kwargs.pop(name) for name in list(kwargs) if name in LowRankConfig.field_names()}
        self.lowrank_config = LowRankConfig(**options)
        if self.lowrank_config.preconditioner == "lazy_hessian":
            raise ValueError(
                f"{owner} does not take preconditioner='lazy_hessian' yet: it reuses a curvature diagonal that a "
                "CurvatureProbe (a Trainer callback) measures, and a Fabric loop has none. Drop the preconditioner, or "
                "train with Trainer(strategy=LowRankStrategy(preconditioner='lazy_hessian'), callbacks=[CurvatureProbe"
                "(every=10, estimators=('subspace_diagonal',), samples=1)])."
            )
        if fallback not in ("error", "dense"):
            raise ValueError(f"fallback must be 'error' or 'dense', got {fallback!r}")
        self.fallback = fallback
        self._lowrank_modules: list[nn.Module] = []  # the modules set up so far, unwrapped (DDP's .module)
        self._selected: dict[Tensor, str] | None = None  # the weights to project in them (after drop_full_rank)
        self._lowrank_names: dict[Tensor, str] = {}  # each projected weight's module name
        self._lowrank_optimizers: list[Optimizer] = []  # what setup_optimizer returned, in order
        self._replaced: dict[int, Optimizer] = {}  # id(projected optimizer) -> the torch optimizer it replaced
        super().__init__(*args, **kwargs)

    # -- setup: where the optimizer is swapped -------------------------------------------------------------------

    def setup_module_and_optimizers(
        self, module: nn.Module, optimizers: list[Optimizer], scheduler: Any = None
    ) -> tuple[nn.Module, list[Optimizer], Any]:
        """Fabric's (``setup_module``, then ``setup_optimizer`` on each), then ``scheduler`` follows the swap."""
        module, swapped, scheduler = super().setup_module_and_optimizers(module, optimizers, scheduler)  # type: ignore[misc]
        for old, new in zip(optimizers, swapped):
            if new is not old and scheduler is not None:
                rebind_scheduler(scheduler, old, new)  # also a scheduler nested in SequentialLR / ChainedScheduler
        return module, swapped, scheduler

    def setup_module(self, module: nn.Module) -> nn.Module:
        wrapped = super().setup_module(module)  # type: ignore[misc]
        self._lowrank_modules.append(wrapped.module if isinstance(wrapped, DistributedDataParallel) else wrapped)
        self._selected = None  # select again, over every module set up so far
        return wrapped

    def setup_optimizer(self, optimizer: Optimizer) -> Optimizer:
        """The optimizer as Fabric's base sets it up, swapped for a ``ProjectedOptimizer`` (see the class doc)."""
        optimizer = super().setup_optimizer(optimizer)  # type: ignore[misc]
        if not self._lowrank_modules:
            raise RuntimeError(
                f"{type(self).__name__} selects the weights to project from the module: set it up first, with "
                "fabric.setup(model, optimizer), or fabric.setup_module(model) before "
                "fabric.setup_optimizers(optimizer)."
            )
        cfg = self.lowrank_config
        if self._selected is None:  # the Trainer strategies' selection (and its warnings), over every module set up
            self._selected = {}
            for module in self._lowrank_modules:
                self._selected.update(strategy_selection(module, cfg.target_modules, cfg.exclude, cfg.rank))
        new = swap_optimizer(optimizer, self._selected, cfg, self.fallback)
        if new is not optimizer:
            self._replaced[id(new)] = optimizer
        name_parameters([new], {p: n for m in self._lowrank_modules for n, p in m.named_parameters()})
        self._lowrank_names.update(projected_names([new], self._selected))
        self._lowrank_optimizers.append(new)
        check_curvature_sources(cfg, self._lowrank_optimizers, ())  # memory_budget: one projected optimizer
        return new

    def optimizer_step(self, optimizer: Any, **kwargs: Any) -> Any:
        output = super().optimizer_step(optimizer, **kwargs)  # type: ignore[misc]
        replaced = self._replaced.get(id(optimizer))
        if replaced is not None:
            # A torch LR scheduler built on the replaced optimizer checks that *it* stepped before the scheduler does
            # (else: "Detected call of lr_scheduler.step() before optimizer.step()"); it did, through this one.
            replaced._opt_called = True  # type: ignore[attr-defined]
        return output

    # -- what the user asks of it ---------------------------------------------------------------------------------

    @property
    def projected_optimizers(self) -> list[Optimizer]:
        """The optimizers ``setup_optimizer`` returned (``ProjectedOptimizer``, or kept dense by ``fallback``)."""
        return list(self._lowrank_optimizers)

    def lowrank_layer_names(self) -> dict[Tensor, str]:
        """Each projected weight's module name."""
        return dict(self._lowrank_names)

    def memory_report(self) -> MemoryReport:
        """Exact bytes of parameters, gradients and optimizer state right now, split by kind, per layer and per
        module group, with the process's maximum resident set size: the Trainer strategies' report
        (``lightning_lowrank.memory.memory_report``), without the Trainer callbacks' figures. Print it with
        ``render_memory_report``, or call ``print_memory_report()``."""
        if not self._lowrank_optimizers:
            raise RuntimeError(
                "memory_report() measures the optimizer state, which exists once fabric.setup(model, optimizer) (or "
                "fabric.setup_optimizers) has swapped it in. Before that, plan it instead: "
                "lightning_lowrank.plan(model, **options) builds the same report on a meta copy of the module."
            )
        modules = self._lowrank_modules
        model = modules[0] if len(modules) == 1 else nn.ModuleList(modules)  # several: groups named "0.attn", ...
        device = self.root_device  # type: ignore[attr-defined]
        return memory_report(self._lowrank_optimizers, model, names=self._lowrank_names, device=device)

    def memory_report_over_ranks(self, report: MemoryReport) -> MemoryReport | None:
        """What all ranks hold together where each holds a different part (FSDP2: a collective, on every rank);
        None where every rank holds the same (one device, DDP)."""
        return None

    def print_memory_report(self) -> MemoryReport:
        """``memory_report()``, printed on rank 0 (with the total over ranks under FSDP2); call it on every rank."""
        report = self.memory_report()
        total = self.memory_report_over_ranks(report)
        if self.is_global_zero:  # type: ignore[attr-defined]
            render_memory_report(report, over_ranks=total)
        return report
