"""The one place where a Lightning strategy swaps the user's optimizer for a projected one.

``LowRankMixin`` goes first in the bases of a concrete strategy (``LowRankStrategy``,
``LowRankDDPStrategy``) so Lightning's ``isinstance`` checks still see its own base class.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.core.optimizer import LRSchedulerConfig
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer

from lightning_lowrank.callbacks.curvature_probe import CurvatureProbe
from lightning_lowrank.config import LowRankConfig
from lightning_lowrank.memory import MemoryReport, account_memory, render_memory_report
from lightning_lowrank.optim import SUPPORTED_OPTIMIZERS, ProjectedOptimizer
from lightning_lowrank.optim.projected import supported_names
from lightning_lowrank.selection import select_lowrank_params


class LowRankMixin:
    """Adds low-rank optimizer state and a memory report to a Lightning strategy.

    Keyword arguments (see ``LowRankConfig`` for their defaults; any other keyword goes to the Lightning base):

    Args:
        rank: subspace rank per projected weight; weights whose smaller side is <= rank stay dense.
        projector: ``svd``, ``rsvd``, ``dct``, ``random`` or ``online_pca``.
        update_gap: optimizer steps between subspace refreshes (a ``SubspaceRefresh`` callback overrides it).
        scale: multiplies the projected-back update (GaLore's alpha).
        moments, projector_bits, proj_group_size, seed, rsvd_oversample, rsvd_niter, dct_scorer, pca_lr,
        residual, frugal_rule, residual_lr_scale, limiter_gamma, apollo_scale_type, state_bits, state_block_size:
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
    """

    def __init__(
        self,
        *args: Any,
        fallback: str = "error",
        memory_report: bool = True,
        **kwargs: Any,
    ) -> None:
        # Low-rank options are LowRankConfig's fields; everything else belongs to the Lightning base strategy.
        options = {name: kwargs.pop(name) for name in list(kwargs) if name in LowRankConfig.field_names()}
        self.lowrank_config = LowRankConfig(**options)
        if fallback not in ("error", "dense"):
            raise ValueError(f"fallback must be 'error' or 'dense', got {fallback!r}")
        self.fallback = fallback
        self.print_memory_report = memory_report
        self._lowrank_names: dict[Tensor, str] = {}
        super().__init__(*args, **kwargs)

    def setup_optimizers(self, trainer: pl.Trainer) -> None:
        super().setup_optimizers(trainer)  # type: ignore[misc]
        cfg = self.lowrank_config
        selected = select_lowrank_params(self.lightning_module, cfg.target_modules, cfg.exclude)
        selected = _drop_full_rank(selected, cfg.rank)
        swapped = []
        for old in self.optimizers:
            if isinstance(old, ProjectedOptimizer):
                new = old
            elif type(old) not in SUPPORTED_OPTIMIZERS and self.fallback == "dense":
                rank_zero_warn(
                    f"{type(old).__name__} cannot be projected (supported: {supported_names()}); fallback='dense' "
                    "keeps it unchanged, so its parameters hold full-size optimizer state."
                )
                new = old
            else:
                new = ProjectedOptimizer.from_optimizer(old, set(selected), **cfg.optimizer_options())
                rebind_lr_schedulers(self.lr_scheduler_configs, old, new)
            swapped.append(new)
        self._lowrank_names = selected
        self.optimizers = swapped  # the setter rebuilds the LightningOptimizer wrappers
        _check_curvature_sources(cfg, swapped, trainer.callbacks)

    def lowrank_layer_names(self) -> dict[Tensor, str]:
        """Each projected weight's module name."""
        return dict(self._lowrank_names)

    def memory_report(self) -> MemoryReport:
        """Exact bytes of parameters, gradients and optimizer state right now, with refresh counts when a
        ``SubspaceRefresh`` callback schedules them and the probe's cost when a ``CurvatureProbe`` runs."""
        from dataclasses import replace  # local: this method is the only user

        trainer = self.lightning_module.trainer
        stats: dict[str, dict[str, float]] = {}
        probe: dict[str, float] | None = None
        peaks: list[int] = []
        for callback in trainer.callbacks if trainer is not None else ():
            if hasattr(callback, "layer_stats"):
                stats.update(callback.layer_stats(trainer))
            if hasattr(callback, "probe_stats"):
                probe = callback.probe_stats(trainer)
            if hasattr(callback, "run_peak_allocated_bytes") and callback.run_peak_allocated_bytes() is not None:
                peaks.append(callback.run_peak_allocated_bytes())
        params = self.lightning_module.parameters()
        report = account_memory(self.optimizers, params, self._lowrank_names, self.root_device, stats, probe=probe)
        # A CurvatureProbe resets the CUDA allocator's peak counter around each probe to measure the probe alone,
        # and keeps the peak it read before each reset; the allocator's peak now covers the time since the last
        # reset. The run's peak is the larger of the two.
        if report.peak_allocated_bytes is not None and peaks:
            report = replace(report, peak_allocated_bytes=max(report.peak_allocated_bytes, *peaks))
        return report

    def on_train_end(self) -> None:
        super().on_train_end()  # type: ignore[misc]
        report = self.memory_report()
        trainer = self.lightning_module.trainer
        for logger in trainer.loggers:
            logger.log_metrics(report.as_metrics(), step=trainer.global_step)
        if self.print_memory_report and self.is_global_zero:
            render_memory_report(report)


def rebind_lr_schedulers(configs: Sequence[LRSchedulerConfig], old: Optimizer, new: Optimizer) -> None:
    """Point every scheduler (also those nested in SequentialLR/ChainedScheduler) at ``new``.

    Without this a resumed run freezes the LR: ``load_state_dict`` gives ``new`` fresh group dicts
    that the old optimizer, still held by the scheduler, never sees.
    """
    for config in configs:
        _rebind(config.scheduler, old, new)


def _rebind(scheduler: Any, old: Optimizer, new: Optimizer) -> None:
    if getattr(scheduler, "optimizer", None) is old:
        scheduler.optimizer = new
    for child in getattr(scheduler, "_schedulers", ()):
        _rebind(child, old, new)


def _check_curvature_sources(cfg: LowRankConfig, optimizers: Sequence[Optimizer], callbacks: Sequence[Any]) -> None:
    """Options that consume curvature need a ``CurvatureProbe`` that measures it: say so before the first step."""
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
            rank_zero_warn(
                "memory_budget with rank_by='curvature' takes each layer's Hessian trace from a CurvatureProbe with "
                "'trace' in its estimators, and there is none: ranks follow the gradient energy outside each "
                "subspace (rank_by='residual') instead."
            )


def _drop_full_rank(selected: dict[Tensor, str], rank: int) -> dict[Tensor, str]:
    """Weights whose smaller side is <= rank would store more than dense AdamW; train them densely."""
    full = {p: name for p, name in selected.items() if rank >= min(p.shape)}
    if full:
        shown = ", ".join(f"{name} {tuple(p.shape)}" for p, name in list(full.items())[:8])
        rank_zero_warn(
            f"rank={rank} is not below the smaller side of {len(full)} selected weight(s): {shown}"
            f"{' ...' if len(full) > 8 else ''}. A projection would save nothing there, so they stay dense "
            "(plain AdamW); lower `rank` to project them."
        )
    return {p: name for p, name in selected.items() if p not in full}
