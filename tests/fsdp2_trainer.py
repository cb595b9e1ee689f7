"""``strategy="lowrank_fsdp"`` end to end on 2 CPU processes: run as a script (Lightning's ``ModelParallelStrategy``
launches the second process by re-running it), by ``tests/strategies/test_fsdp2_strategy.py``.

    python tests/fsdp2_trainer.py OUT_DIR

Fits, in order, each writing what rank 0 saw into OUT_DIR:

1. ``plain``: an unchanged ``TinyNet`` (no ``configure_model``: the strategy shards it), 4 steps, DCT refreshes at
   steps 0 and 2. Each rank trains on its half of every batch of 16, so the run is the single-device run on the whole
   batch (``use_distributed_sampler=False``: Lightning's sampler would shuffle). The same with svd and rsvd + Fira
   (``VARIANTS``).
2. ``first_half`` + ``resumed``: the same run stopped after 2 steps with a distributed checkpoint, then resumed to 4.
   ``muon``: ``MuonHalves`` (torch's Muon from configure_optimizers), projected, float32 Newton-Schulz.
3. ``own_configure_model``: a module that shards itself in ``configure_model``; trains, finite.
4. ``full_checkpoint``: 2 steps saved as one full checkpoint (``save_distributed_checkpoint=False``), for a
   single-device ``LowRankStrategy(side="right")`` to load.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Subset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_lowrank import LowRankFSDPStrategy  # noqa: E402
from tests.models import TinyNet, token_data  # noqa: E402

OPTIONS = dict(rank=4, projector="dct", dct_scorer="fft", update_gap=2)  # fft: no d x d basis held
# Other projectors and a residual through the Trainer (each also compared with one device).
VARIANTS = {"svd": dict(projector="svd"), "rsvd_fira": dict(projector="rsvd", residual="fira")}
MUON = dict(ns_dtype="float32")  # the Muon run's options (MuonHalves)
BATCH, WORLD, N = 16, 2, 32  # two batches per epoch


class Halves(TinyNet):
    """TinyNet whose rank r trains on rows [r * 8, r * 8 + 8) of every batch of 16, in order."""

    def __init__(self) -> None:
        super().__init__(scheduler=None, batch_size=BATCH, n=N)

    def train_dataloader(self) -> DataLoader:
        rank, half = self.trainer.global_rank, BATCH // WORLD
        data = token_data(self.n)
        rows = [b + rank * half + i for b in range(0, self.n, BATCH) for i in range(half)]
        return DataLoader(Subset(data, rows), batch_size=half, shuffle=False)


class MuonHalves(Halves):
    """Muon on the hidden weights (attn, mlp), nothing else trained; Newton-Schulz in float32 (``ns_dtype``)."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Muon([self.attn.weight, self.mlp.weight], lr=0.02, weight_decay=0.1)


class MuonAdamHalves(MuonHalves):
    """The issue's module: manual optimization, Muon on the hidden weights and AdamW on the rest."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self(x), y)
        optimizers = self.optimizers()
        for opt in optimizers:
            opt.zero_grad()
        self.manual_backward(loss)
        for opt in optimizers:
            opt.step()
        return loss

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        hidden = [self.attn.weight, self.mlp.weight]
        rest = [p for p in self.parameters() if all(p is not h for h in hidden)]
        return [torch.optim.Muon(hidden, lr=0.02, weight_decay=0.1), torch.optim.AdamW(rest, lr=1e-3)]


class ShardsItself(Halves):
    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in (self.attn, self.mlp):
            fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)


def fit(make: type, steps: int, ckpt_path: str | None = None, **strategy: object) -> L.Trainer:
    torch.manual_seed(0)  # the same initial weights as the single-device reference
    model = make()
    options = {**OPTIONS, "memory_report": False, "memory_json": False, **strategy}
    trainer = L.Trainer(
        accelerator="cpu",
        devices=WORLD,
        strategy=LowRankFSDPStrategy(**options),
        max_epochs=steps // 2,  # 2 steps an epoch: a checkpoint at its end resumes exactly (a plain loader)
        use_distributed_sampler=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, ckpt_path=ckpt_path)
    return trainer


def save(trainer: L.Trainer, out: Path, name: str) -> None:
    """Every parameter in full and this rank's view of the first projected layer (rank 0 writes)."""
    module = trainer.lightning_module
    params = {n: p.full_tensor() for n, p in module.named_parameters()}
    opt = trainer.strategy.optimizers[0]
    attn = module.attn.weight
    report = trainer.strategy.memory_report()  # this rank's bytes
    total = trainer.strategy.memory_report_over_ranks(report)  # a collective: every rank calls it
    facts = {
        "state_bytes": report.optimizer_state_bytes,
        "replicated_bytes": report.projector_bytes + report.state_by_kind["scalars"],
        "total_state_bytes": total.optimizer_state_bytes,
        "optimizer": type(opt).__name__,
        "exp_avg_rows": opt.state[attn].get("exp_avg", opt.state[attn].get("momentum_buffer")).shape[0],
        "steps": opt.completed_steps(attn),
        "refresh_bytes": opt.sharded_refresh_bytes,
        "step_bytes": opt.sharded_step_bytes,
    }
    if trainer.global_rank == 0:
        torch.save({"params": params, **facts}, out / f"{name}.pt")


def main(out: Path) -> None:
    save(fit(Halves, 4), out, "plain")
    for name, options in VARIANTS.items():
        save(fit(Halves, 4, **options), out, name)
    save(fit(MuonHalves, 4, **MUON), out, "muon")
    save(fit(MuonAdamHalves, 4, **MUON), out, "muon_adamw")
    trainer = fit(Halves, 2)
    trainer.save_checkpoint(out / "half.ckpt")
    save(trainer, out, "first_half")
    save(fit(Halves, 4, ckpt_path=str(out / "half.ckpt")), out, "resumed")
    save(fit(ShardsItself, 2), out, "own_configure_model")
    trainer = fit(Halves, 2, save_distributed_checkpoint=False)
    trainer.save_checkpoint(out / "full.ckpt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
