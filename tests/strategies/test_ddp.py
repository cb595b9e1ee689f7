"""Two CPU processes (gloo): every rank must end with the same parameters and subspaces."""

import sys
from datetime import timedelta

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_lowrank import CurvatureProbe, LowRankDDPStrategy, SubspaceRefresh
from tests.models import TinyNet

HANG = timedelta(seconds=120)  # a collective that one rank never joins fails the test instead of hanging CI


def _two_processes(strategy, **kwargs) -> L.Trainer:
    """A quiet 2-process CPU Trainer."""
    quiet = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    return L.Trainer(strategy=strategy, accelerator="cpu", devices=2, **quiet, **kwargs)


class SaveRankState(Callback):
    """Each worker writes its parameters and projection state; the test compares them in the main process."""

    def __init__(self, out_dir):
        self.out_dir = out_dir

    def on_train_end(self, trainer, pl_module):
        opt = trainer.optimizers[0]
        state = {
            "params": {n: p.detach().clone() for n, p in pl_module.named_parameters()},
            "proj": opt.state[pl_module.attn.weight]["proj"].clone(),
            "step": opt.state[pl_module.attn.weight]["step"].item(),
        }
        torch.save(state, f"{self.out_dir}/rank{trainer.global_rank}.pt")


@pytest.mark.skipif(sys.platform == "win32", reason="fork and spawn of gloo workers")
@pytest.mark.parametrize("how", ["fork_instance", "spawn_name"])
def test_two_process_ddp_ends_with_identical_parameters(tmp_path, how):
    torch.manual_seed(0)
    if how == "fork_instance":
        model = TinyNet(scheduler="step", n=128)
        strategy = LowRankDDPStrategy(rank=4, update_gap=2, start_method="fork", timeout=HANG)
    else:  # the registered name with its defaults (rank 128, so wider layers)
        model = TinyNet(scheduler="step", n=128, width=160, hidden=192)
        strategy = "lowrank_ddp_spawn"
    trainer = _two_processes(
        strategy, max_epochs=2, accumulate_grad_batches=2, callbacks=[SaveRankState(str(tmp_path))]
    )
    trainer.fit(model)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["step"] == r1["step"] == 4  # 128 samples / 2 ranks / 16 per batch / 2 accumulated, 2 epochs
    assert torch.equal(r0["proj"], r1["proj"])
    for name, p in r0["params"].items():
        assert torch.equal(p, r1["params"][name]), name
    assert r0["proj"].shape[1] == (4 if how == "fork_instance" else 128)
    torch.manual_seed(0)
    start = TinyNet(scheduler="step", width=model.embed.embedding_dim, hidden=model.attn.out_features)
    assert not torch.equal(r0["params"]["attn.weight"], start.attn.weight)  # it trained


class CountRefreshes(Callback):
    """Per rank: refreshes computed here vs received from the other rank, and the final subspaces."""

    def __init__(self, out_dir):
        self.out_dir, self.here, self.total = out_dir, 0, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # not a window's last micro-batch: no step ran, last_refreshes is still the previous step's
        infos = trainer.optimizers[0].last_refreshes.values()
        self.here += sum(info.computed_here for info in infos)
        self.total += len(infos)

    def record(self, trainer, pl_module) -> dict:
        opt = trainer.optimizers[0]
        return {
            "here": self.here,
            "total": self.total,
            "P": [opt.projection_matrix(p) for p in opt.projected_params()],
            "params": [p.detach().clone() for p in pl_module.parameters()],
        }

    def on_train_end(self, trainer, pl_module):
        torch.save(self.record(trainer, pl_module), f"{self.out_dir}/rank{trainer.global_rank}.pt")


@pytest.mark.skipif(sys.platform == "win32", reason="fork start method")
def test_refreshes_are_sharded_across_ranks_and_broadcast(tmp_path):
    torch.manual_seed(0)
    trainer = _two_processes(
        LowRankDDPStrategy(rank=4, projector="rsvd", start_method="fork", timeout=HANG),
        max_steps=6,
        callbacks=[SubspaceRefresh(every=2, adaptive=True, queue_size=1), CountRefreshes(str(tmp_path))],
    )
    trainer.fit(TinyNet(scheduler=None, n=128))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["total"] == r1["total"] >= 4  # 2 layers, several refreshes each
    # The i-th due layer of each refresh is computed on rank i % 2 only, and received by the other rank.
    assert r0["here"] + r1["here"] == r0["total"] and r0["here"] > 0 and r1["here"] > 0
    for a, b in zip(r0["P"] + r0["params"], r1["P"] + r1["params"]):
        assert torch.equal(a, b)


class SaveProbeHistory(Callback):
    def __init__(self, out_dir, probe):
        self.out_dir, self.probe = out_dir, probe

    def on_train_end(self, trainer, pl_module):
        torch.save(self.probe.history, f"{self.out_dir}/probe{trainer.global_rank}.pt")


@pytest.mark.skipif(sys.platform == "win32", reason="fork start method")
def test_curvature_probe_figures_agree_across_ranks(tmp_path):
    torch.manual_seed(0)
    probe = CurvatureProbe(every=2, samples=2, top_k=1, max_iter=5)
    trainer = _two_processes(
        LowRankDDPStrategy(rank=4, start_method="fork", timeout=HANG, memory_report=False),
        max_steps=4,
        callbacks=[probe, SaveProbeHistory(str(tmp_path), probe)],
    )
    trainer.fit(TinyNet(scheduler=None, n=128))
    h0, h1 = (torch.load(tmp_path / f"probe{r}.pt", weights_only=True) for r in (0, 1))
    assert [h["step"] for h in h0] == [2, 4]
    # Each rank probed its own batch; every logged figure (the probe's time too) is the mean over ranks.
    assert h0 == h1 and all(h["trace"] != 0 for h in h0)


class SaveCurvatureState(Callback):
    def __init__(self, out_dir):
        self.out_dir = out_dir

    def on_train_end(self, trainer, pl_module):
        opt = trainer.optimizers[0]
        W = pl_module.attn.weight
        state = {
            "params": {n: p.detach().clone() for n, p in pl_module.named_parameters()},
            "hessian": opt.state[W]["hessian"].clone(),
            "ranks": [opt.layer_rank(p) for p in opt.projected_params()],
        }
        torch.save(state, f"{self.out_dir}/curv{trainer.global_rank}.pt")


@pytest.mark.skipif(sys.platform == "win32", reason="fork start method")
def test_lazy_hessian_and_budgeted_ranks_agree_across_ranks(tmp_path):
    torch.manual_seed(0)
    strategy = LowRankDDPStrategy(
        rank=8, update_gap=2, preconditioner="lazy_hessian", memory_budget=20_000, start_method="fork",
        timeout=HANG, memory_report=False,
    )  # fmt: skip
    probe = CurvatureProbe(every=2, estimators=("trace", "subspace_diagonal"), samples=2)
    trainer = _two_processes(strategy, max_steps=6, callbacks=[probe, SaveCurvatureState(str(tmp_path))])
    trainer.fit(TinyNet(scheduler=None, n=128))
    r0, r1 = (torch.load(tmp_path / f"curv{r}.pt", weights_only=True) for r in (0, 1))
    # each rank probed its own batch; the diagonals and traces are averaged, so the state and the ranks agree
    assert torch.equal(r0["hessian"], r1["hessian"]) and r0["hessian"].abs().sum() > 0
    assert r0["ranks"] == r1["ranks"]
    for name, p in r0["params"].items():
        assert torch.equal(p, r1["params"][name]), name
