"""Gradient bytes each rank all-reduces per step on the demo model, with and without ``low_rank_comm=True``.

Two CPU processes (gloo) train ``ByteLM(ByteLMConfig())`` for 4 steps with ``update_gap=2`` (so every other step
refreshes, and then sends in full); the strategy's counter (``strategy.comm_bytes``) is printed per step next to the
figure computed from the parameter shapes with the counter's own formula. Random bytes as data: only shapes matter.

    python examples/bench_comm_bytes.py
"""

import os
import sys
from datetime import timedelta

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from byte_lm import ByteLM, ByteLMConfig  # noqa: E402

from lightning_lowrank import LowRankDDPStrategy  # noqa: E402
from lightning_lowrank.selection import select_lowrank_params  # noqa: E402
from lightning_lowrank.strategies.comm import low_rank_comm_bytes  # noqa: E402

RANK = 32


class PrintCounter(Callback):
    def on_train_end(self, trainer, pl_module):
        if trainer.global_rank == 0:
            for i, b in enumerate(trainer.strategy.comm_bytes):
                print(f"step {i}: sent {b.sent:,} bytes, a plain all-reduce {b.full:,} ({b.full / b.sent:.2f}x)")


if __name__ == "__main__":
    torch.manual_seed(0)
    model = ByteLM(ByteLMConfig())
    projected = {p for p in select_lowrank_params(model, None, ()) if min(p.shape) > RANK}
    full = low_rank_comm_bytes((tuple(p.shape), None) for p in model.parameters())
    low = low_rank_comm_bytes((tuple(p.shape), RANK if p in projected else None) for p in model.parameters())
    print(f"from shapes: {len(projected)} projected layers; {low:,} bytes per step in the subspace, {full:,} in full")
    x = torch.randint(0, 256, (64, ByteLMConfig().block_size + 1))
    data = DataLoader(TensorDataset(x[:, :-1], x[:, 1:]), batch_size=8)
    strategy = LowRankDDPStrategy(
        rank=RANK, update_gap=2, low_rank_comm=True, start_method="fork", timeout=timedelta(seconds=120),
        memory_report=False, memory_json=False,
    )  # fmt: skip
    trainer = L.Trainer(
        strategy=strategy, accelerator="cpu", devices=2, max_steps=4, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, callbacks=[PrintCounter()],
    )  # fmt: skip
    trainer.fit(model, data)
