"""``MemoryPhases``: on sampled training batches, the CUDA allocator's peak in each phase of the step."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

PHASES = ("forward", "backward", "optimizer_step", "batch_end")  # the report labels them (memory.report.PHASE_LABELS)


class MemoryPhases(Callback):
    """Peak CUDA memory allocated in each phase of a training step, measured on every ``every``-th optimizer step.

    A step is sampled when the global step it ends on is a multiple of ``every`` (the steps after which a
    ``CurvatureProbe(every=every)`` probes, so with the same ``every`` its cost lands in the batch-end phase). On a
    sampled batch the allocator's peak counter is reset at each phase boundary and the peak read at the next one:

    - ``forward``: ``on_train_batch_start`` to ``on_before_backward`` (the training step, the loss).
    - ``backward``: to ``on_before_optimizer_step`` (gradients, clipping).
    - ``optimizer_step``: to ``on_train_batch_end`` (the update, subspace refreshes, rank changes).
    - ``batch_end``: from there to the next batch, validation or the end of the epoch: the curvature probe and the
      other callbacks' batch-end work. A callback that resets the peak counter itself (``CurvatureProbe``) hides
      what was allocated in this phase before its reset; what follows its reset is counted.

    Under gradient accumulation the forward and backward phases of every micro-batch of a sampled step are taken
    (the largest peak). ``phase_stats`` returns the largest peak of each phase over the sampled steps and
    ``samples``; ``history`` keeps each sampled step's figures.

    Resetting the allocator's peak counter interferes with anything else that reads it mid-run
    (``torch.cuda.max_memory_allocated``, profilers, other callbacks): they see the peak since the last reset only.
    That is why this callback is opt-in and touches the counter only on sampled steps. It keeps the peak it read
    before each reset (``run_peak_allocated_bytes``), so the strategy's memory report still gives the whole run's
    peak. To run this callback's hooks before other callbacks' at a phase boundary, it moves itself to the front of
    the Trainer's callbacks.

    On a device other than CUDA it does nothing (and says so once).
    """

    def __init__(self, every: int = 100) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int >= 1 (optimizer steps), got {every!r}")
        self.every = every
        self.history: list[dict[str, float]] = []
        self._device: torch.device | None = None
        self._phase: str | None = None  # the phase being measured now (on a sampled batch)
        self._current: dict[str, float] | None = None  # the sampled step being measured
        self._peaks: dict[str, float] = {}
        self._run_peak: int | None = None
        self._told = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self in trainer.callbacks:  # first at every phase boundary (see the docstring)
            trainer.callbacks.remove(self)
            trainer.callbacks.insert(0, self)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._device = self._cuda_device(pl_module)
        if self._device is None and not self._told:
            self._told = True
            rank_zero_info(
                f"MemoryPhases: the module is on {pl_module.device.type}, not CUDA; per-phase peaks need the CUDA "
                "allocator's counters and are not measured."
            )

    @staticmethod
    def _cuda_device(pl_module: pl.LightningModule) -> torch.device | None:
        device = pl_module.device
        return device if device.type == "cuda" else None

    def _sampled(self, trainer: pl.Trainer) -> bool:
        return (trainer.global_step + 1) % self.every == 0

    def _switch(self, phase: str | None) -> None:
        """Close the current phase (read its peak, keep the run's peak) and open ``phase`` (reset the counter)."""
        if self._device is None:
            return
        if self._phase is not None:
            peak = torch.cuda.max_memory_allocated(self._device)
            self._run_peak = max(self._run_peak or 0, peak)
            assert self._current is not None
            self._current[self._phase] = max(self._current.get(self._phase, 0.0), float(peak))
            self._peaks[self._phase] = max(self._peaks.get(self._phase, 0.0), float(peak))
        if phase is not None:
            if self._phase is None:  # nobody read the counter since the last reset of ours: keep the run's peak
                self._run_peak = max(self._run_peak or 0, torch.cuda.max_memory_allocated(self._device))
            torch.cuda.reset_peak_memory_stats(self._device)
        self._phase = phase

    def _finish(self) -> None:
        """Close an open phase and file the step it belongs to."""
        self._switch(None)
        if self._current is not None and any(k in self._current for k in PHASES):
            self.history.append(self._current)
        self._current = None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._device is None:
            return
        step = trainer.global_step
        if self._current is not None and self._current.get("step") != step:
            self._finish()  # the previous sampled step's batch-end phase ends here
        else:
            self._switch(None)  # a micro-batch of the same step: its batch-end phase is not one of the step's
        if self._sampled(trainer):
            if self._current is None:
                self._current = {"step": float(step)}
            self._switch("forward")

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        if self._phase == "forward":
            self._switch("backward")

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self._phase == "backward":
            self._switch("optimizer_step")

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._phase == "optimizer_step":
            self._switch("batch_end")
        elif self._phase is not None:  # an accumulation micro-batch: no optimizer step in it
            self._switch(None)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish()

    def phase_stats(self, trainer: pl.Trainer | None = None) -> dict[str, float] | None:
        """For the memory report: the largest peak of each phase measured (bytes) and ``samples`` (sampled steps);
        None when nothing was measured (not on CUDA, or no sampled step yet)."""
        if not self._peaks:
            return None
        return {**{p: self._peaks[p] for p in PHASES if p in self._peaks}, "samples": float(len(self.history))}

    def run_peak_allocated_bytes(self) -> int | None:
        """CUDA: the highest ``max_memory_allocated`` read before one of this callback's resets or at a phase's end
        (None if it never read it). The run's peak is the larger of this and the allocator's peak now."""
        return self._run_peak
