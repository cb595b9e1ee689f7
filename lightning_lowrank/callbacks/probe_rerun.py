"""How ``CurvatureProbe`` re-runs a training step: the differentiable gradients of its loss, with ``self.log``
silenced, and what that costs (wall time with CUDA synchronised, memory held beyond training, averaged over ranks)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torchmetrics import MeanMetric


def rerun_gradients(
    trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, params: Sequence[Tensor]
) -> list[Tensor]:
    """Re-run ``training_step`` on ``batch`` and differentiate its loss w.r.t. ``params`` with ``create_graph=True``,
    so Hessian-vector products can differentiate the gradients again (zeros for a param the loss does not use)."""
    # Fused attention kernels (flash, memory-efficient) have no double backward: attention in the
    # probe's forward runs on the math kernel, which is the same function, twice differentiable.
    with trainer.precision_plugin.forward_context(), sdpa_kernel([SDPBackend.MATH]):
        out = pl_module.training_step(batch, batch_idx)
    loss = out["loss"] if isinstance(out, dict) else out
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


class ExtraMemory:
    """What a probe holds beyond training: the allocator's peak rise on CUDA, a byte count elsewhere.

    See ``CurvatureProbe``'s docstring for what the count covers. Counted storages are held until the probe ends so
    that a freed storage's address cannot be reused by another and be taken for the same one.
    """

    def __init__(self, device: torch.device, already_held: Iterable[Tensor]) -> None:
        self.device, self.cuda = device, device.type == "cuda"
        self.bytes = 0
        self.run_peak: int | None = None
        self._excluded = {t.untyped_storage().data_ptr() for t in already_held}
        self._held: dict[int, torch.UntypedStorage] = {}

    def __enter__(self) -> ExtraMemory:
        if self.cuda:
            # Resetting the peak loses the run's peak so far: keep it (see CurvatureProbe.run_peak_allocated_bytes).
            self.run_peak = torch.cuda.max_memory_allocated(self.device)
            self._before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)
            self._hooks.__enter__()
        return self

    def _pack(self, t: Tensor) -> Tensor:
        self.keep((t,))
        return t

    def keep(self, tensors: Iterable[Tensor]) -> None:
        """Count these tensors' storages (no-op on CUDA, where the allocator measures)."""
        if self.cuda:
            return
        for t in tensors:
            storage = t.untyped_storage()
            if storage.data_ptr() not in self._excluded:
                self._held[storage.data_ptr()] = storage

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._before
        else:
            self._hooks.__exit__(*exc)
            self.bytes = sum(s.nbytes() for s in self._held.values())
            self._held.clear()


def _unpack(t: Tensor) -> Tensor:
    return t


def tensors_in(batch: Any) -> list[Tensor]:
    """The batch's tensors: training holds them anyway, so the probe's cost leaves them out."""
    found: list[Tensor] = []
    apply_to_collection(batch, Tensor, found.append)
    return found


def synchronize(device: torch.device) -> None:
    """CUDA runs asynchronously: without this, wall time would measure kernel launches, not the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class silenced_logging:
    """``self.log`` inside the re-run training_step must not record the probe's forward as a training metric."""

    def __init__(self, module: pl.LightningModule) -> None:
        self.module = module

    def __enter__(self) -> None:
        self.module.log = lambda *args, **kwargs: None  # type: ignore[method-assign]
        self.module.log_dict = lambda *args, **kwargs: None  # type: ignore[method-assign]

    def __exit__(self, *exc: object) -> None:
        del self.module.log, self.module.log_dict  # back to the class's methods


def mean_over_ranks(value: float, device: torch.device) -> float:
    """A torchmetrics mean: synchronised over DDP ranks (each probed its own batch), a no-op on one process."""
    metric = MeanMetric().to(device)
    metric.update(torch.tensor(float(value), dtype=torch.float64, device=device))
    return float(metric.compute())
