"""``CurvatureProbe``: every k optimizer steps, measure the loss curvature on the current batch.

The probe re-runs the module's own ``training_step`` on the batch that was just trained on, under autograd, and
differentiates that loss twice (``torch.autograd.grad`` with ``create_graph=True``). Re-running the step is chosen
over asking the strategy for a ``create_graph`` backward on probe steps because it leaves the real training step
untouched: the probe never writes ``.grad``, restores the global RNG state (dropout draws) and the module's buffers
(BatchNorm statistics), and silences ``self.log`` while it runs, so training is bit-identical with or without it.
The cost is one extra forward plus the Hessian-vector products, paid only every ``every`` steps.
"""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torchmetrics import MeanMetric

from lightning_lowrank.curvature import hutchinson, top_eigenvalues
from lightning_lowrank.optim.projection import derive_seed

ESTIMATORS = ("trace", "top_eigenvalues")


class CurvatureProbe(Callback):
    """Log the Hessian trace (Hutchinson, Rademacher probes), per-layer traces and the top eigenvalues.

    Args:
        every: probe after every this many optimizer steps.
        estimators: any of ``"trace"`` (with per-layer traces) and ``"top_eigenvalues"``.
        samples: Hutchinson probe vectors per probe.
        top_k: eigenvalues by power iteration with deflation; ``max_iter`` and ``tol`` bound it.
        seed: probe vectors come from a generator seeded by (seed, step): the same on every DDP rank and on resume.
    """

    def __init__(
        self,
        every: int = 500,
        estimators: tuple[str, ...] = ESTIMATORS,
        samples: int = 8,
        top_k: int = 1,
        max_iter: int = 50,
        tol: float = 1e-3,
        seed: int = 0,
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int >= 1 (optimizer steps), got {every!r}")
        unknown = set(estimators) - set(ESTIMATORS)
        if unknown or not estimators:
            raise ValueError(f"estimators must be a non-empty subset of {ESTIMATORS}, got {estimators!r}")
        for name, value in (("samples", samples), ("top_k", top_k), ("max_iter", max_iter)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.every, self.estimators, self.samples, self.top_k = every, tuple(estimators), samples, top_k
        self.max_iter, self.tol, self.seed = max_iter, tol, seed
        self.history: list[dict[str, Any]] = []
        self._last_step = -1

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not pl_module.automatic_optimization:
            raise ValueError(
                "CurvatureProbe re-runs training_step to get a differentiable loss; with manual optimization that "
                "step would also step the optimizer. Use automatic optimization, or probe from your own code with "
                "lightning_lowrank.curvature."
            )

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self._last_step or step % self.every != 0:
            return  # not an optimizer-step boundary of ours (or an accumulation micro-batch)
        self._last_step = step
        start = time.perf_counter()
        figures = self._probe(trainer, pl_module, batch, batch_idx, step)
        figures["probe_seconds"] = time.perf_counter() - start
        figures = {k: _mean_over_ranks(v, pl_module.device) for k, v in figures.items()}
        self.history.append({"step": step, **figures})
        for logger in trainer.loggers:
            logger.log_metrics({f"curvature/{k}": v for k, v in figures.items()}, step=step)

    def _probe(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, step: int
    ) -> dict[str, float]:
        named = [(n, p) for n, p in pl_module.named_parameters() if p.requires_grad]
        names, params = [n for n, _ in named], [p for _, p in named]
        buffers = {n: b.detach().clone() for n, b in pl_module.named_buffers()}
        devices = [params[0].device] if params and params[0].is_cuda else []
        figures: dict[str, float] = {}
        with torch.random.fork_rng(devices=devices), _silenced_logging(pl_module), torch.enable_grad():
            with trainer.precision_plugin.forward_context():
                out = pl_module.training_step(batch, batch_idx)
            loss = out["loss"] if isinstance(out, dict) else out
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
            generator = torch.Generator().manual_seed(derive_seed(self.seed, step))
            if "trace" in self.estimators:
                result = hutchinson(grads, params, self.samples, generator)
                figures["trace"] = result.trace
                figures.update({f"trace/{n}": t for n, t in zip(names, result.layer_traces)})
            if "top_eigenvalues" in self.estimators:
                eig = top_eigenvalues(grads, params, self.top_k, generator, self.max_iter, self.tol)
                figures.update({f"eigenvalue_{i}": v for i, v in enumerate(eig.eigenvalues)})
        with torch.no_grad():
            for n, b in pl_module.named_buffers():
                b.copy_(buffers[n])
        return figures

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict["history"])
        self._last_step = state_dict["last_step"]


class _silenced_logging:
    """``self.log`` inside the re-run training_step must not record the probe's forward as a training metric."""

    def __init__(self, module: pl.LightningModule) -> None:
        self.module = module

    def __enter__(self) -> None:
        self.module.log = lambda *args, **kwargs: None  # type: ignore[method-assign]
        self.module.log_dict = lambda *args, **kwargs: None  # type: ignore[method-assign]

    def __exit__(self, *exc: object) -> None:
        del self.module.log, self.module.log_dict  # back to the class's methods


def _mean_over_ranks(value: float, device: torch.device) -> float:
    """A torchmetrics mean: synchronised over DDP ranks (each probed its own batch), a no-op on one process."""
    metric = MeanMetric().to(device)
    metric.update(torch.tensor(float(value), dtype=torch.float64, device=device))
    return float(metric.compute())
