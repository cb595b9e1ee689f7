"""``CurvatureProbe``: every k optimizer steps, measure the loss curvature on the current batch.

The probe re-runs the module's own ``training_step`` on the batch that was just trained on, under autograd, and
differentiates that loss twice (``torch.autograd.grad`` with ``create_graph=True``). Re-running the step is chosen
over asking the strategy for a ``create_graph`` backward on probe steps because it leaves the real training step
untouched: the probe never writes ``.grad``, restores the global RNG state (dropout draws) and the module's buffers
(BatchNorm statistics), and silences ``self.log`` while it runs, so training is bit-identical with or without it.
The cost is one extra forward plus the Hessian-vector products, paid only every ``every`` steps; the callback measures
it (``probe_stats``: seconds and extra memory per call, against the mean time of one training batch) and the memory
report shows it.

With ``"top_eigenvalues"`` it also checks every optimizer param group against the edge of stability of plain gradient
descent (lr * top eigenvalue of the group's Hessian block > 2) and warns once per group when it is crossed.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_lowrank.callbacks.edge_of_stability import (
    EDGE_OF_STABILITY,
    ParamBlock,
    edge_of_stability_message,
    eigenvalue_figures,
)
from lightning_lowrank.callbacks.probe_rerun import (
    ExtraMemory,
    mean_over_ranks,
    rerun_gradients,
    silenced_logging,
    synchronize,
    tensors_in,
)
from lightning_lowrank.curvature import hutchinson, subspace_diagonal
from lightning_lowrank.optim import ProjectedOptimizer
from lightning_lowrank.optim.projection.bases import derive_seed

ESTIMATORS = ("trace", "top_eigenvalues", "diagonal", "subspace_diagonal")


class CurvatureProbe(Callback):
    """Log the Hessian trace (Hutchinson, Rademacher probes), per-layer traces and the top eigenvalues.

    Each probe's figures (``curvature/trace``, ``curvature/trace/<param>``, ``curvature/eigenvalue_<i>``, ...) go to
    ``trainer.callback_metrics``, so ``ModelCheckpoint(monitor="curvature/trace")`` and ``EarlyStopping`` can watch
    them (also with ``logger=False``), to every logger once, at the probe's step, and to ``history``.

    Args:
        every: probe after every this many optimizer steps.
        estimators: any of ``"trace"`` (with per-layer traces), ``"top_eigenvalues"``, ``"diagonal"`` and
            ``"subspace_diagonal"``. The diagonal is kept in ``self.diagonal`` (param name -> tensor, averaged over
            DDP ranks, a running average with ``diagonal_beta``; it shares its ``samples`` HVPs with the trace). The
            subspace diagonal is the curvature in each projected layer's P coordinates (``samples`` HVPs with
            vectors P z), handed to optimizers with ``preconditioner="lazy_hessian"``, which reuse it until the next
            probe. With ``"trace"``, optimizers with a ``memory_budget`` get the per-layer traces that steer ranks.
        samples: Hutchinson probe vectors per probe.
        top_k: eigenvalues by power iteration with deflation; ``max_iter`` and ``tol`` bound it.
        seed: probe vectors come from a generator seeded by (seed, step): the same on every DDP rank and on resume.
        diagonal_beta: keep an exponential average of the diagonal over probes (None: the latest probe's).

    Cost (``probe_stats``; per call logged as ``curvature/probe_seconds`` and ``curvature/probe_extra_bytes``):

    - seconds: wall time of one probe.
    - extra bytes, CUDA: the allocator's peak during the probe minus what was allocated just before it. That needs a
      reset of the allocator's peak counter, after which ``torch.cuda.max_memory_allocated`` covers only the time
      since the last probe; ``run_peak_allocated_bytes`` keeps the peak read before each reset, and the strategy's
      memory report takes the larger of the two: the peak of the whole run. (Other code reading the allocator's peak
      mid-run sees the reset too.)
    - extra bytes, CPU and other devices (no allocator statistics): a count, not a measurement. The total size of
      the unique storages of (a) the tensors autograd saves for backward during the probe's forward and its
      ``create_graph`` backward, (b) the first-order gradients, (c) the results it keeps: the Hutchinson diagonal
      and the eigenvectors (per param group too), (d) its snapshot of the module's buffers. Storages of the
      parameters, buffers and batch are left out: training holds them anyway. Temporaries autograd does not save
      (probe vectors, Hessian-vector products) are not counted, so the probe's true peak can be higher.
    - step seconds: the wall time between probes (validation excluded) over the training batches run in it, so
      loading, logging and callbacks are in it as a user sees them (a micro-batch under gradient accumulation): the
      probe re-runs one batch, so probe seconds / step seconds is its price in training batches. On CUDA the device
      is synchronised only around probes, so timing costs training nothing.

    Edge of stability (with ``"top_eigenvalues"``): a param group's top Hessian eigenvalue is the top one found
    globally when the group holds every probed param, else that of the group's own Hessian block (one more
    power iteration per group). ``lr * eigenvalue`` is logged as ``curvature/lr_x_eigenvalue/group{i}``; above 2 it
    warns once per group (remembered in the checkpoint). That is plain gradient descent's criterion; for Adam-like
    optimizers the relevant threshold is on the preconditioned Hessian, so there the warning is a hint. Power
    iteration finds the largest-magnitude eigenvalue: when that one is negative, a positive one past 2 / lr is missed.
    """

    def __init__(
        self,
        every: int = 500,
        estimators: tuple[str, ...] = ("trace", "top_eigenvalues"),
        samples: int = 8,
        top_k: int = 1,
        max_iter: int = 50,
        tol: float = 1e-3,
        seed: int = 0,
        diagonal_beta: float | None = None,
    ) -> None:
        _check_arguments(every, estimators, samples, top_k, max_iter, tol, seed, diagonal_beta)
        self.every, self.estimators, self.samples, self.top_k = every, tuple(estimators), samples, top_k
        self.max_iter, self.tol, self.seed, self.diagonal_beta = max_iter, tol, seed, diagonal_beta
        self.diagonal: dict[str, Tensor] = {}  # "diagonal": the Hutchinson diagonal per param name
        self.history: list[dict[str, Any]] = []
        self._last_step = -1
        self._calls, self._probe_seconds, self._max_extra_bytes = 0, 0.0, 0.0
        self._steps, self._step_seconds = 0, 0.0
        self._mark: float | None = None  # when the current stretch of training batches began
        self._batches = 0  # training batches since then
        self._paused: float | None = None
        self._run_peak: int | None = None  # CUDA: highest allocator peak read before a reset
        self._warned: set[str] = set()  # param groups already warned about the edge of stability

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not pl_module.automatic_optimization:
            raise ValueError(
                "CurvatureProbe re-runs training_step to get a differentiable loss; with manual optimization that "
                "step would also step the optimizer. Use automatic optimization, or probe from your own code with "
                "lightning_lowrank.curvature."
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        synchronize(pl_module.device)
        self._mark, self._batches = time.perf_counter(), 0

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._mark is not None:
            self._paused = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._mark is not None and self._paused is not None:
            self._mark += time.perf_counter() - self._paused  # validation is not training time
            self._paused = None

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._batches += 1
        step = trainer.global_step
        if step == self._last_step or step % self.every != 0:
            return  # not an optimizer-step boundary of ours (or an accumulation micro-batch)
        self._last_step = step
        synchronize(pl_module.device)  # the batches' kernels are done: neither they nor the probe gets the other's
        start = time.perf_counter()
        if self._mark is not None:
            self._steps += self._batches
            self._step_seconds += start - self._mark
        figures, blocks = self._probe(trainer, pl_module, batch, batch_idx, step)
        figures["probe_seconds"] = time.perf_counter() - start
        figures = {k: mean_over_ranks(v, pl_module.device) for k, v in figures.items()}
        self._calls += 1
        self._probe_seconds += figures["probe_seconds"]
        self._max_extra_bytes = max(self._max_extra_bytes, figures["probe_extra_bytes"])
        self.history.append({"step": step, **figures})
        log_figures(trainer, pl_module, figures, step)
        self._warn_edge_of_stability(blocks, figures)
        if "trace" in self.estimators:
            self._feed_layer_traces(trainer, pl_module, figures)
        self._mark, self._batches = time.perf_counter(), 0

    def _probe(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, step: int
    ) -> tuple[dict[str, float], list[ParamBlock]]:
        named = [(n, p) for n, p in pl_module.named_parameters() if p.requires_grad]
        names, params = [n for n, _ in named], [p for _, p in named]
        held = [*pl_module.parameters(), *pl_module.buffers(), *tensors_in(batch)]
        devices = [params[0].device] if params and params[0].is_cuda else []
        figures: dict[str, float] = {}
        blocks: list[ParamBlock] = []
        with ExtraMemory(pl_module.device, held) as cost:
            buffers = {n: b.detach().clone() for n, b in pl_module.named_buffers()}
            cost.keep(buffers.values())
            with torch.random.fork_rng(devices=devices), silenced_logging(pl_module), torch.enable_grad():
                grads = rerun_gradients(trainer, pl_module, batch, batch_idx, params)
                cost.keep(grads)
                generator = torch.Generator().manual_seed(derive_seed(self.seed, step))
                if "trace" in self.estimators or "diagonal" in self.estimators:
                    result = hutchinson(grads, params, self.samples, generator)
                    cost.keep(result.diagonal)
                    if "trace" in self.estimators:
                        figures["trace"] = result.trace
                        figures.update({f"trace/{n}": t for n, t in zip(names, result.layer_traces)})
                    if "diagonal" in self.estimators:
                        self._fold_diagonal(trainer, names, result.diagonal)
                if "subspace_diagonal" in self.estimators:
                    self._feed_subspace_diagonals(trainer, grads, params, generator)
                if "top_eigenvalues" in self.estimators:
                    search = (self.top_k, generator, self.max_iter, self.tol, cost.keep)
                    found, blocks = eigenvalue_figures(trainer.strategy.optimizers, grads, params, *search)
                    figures.update(found)
        with torch.no_grad():
            for n, b in pl_module.named_buffers():
                b.copy_(buffers[n])
        figures["probe_extra_bytes"] = float(cost.bytes)
        if cost.run_peak is not None:
            self._run_peak = max(self._run_peak or 0, cost.run_peak)
        return figures, blocks

    def _fold_diagonal(self, trainer: pl.Trainer, names: Sequence[str], diagonal: Sequence[Tensor]) -> None:
        for name, d in zip(names, diagonal):
            d = trainer.strategy.reduce(d.detach(), reduce_op="mean")
            if self.diagonal_beta is None or name not in self.diagonal:
                self.diagonal[name] = d
            else:  # (a diagonal restored from a checkpoint is on the CPU)
                self.diagonal[name] = self.diagonal[name].to(d.device).lerp_(d, 1 - self.diagonal_beta)

    def _feed_subspace_diagonals(
        self, trainer: pl.Trainer, grads: Sequence[Tensor], params: Sequence[Tensor], generator: torch.Generator
    ) -> None:
        """Hand each lazy-Hessian optimizer the curvature diagonal in its layers' current subspaces."""
        for opt in trainer.strategy.optimizers:
            if not (isinstance(opt, ProjectedOptimizer) and opt.wants_curvature()):
                continue
            wanted = set(opt.curvature_params())
            bases = [opt.projection_matrix(p) if p in wanted else None for p in params]
            sides = [opt.projection_side(p) if p in wanted else "auto" for p in params]
            estimates = subspace_diagonal(grads, params, bases, self.samples, generator, sides)
            opt.update_curvature(
                {p: trainer.strategy.reduce(h, reduce_op="mean") for p, h in zip(params, estimates) if h is not None}
            )

    def _feed_layer_traces(self, trainer: pl.Trainer, pl_module: pl.LightningModule, figures: dict[str, float]) -> None:
        """Per-layer traces (averaged over ranks) steer the ranks of optimizers with a memory budget."""
        names = {p: n for n, p in pl_module.named_parameters()}
        for opt in trainer.strategy.optimizers:
            if isinstance(opt, ProjectedOptimizer) and opt.memory_budget is not None:
                opt.set_layer_curvature({p: figures[f"trace/{names[p]}"] for p in opt.projected_params()})

    def _warn_edge_of_stability(self, blocks: Sequence[ParamBlock], figures: dict[str, float]) -> None:
        """Warn once per group, from the figures averaged over ranks (so every rank records the same groups)."""
        for block in blocks:
            product = figures[f"lr_x_eigenvalue/{block.label}"]
            if product <= EDGE_OF_STABILITY or block.label in self._warned:
                continue
            self._warned.add(block.label)
            rank_zero_warn(edge_of_stability_message(block, product))

    def probe_stats(self, trainer: pl.Trainer) -> dict[str, float]:
        """For the memory report: ``calls``; with a call, ``seconds`` (mean per call) and ``extra_bytes`` (max over
        calls); with a timed batch, ``step_seconds`` (mean training batch); with both, ``ratio`` (seconds per call /
        step seconds)."""
        stats = {"calls": float(self._calls)}
        if self._calls:
            stats["seconds"] = self._probe_seconds / self._calls
            stats["extra_bytes"] = self._max_extra_bytes
        if self._steps:
            stats["step_seconds"] = self._step_seconds / self._steps
            if self._calls and stats["step_seconds"] > 0:
                stats["ratio"] = stats["seconds"] / stats["step_seconds"]
        return stats

    def run_peak_allocated_bytes(self) -> int | None:
        """CUDA: the highest ``max_memory_allocated`` read just before this callback reset it (None if it never
        did). The run's peak is the larger of this and the allocator's peak now."""
        return self._run_peak

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": self.history,
            "last_step": self._last_step,
            "probe_calls": self._calls,
            "probe_total_seconds": self._probe_seconds,
            "probe_max_extra_bytes": self._max_extra_bytes,
            "train_steps": self._steps,
            "train_total_seconds": self._step_seconds,
            "eos_warned": sorted(self._warned),
            "diagonal": {n: d.cpu() for n, d in self.diagonal.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict["history"])
        self._last_step = state_dict["last_step"]
        # Checkpoints from before the cost figures: count what the history holds.
        self._calls = state_dict.get("probe_calls", len(self.history))
        logged = sum(h.get("probe_seconds", 0.0) for h in self.history)
        self._probe_seconds = state_dict.get("probe_total_seconds", logged)
        largest = max((h.get("probe_extra_bytes", 0.0) for h in self.history), default=0.0)
        self._max_extra_bytes = state_dict.get("probe_max_extra_bytes", largest)
        self._steps = state_dict.get("train_steps", 0)
        self._step_seconds = state_dict.get("train_total_seconds", 0.0)
        self._warned = set(state_dict.get("eos_warned", ()))
        self.diagonal = dict(state_dict.get("diagonal", {}))  # moved to the params' device at the next fold


