"""The same run under ``lowrank_ddp`` and ``lowrank_fsdp`` (2 CPU processes each), SVD at rank 8 refreshed every 4
steps, 160 samples: do the two agree after the refreshes? Run as a script (Lightning's launchers re-run it for the
second process), by ``tests/strategies/test_svd_signs_runs.py`` and ``benchmarks``:

    python tests/ddp_fsdp_signs.py OUT_DIR [SIGNS ...]     # SIGNS: none, max_abs, default (default: none, max_abs)

Each rank trains on its half of every batch of 16 (``use_distributed_sampler=False``), so both strategies average
the same gradients; they differ only in rounding (FSDP2 reduce-scatters, DDP all-reduces). For each ``svd_signs``
it writes OUT_DIR/{ddp,fsdp}_{signs}.pt (rank 0: every parameter in full); ``default`` passes no ``svd_signs``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Subset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_lowrank import LowRankDDPStrategy, LowRankFSDPStrategy  # noqa: E402
from tests.models import TinyNet, token_data  # noqa: E402

BATCH, WORLD, N, STEPS = 16, 2, 160, 10  # 10 steps: refreshes at 0, 4 and 8
OPTIONS = dict(rank=8, projector="svd", update_gap=4, side="right", memory_report=False, memory_json=False)


class Halves(TinyNet):
    def __init__(self) -> None:
        super().__init__(scheduler=None, batch_size=BATCH, n=N, width=48, hidden=64)

    def train_dataloader(self) -> DataLoader:
        rank, half = self.trainer.global_rank, BATCH // WORLD
        rows = [b + rank * half + i for b in range(0, self.n, BATCH) for i in range(half)]
        return DataLoader(Subset(token_data(self.n), rows), batch_size=half, shuffle=False)


def fit(kind: str, signs: str, out: Path) -> None:
    torch.manual_seed(0)
    model = Halves()
    cls = LowRankDDPStrategy if kind == "ddp" else LowRankFSDPStrategy
    extra = dict(start_method="popen") if kind == "ddp" else {}
    trainer = L.Trainer(
        accelerator="cpu",
        devices=WORLD,
        strategy=cls(**OPTIONS, **({} if signs == "default" else {"svd_signs": signs}), **extra),
        max_steps=STEPS,
        use_distributed_sampler=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model)
    full = {n: p.full_tensor() if hasattr(p, "full_tensor") else p.detach() for n, p in model.named_parameters()}
    if trainer.global_rank == 0:
        torch.save({n: t.detach().clone() for n, t in full.items()}, out / f"{kind}_{signs}.pt")


def main(out: Path, signs: list[str]) -> None:
    for s in signs:
        for kind in ("ddp", "fsdp"):
            fit(kind, s, out)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:] or ["none", "max_abs"])
