"""What the Fabric tests share: a model (an ``nn.Linear`` stack, also a LightningModule so the Trainer runs the same
thing), its data, and the Fabric loop (module level: fork/spawn workers and ``fabric_two_processes.py`` import it)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.fabric import Fabric
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

OPTIONS = dict(rank=4, update_gap=3)  # svd refreshes at steps 0, 3, 6
N, BATCH, EPOCHS = 64, 16, 2  # 4 batches an epoch: 8 optimizer steps


def data(n: int = N) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 16, generator=g)
    return TensorDataset(x, torch.tanh(x @ torch.randn(16, 8, generator=g)))


class Stack(L.LightningModule):
    """Linear(16, w) -> Linear(w, w) -> Linear(w, 8): the first two are projected, the last is the output head."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.inp = nn.Linear(16, width)
        self.hidden = nn.Linear(width, width)
        self.head = nn.Linear(width, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.hidden(torch.relu(self.inp(x)))))

    # -- the Trainer's side: the same loss, optimizer, scheduler and data order -------------------------------
    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return loss(self, batch)

    def configure_optimizers(self) -> dict:
        opt, sched = optimizer_and_scheduler(self)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def train_dataloader(self) -> DataLoader:
        return DataLoader(data(), batch_size=BATCH, shuffle=False)


def loss(model: nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
    """Through ``model``'s forward (a method of its own would bypass Fabric's and DDP's wrappers)."""
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def optimizer_and_scheduler(model: nn.Module) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.StepLR]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.8)


def fit(fabric: Fabric, out: Path | None = None, width: int = 32, fsdp: bool = False) -> tuple[nn.Module, object]:
    """The Fabric loop: ``EPOCHS`` over ``data()``, ``BATCH`` samples a step split over the ranks (Fabric's
    DistributedSampler without shuffling gives rank r the samples r, r + world, ...: together, the whole batch).
    The scheduler is built on the torch optimizer and *not* passed to ``fabric.setup``. With ``out``, each rank writes
    its parameters (in full) and the strategy's memory report to ``out/rank{r}.pt``."""
    torch.manual_seed(0)
    model = Stack(width)
    if fsdp:  # FSDP2 replaces the parameters as it shards them: the optimizer is built on the sharded module
        model = fabric.setup_module(model)
        opt, sched = optimizer_and_scheduler(model)
        opt = fabric.setup_optimizers(opt)
    else:
        opt, sched = optimizer_and_scheduler(model)
        model, opt = fabric.setup(model, opt)
    loader = fabric.setup_dataloaders(DataLoader(data(), batch_size=BATCH // fabric.world_size, shuffle=False))
    for _ in range(EPOCHS):
        for batch in loader:
            fabric.backward(loss(model, batch))
            opt.step()
            opt.zero_grad()
            sched.step()
    if out is not None:
        strategy = fabric.strategy
        report = strategy.memory_report()
        total = strategy.memory_report_over_ranks(report)  # a collective under FSDP2: every rank calls it
        full = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for n, p in params(model)}
        saved = {
            "params": full,
            "state_bytes": report.optimizer_state_bytes,
            "saving": report.baseline_state_bytes - report.optimizer_state_bytes,
        }
        if total is not None:
            saved["total_state_bytes"] = total.optimizer_state_bytes
        if hasattr(strategy, "comm_bytes"):
            saved["comm"] = [tuple(c) for c in strategy.comm_bytes]
        torch.save(saved, out / f"rank{fabric.global_rank}.pt")
    return model, opt


def params(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The named parameters of the user's module (under Fabric's and DDP's wrappers)."""
    inner = getattr(model, "module", model)
    inner = getattr(inner, "module", inner)
    return list(inner.named_parameters())


def run(fabric: Fabric, out: Path, **kwargs: object) -> None:
    """``fit`` for ``fabric.launch``: rank 0's return value goes back to the parent, and wrappers do not pickle."""
    fit(fabric, out, **kwargs)
