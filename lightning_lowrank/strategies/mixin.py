"""The one place where a Lightning strategy swaps the user's optimizer for a projected one.

``LowRankMixin`` goes first in the bases of a concrete strategy (``LowRankStrategy``,
``LowRankDDPStrategy``) so Lightning's ``isinstance`` checks still see its own base class.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace
from functools import partial
from typing import Any, get_type_hints

import lightning.pytorch as pl
from lightning.fabric.utilities.optimizer import _optimizer_to_device
from lightning.pytorch.core.optimizer import LRSchedulerConfig
from lightning.pytorch.strategies import ParallelStrategy, Strategy
from torch import Tensor
from torch.optim import Optimizer

from lightning_lowrank.callbacks.protected_subspaces import ProtectedSubspaces
from lightning_lowrank.config import LowRankConfig
from lightning_lowrank.memory import MemoryReport, Plan, memory_report, plan, render_memory_report
from lightning_lowrank.optim import ProjectedOptimizer
from lightning_lowrank.optim.layerwise import LayerwiseProjectedOptimizer
from lightning_lowrank.selection import strategy_selection, warn_once, warnings_once
from lightning_lowrank.strategies.swap import (
    check_curvature_sources,
    name_parameters,
    projected_names,
    rebind_scheduler,
    swap_optimizer,
)


class LowRankMixin:
    """Adds low-rank optimizer state and a memory report to a Lightning strategy.

    Keyword arguments (see ``LowRankConfig`` for their defaults; any other keyword goes to the Lightning base):

    Args:
        rank: subspace rank per projected weight; weights whose smaller side is <= rank stay dense. None projects
            nothing: the module's optimizer with its full state, as a ``ProjectedOptimizer`` (``ProtectedSubspaces``
            confines its updates).
        projector: ``svd``, ``rsvd``, ``dct``, ``random``, ``gaussian`` (APOLLO's) or ``online_pca``; None:
            ``gaussian`` with ``residual="apollo"``, else ``svd``.
        update_gap: optimizer steps between subspace refreshes (a ``SubspaceRefresh`` callback overrides it).
        scale: multiplies the projected-back update (GaLore's alpha).
        moments, projector_bits, proj_group_size, seed, rsvd_oversample, rsvd_niter, dct_scorer, pca_lr,
        residual, frugal_rule, residual_lr_scale, limiter_gamma, fira_complement, apollo_scale_type, adam_form,
        dct_norm, dct_type, state_bits, state_block_size, hessian_bias_correction:
            as in ``ProjectedOptimizer``.
        preconditioner, rho, hessian_beta: ``preconditioner="lazy_hessian"`` runs Sophia's clipped step in each
            subspace with the curvature diagonal a ``CurvatureProbe(estimators=(..., "subspace_diagonal"))`` measures
            every ``every`` steps and the optimizer reuses in between (see ``ProjectedOptimizer``).
        memory_budget, rank_by: bytes for the optimizer state; each projected layer then gets its own rank (at most
            ``rank``), chosen at its refreshes from its curvature trace (a ``CurvatureProbe`` with ``"trace"``
            feeds it) or its gradient energy outside the subspace (``rank_by="residual"``).
        inner: ``"subset_norm"`` runs Subspace-Momentum with Subset-Norm steps on projected weights; None follows
            the module's optimizer (AdamW/Adam -> Adam(W), SGD -> momentum SGD, Adafactor -> Adafactor).
        fallback: for an optimizer class that cannot be projected, ``"error"`` (default) or ``"dense"`` (keep it
            unchanged, with a warning).
        target_modules: module-name patterns to project (default: every ``nn.Linear`` but output heads).
        exclude: module-name patterns never to project.
        memory_report: print the rich memory report at the end of training (it is logged either way).
        memory_json: write every figure of the report as JSON at the end of training, on rank 0: ``True`` to
            ``lowrank_memory.json`` next to the logger's files (``trainer.log_dir``, or ``default_root_dir`` for a
            logger without a directory), and nowhere without a logger, as Lightning writes nothing with
            ``logger=False``; a path writes there whatever the logger; ``False`` writes nothing.
        log_layers: also log the report's per-module and per-layer figures at the end of training (one set of
            columns per layer, hundreds for a deep model); by default the loggers get the headline totals and the
            module groups' totals only, a few dozen columns whatever the depth (the JSON has every layer either way).
        memory_plan: at fit start print (rank 0) the report the first step is planned to measure
            (``lightning_lowrank.plan``), kept as ``strategy.planned``.
        layerwise: update each weight during backward, in its post-accumulate-grad hook, and free its gradient
            right away, so full gradients never all exist at once (GaLore's per-layer update; see
            ``lightning_lowrank.optim.layerwise``). Works with ``accumulate_grad_batches`` (projected weights
            accumulate their gradient in the subspace). One device or ``LowRankDDPStrategy``; refused with
            gradient clipping, GradScaler (``16-mixed``), manual optimization and ``memory_budget``.
    """

    layerwise_all_reduce = False  # whether this parallel strategy averages gradients in the layer-wise hooks

    def __init__(
        self,
        *args: Any,
        fallback: str = "error",
        memory_report: bool = True,
        memory_json: bool | str = True,
        log_layers: bool = False,
        memory_plan: bool = False,
        layerwise: bool = False,
        **kwargs: Any,
    ) -> None:
        # Low-rank options are LowRankConfig's fields; everything else belongs to the Lightning base strategy.
        options = {name: kwargs.pop(name) for name in list(kwargs) if name in LowRankConfig.field_names()}
        self.lowrank_config = LowRankConfig(**options)
        if fallback not in ("error", "dense"):
            raise ValueError(f"fallback must be 'error' or 'dense', got {fallback!r}")
        self.fallback = fallback
        self.print_memory_report = memory_report
        self.memory_json = memory_json
        self.log_layers = bool(log_layers)
        self.memory_plan = memory_plan
        if layerwise and isinstance(self, ParallelStrategy) and not self.layerwise_all_reduce:
            raise ValueError(
                f"layerwise=True is not supported with {type(self).__name__}: each layer-wise update must see its "
                "averaged gradient. Use LowRankStrategy on one device or LowRankDDPStrategy, or layerwise=False."
            )
        self.layerwise = bool(layerwise)
        self.planned: Plan | None = None  # with memory_plan=True: what the first step is planned to hold
        self._lowrank_names: dict[Tensor, str] = {}
        self._logged_nonfinite: dict[int, int] = {}  # optimizer id -> the skipped-step count last logged
        self._warned: set[str] = set()  # the warnings said in this fit
        super().__init__(*args, **kwargs)

    def setup_optimizers(self, trainer: pl.Trainer) -> None:
        super().setup_optimizers(trainer)  # type: ignore[misc]
        self._warned = set()
        cfg = self.lowrank_config
        selected = warnings_once(
            self._warned, strategy_selection, self.lightning_module, cfg.target_modules, cfg.exclude, cfg.rank
        )
        base = LayerwiseProjectedOptimizer if self.layerwise else ProjectedOptimizer
        warn = partial(warn_once, self._warned)  # said once per fit
        swapped = [swap_optimizer(old, selected, cfg, self.fallback, base, warn) for old in self.optimizers]
        for old, new in zip(self.optimizers, swapped):
            if new is not old:
                rebind_lr_schedulers(self.lr_scheduler_configs, old, new)
        name_parameters(swapped, {p: name for name, p in self.lightning_module.named_parameters()})
        self._lowrank_names = projected_names(swapped, selected)
        self.optimizers = swapped  # the setter rebuilds the LightningOptimizer wrappers
        if self.layerwise:
            _check_layerwise(self, trainer, swapped)
            for opt in swapped:
                if isinstance(opt, LayerwiseProjectedOptimizer):
                    opt.attach()
        check_curvature_sources(cfg, swapped, trainer.callbacks)
        if self.memory_plan and self.is_global_zero:
            # Before any step: the report the first step will measure, planned on a meta twin of the module.
            protection = next((c.plan_options() for c in trainer.callbacks if isinstance(c, ProtectedSubspaces)), {})
            options = dict(layerwise=self.layerwise, **asdict(cfg), **protection)  # its warnings: not said again
            self.planned = warnings_once(self._warned, plan, self.lightning_module, **options)
            if self.print_memory_report:
                self.planned.render()

    def optimizer_step(self, optimizer: Optimizer, closure: Any, model: Any = None, **kwargs: Any) -> Any:
        """As Lightning's; then a newly skipped non-finite step goes to the loggers (``lowrank/nonfinite_steps``, the
        optimizer's count: a host int, read without touching the device)."""
        output = super().optimizer_step(optimizer, closure, model, **kwargs)  # type: ignore[misc]
        count = getattr(optimizer, "nonfinite_steps", 0)
        if count != self._logged_nonfinite.get(id(optimizer), 0):
            self._logged_nonfinite[id(optimizer)] = count
            trainer = self.lightning_module.trainer
            for logger in trainer.loggers:
                logger.log_metrics({"lowrank/nonfinite_steps": float(count)}, step=trainer.global_step)
        return output

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        """As Lightning's, but a ``ProjectedOptimizer``'s state is not moved to the root device afterwards: its
        ``load_state_dict`` already puts each tensor where it lives, and Lightning's move (all but ``step``) would
        put seeds, ranks, counters and 8-bit shapes on the GPU, where every host read of them is a sync. A strategy
        that loads optimizer state another way (FSDP2's distributed checkpoint) keeps its own."""
        base = super().load_optimizer_state_dict  # type: ignore[misc]
        if getattr(base, "__func__", None) is not Strategy.load_optimizer_state_dict:
            base(checkpoint)
            return
        for optimizer, saved in zip(self.optimizers, checkpoint["optimizer_states"]):
            optimizer.load_state_dict(saved)
            if not isinstance(optimizer, ProjectedOptimizer):
                _optimizer_to_device(optimizer, self.root_device)

    def teardown(self) -> None:
        for opt in self.optimizers:
            if isinstance(opt, LayerwiseProjectedOptimizer):
                opt.detach()  # the hooks stay on the module's parameters otherwise
        super().teardown()  # type: ignore[misc]

    def lowrank_layer_names(self) -> dict[Tensor, str]:
        """Each projected weight's module name."""
        return dict(self._lowrank_names)

    def memory_report(self) -> MemoryReport:
        """Exact bytes of parameters, gradients and optimizer state right now (split by kind, per layer and per
        module group), with refresh counts when a ``SubspaceRefresh`` callback schedules them, the probe's cost when a
        ``CurvatureProbe`` runs, per-phase CUDA peaks when a ``MemoryPhases`` callback measures them, and the
        process's maximum resident set size. Available once ``fit`` has set up the optimizers."""
        if self.lightning_module is None or not self.optimizers:
            raise RuntimeError(
                "memory_report() measures the optimizer state, which exists once trainer.fit has set up the "
                "optimizers (from on_fit_start on, and after fit). Before fit, plan it instead: "
                "lightning_lowrank.plan(model, **options) builds the same report on a meta copy of the module."
            )
        trainer = self.lightning_module.trainer
        stats: dict[str, dict[str, float]] = {}
        probe: dict[str, float] | None = None
        phases: dict[str, float] | None = None
        peaks: list[int] = []
        for callback in trainer.callbacks if trainer is not None else ():
            if hasattr(callback, "layer_stats"):
                stats.update(callback.layer_stats(trainer))
            if hasattr(callback, "probe_stats"):
                probe = callback.probe_stats(trainer)
            if hasattr(callback, "phase_stats"):
                phases = callback.phase_stats(trainer) or phases
            if hasattr(callback, "run_peak_allocated_bytes") and callback.run_peak_allocated_bytes() is not None:
                peaks.append(callback.run_peak_allocated_bytes())
        options = dict(names=self._lowrank_names, refresh_stats=stats, probe=probe, phases=phases)
        report = warnings_once(
            self._warned, memory_report, self.optimizers, self.lightning_module, **options, device=self.root_device
        )
        # A CurvatureProbe (and MemoryPhases) resets the CUDA allocator's peak counter to measure a part of a step,
        # and keeps the peak it read before each reset; the allocator's peak now covers the time since the last
        # reset. The run's peak is the largest of them.
        if report.peak_allocated_bytes is not None and peaks:
            report = replace(report, peak_allocated_bytes=max(report.peak_allocated_bytes, *peaks))
        return report

    def on_train_end(self) -> None:
        super().on_train_end()  # type: ignore[misc]
        report = self.memory_report()
        trainer = self.lightning_module.trainer
        for logger in trainer.loggers:
            logger.log_metrics(report.as_metrics(layers=self.log_layers), step=trainer.global_step)
        path = self.memory_json if isinstance(self.memory_json, str) else None
        if self.memory_json is True and trainer.loggers:
            path = os.path.join(memory_json_dir(trainer), MEMORY_JSON)  # on every rank: trainer.log_dir broadcasts
        total = self.memory_report_over_ranks(report)  # a collective where the state is sharded: every rank
        if self.is_global_zero:
            if path is not None:
                write_memory_json(report, path)
            if self.print_memory_report:
                render_memory_report(report, over_ranks=total)

    def memory_report_over_ranks(self, report: MemoryReport) -> MemoryReport | None:
        """What all ranks hold together, where each holds a different part (FSDP2); None where every rank holds the
        same (one device, DDP)."""
        return None