def _check_arguments(
    every: Any, estimators: Any, samples: Any, top_k: Any, max_iter: Any, tol: Any, seed: Any, diagonal_beta: Any
) -> None:
    """``CurvatureProbe``'s arguments, refused when it is built, each with what is allowed."""
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be an int >= 1 (optimizer steps), got {every!r}")
    if isinstance(estimators, str):
        raise ValueError(f"estimators must be a tuple of names from {ESTIMATORS}, got the string {estimators!r}")
    unknown = set(estimators) - set(ESTIMATORS)
    if unknown or not estimators:
        raise ValueError(f"estimators must be a non-empty subset of {ESTIMATORS}, got {estimators!r}")
    for name, value, low in (
        ("samples", samples, 1),
        ("top_k", top_k, 1),
        ("max_iter", max_iter, 1),
        ("seed", seed, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0:
        raise ValueError(f"tol must be a number >= 0 (power iteration's relative change to stop at), got {tol!r}")
    if diagonal_beta is not None and (
        isinstance(diagonal_beta, bool) or not isinstance(diagonal_beta, (int, float)) or not 0.0 <= diagonal_beta < 1.0
    ):
        raise ValueError(f"diagonal_beta must be in [0, 1) or None, got {diagonal_beta!r}")


def log_figures(trainer: pl.Trainer, pl_module: pl.LightningModule, figures: dict[str, float], step: int) -> None:
    """Each figure as ``curvature/<name>``: into ``trainer.callback_metrics`` (what ``ModelCheckpoint`` and
    ``EarlyStopping`` monitor, also with ``logger=False``) through ``pl_module.log``, and into the loggers once
    per probe, at its step. ``pl_module.log`` gets ``logger=False`` because it writes to the loggers only every
    ``log_every_n_steps``, which would drop the probes off that cadence; the loggers get every probe from the
    ``log_metrics`` call below instead, so each figure reaches them exactly once. (The re-run, whose own
    ``self.log`` calls are silenced, is over by now.)"""
    metrics = {f"curvature/{k}": v for k, v in figures.items()}
    pl_module.log_dict(metrics, on_step=True, on_epoch=False, logger=False)
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)