MEMORY_JSON = "lowrank_memory.json"


def memory_json_dir(trainer: pl.Trainer) -> str:
    """The run's log dir (``trainer.log_dir``), or ``default_root_dir`` when there is no logger or it has none."""
    return (trainer.log_dir if trainer.loggers else None) or trainer.default_root_dir


def write_memory_json(report: MemoryReport, path: str) -> None:
    """Every figure of ``report`` (``MemoryReport.as_dict``) as JSON at ``path``."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(report.as_dict(), f, indent=2)


def rebind_lr_schedulers(configs: Sequence[LRSchedulerConfig], old: Optimizer, new: Optimizer) -> None:
    """Point every scheduler of the Trainer at ``new`` where it held ``old`` (``swap.rebind_scheduler``)."""
    for config in configs:
        rebind_scheduler(config.scheduler, old, new)


def _check_layerwise(strategy: Any, trainer: pl.Trainer, optimizers: Sequence[Optimizer]) -> None:
    """What layer-wise updates cannot do, refused before the first step with what to do instead."""
    if not strategy.lightning_module.automatic_optimization:
        raise ValueError(
            "layerwise=True updates each weight inside backward, in the step that Lightning's automatic optimization "
            "drives; with manual optimization (automatic_optimization=False) use layerwise=False."
        )
    if trainer.gradient_clip_val:
        raise ValueError(
            f"layerwise=True cannot clip gradients (gradient_clip_val={trainer.gradient_clip_val}): clipping by the "
            "global norm needs every gradient at once, and layer-wise mode updates each weight and frees its gradient "
            "as soon as that gradient is complete. Drop gradient_clip_val, or use layerwise=False."
        )
    if getattr(strategy.precision_plugin, "scaler", None) is not None:
        raise ValueError(
            "layerwise=True does not support a GradScaler (precision='16-mixed'): the scaler checks every gradient "
            "for inf/NaN before deciding to step, and layer-wise mode has already stepped each weight by then. Use "
            "precision='bf16-mixed' (no scaler) or '32-true', or layerwise=False."
        )
    for opt in optimizers:
        if isinstance(opt, ProjectedOptimizer) and not isinstance(opt, LayerwiseProjectedOptimizer):
            raise ValueError(
                "layerwise=True needs to build the optimizer itself, but configure_optimizers returned a "
                f"{type(opt).__name__}; return the torch optimizer (AdamW, Adam, SGD, Adafactor) instead."
            )


def _named(params: Any) -> list[inspect.Parameter]:
    """The named parameters of a signature, without ``self``, ``*args`` and ``**kwargs``."""
    return [p for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def declare_signature(cls: type) -> type:
    """Give ``cls.__init__`` a signature that names every option with its type and default, so LightningCLI
    (``--trainer.strategy.rank=8``, YAML ``init_args``), IDEs and ``help()`` see them.

    The strategies take the low-rank options through ``**kwargs`` so that each option is defined once, as a
    ``LowRankConfig`` field; this builds the signature from those fields, the mixin's own keywords, the class's own
    and its Lightning base's (whose ``**kwargs``, DDP's, is kept last).
    """
    own = inspect.signature(cls.__init__).parameters.values()
    base = next(b for b in cls.__mro__ if b is not cls and not issubclass(b, LowRankMixin))
    ours = {p.name: p for p in _named(own)}
    base_params = list(inspect.signature(base.__init__).parameters.values())
    leading = [ours.pop(p.name, p) for p in _named(base_params)]
    leading = [p.replace(kind=p.POSITIONAL_OR_KEYWORD) for p in leading]
    mixin = _named(inspect.signature(LowRankMixin.__init__).parameters.values())
    hints = get_type_hints(LowRankConfig)
    fields_ = [
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=hints[f.name])
        for f in dataclasses.fields(LowRankConfig)
    ]
    keyword_only = [p.replace(kind=p.KEYWORD_ONLY) for p in (*ours.values(), *mixin)] + fields_
    var_kw = [p for p in base_params if p.kind is p.VAR_KEYWORD]
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD), *leading, *keyword_only, *var_kw]
    cls.__init__.__signature__ = inspect.Signature(params)
    cls.__init__.__doc__ = LowRankConfig.args_docstring()  # each option's help, where jsonargparse reads it
    return cls
