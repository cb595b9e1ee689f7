"""Layer-wise updates under DDP (two CPU processes, gloo, fork): each gradient is averaged in its own hook."""

import sys

import lightning as L
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_lowrank import LowRankDDPStrategy
from lightning_lowrank.strategies.comm import low_rank_comm_bytes
from tests.models import TinyNet
from tests.optim.test_layerwise import GradProbe
from tests.strategies.test_ddp import HANG, CountRefreshes, _two_processes

RANK, GAP, STEPS, ACCUMULATE = 4, 2, 4, 4
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="fork start method")


class SaveRank(CountRefreshes):
    """Each worker writes, besides the refresh counts, its named parameters, counted bytes and live gradient bytes."""

    def __init__(self, out_dir, tag, probe):
        super().__init__(out_dir)
        self.tag, self.probe = tag, probe

    def on_train_end(self, trainer, pl_module):
        record = self.record(trainer, pl_module)
        record.update(
            named={n: p.detach().clone() for n, p in pl_module.named_parameters()},
            sent=[b.sent for b in trainer.strategy.comm_bytes],
            full=[b.full for b in trainer.strategy.comm_bytes],
            step=trainer.optimizers[0].state[pl_module.attn.weight]["step"].item(),
            live_bytes=self.probe.bytes_per_step,
            wrapped=type(trainer.strategy.model).__name__,
        )
        torch.save(record, f"{self.out_dir}/{self.tag}{trainer.global_rank}.pt")


def _fit(tmp_path, layerwise, **options):
    torch.manual_seed(0)
    tag = f"{'lw' if layerwise else 'ddp'}{len(options)}"
    probe = GradProbe()
    strategy = LowRankDDPStrategy(
        rank=RANK,
        update_gap=GAP,
        layerwise=layerwise,
        start_method="fork",
        timeout=HANG,
        memory_report=False,
        **options,
    )
    # 256 samples / 2 ranks / 8 per batch = 16 micro-batches per rank, 4 per step
    trainer = _two_processes(
        strategy, max_steps=STEPS, accumulate_grad_batches=ACCUMULATE, callbacks=[probe, SaveRank(tmp_path, tag, probe)]
    )
    model = TinyNet(scheduler="step", n=256, batch_size=8)
    trainer.fit(model)
    return model, [torch.load(tmp_path / f"{tag}{r}.pt", weights_only=True) for r in (0, 1)]


@pytest.mark.parametrize("options", [{}, {"projector": "dct"}, {"projector": "rsvd", "residual": "fira"}])
def test_layerwise_ddp_with_accumulation_equals_bucketed_ddp(tmp_path, options):
    _, (ref, _) = _fit(tmp_path, layerwise=False, **options)
    model, (lw0, lw1) = _fit(tmp_path, layerwise=True, **options)
    assert ref["step"] == lw0["step"] == STEPS
    assert ref["wrapped"] == "DistributedDataParallel" and lw0["wrapped"] == "TinyNet"
    for name, p in ref["named"].items():
        assert torch.equal(lw0["named"][name], lw1["named"][name]), name  # ranks agree bit for bit
        torch.testing.assert_close(lw0["named"][name], p, atol=1e-5, rtol=0, msg=name)
    for a, b in zip(lw0["P"], lw1["P"]):
        assert torch.equal(a, b)
    torch.manual_seed(0)
    start = TinyNet(scheduler="step", n=256, batch_size=8)
    assert not torch.allclose(lw0["named"]["attn.weight"], start.attn.weight)  # it trained
    # Live gradient bytes per step: the bucketed path holds every gradient at the end of backward. Layer-wise, a
    # projected layer holds its full gradient only in a window where it refreshes (steps 0 and 2), or always with
    # fira (which reads the full gradient); dense parameters accumulate theirs in full as usual.
    total = 4 * sum(p.numel() for p in model.parameters())
    assert ref["live_bytes"] == [total] * STEPS
    projected = 4 * (model.attn.weight.numel() + model.mlp.weight.numel())
    lean = total if "residual" in options else total - projected
    for r in (lw0, lw1):
        assert r["live_bytes"] == [total, lean, total, lean]


def test_layerwise_ddp_sends_projected_gradients_and_shards_refreshes(tmp_path):
    model, (r0, r1) = _fit(tmp_path, layerwise=True)
    # From the shapes: a projected layer goes in its subspace except at its refreshes (steps 0 and 2 with
    # update_gap=2, step 0 having no subspace yet), every other parameter in full.
    projected = {"attn.weight", "mlp.weight"}
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    full = low_rank_comm_bytes((s, None) for s in shapes.values())
    low = low_rank_comm_bytes((s, RANK if n in projected else None) for n, s in shapes.items())
    assert full - low == 4 * ((40 * 24 - 40 * RANK) + (24 * 40 - RANK * 40))  # attn (40, 24): m x r; mlp: r x n
    for r in (r0, r1):
        assert r["sent"] == [full if step % GAP == 0 else low for step in range(STEPS)]
        assert r["full"] == [full] * STEPS
    # Two projected layers refresh at steps 0 and 2: each rank computes one of them each time, the other arrives.
    assert r0["total"] == r1["total"] == 4
    assert r0["here"] == r1["here"] == 2


def test_layerwise_ddp_refuses_options_that_would_do_nothing():
    with pytest.raises(ValueError, match="already all-reduces each projected gradient.*Drop low_rank_comm"):
        LowRankDDPStrategy(rank=4, layerwise=True, low_rank_comm=True)
    with pytest.raises(ValueError, match=r"\['find_unused_parameters'\] would do nothing"):
        LowRankDDPStrategy(rank=4, layerwise=True, find_unused_parameters=True)
    with pytest.raises(ValueError, match="ddp_comm_hook would never run"):
        LowRankDDPStrategy(rank=4, layerwise=True, ddp_comm_hook=lambda state, bucket: None)
    LowRankDDPStrategy(rank=4, layerwise=True, broadcast_buffers=False)  # the one DDP option that applies


class UsesExtraOnRankOne(TinyNet):
    """A layer only rank 1 uses: the ranks' hooks differ, which layer-wise DDP must report, not deadlock on."""

    def __init__(self):
        super().__init__(n=64, batch_size=8)
        self.extra = torch.nn.Linear(24, 32)

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self(x)
        if self.global_rank == 1:
            out = out + self.extra(self.embed(x))
        return torch.nn.functional.cross_entropy(out, y)


def test_layerwise_ddp_reports_parameters_used_on_one_rank_only():
    strategy = LowRankDDPStrategy(rank=4, layerwise=True, start_method="fork", timeout=HANG, memory_report=False)
    with pytest.raises(Exception, match="ranks gave gradients to different parameters"):
        _two_processes(strategy, max_steps=2).fit(UsesExtraOnRankOne())


def test_layerwise_ddp_resumes_bit_for_bit_from_a_step_boundary_checkpoint(tmp_path):
    def run(tag, ckpt_path=None, callbacks=()):
        torch.manual_seed(0)
        strategy = LowRankDDPStrategy(
            rank=RANK, update_gap=GAP, layerwise=True, start_method="fork", timeout=HANG, memory_report=False
        )
        trainer = L.Trainer(
            strategy=strategy,
            accelerator="cpu",
            devices=2,
            max_steps=2 * STEPS,  # 4 steps per epoch: the checkpoint at step 4 is an epoch boundary
            accumulate_grad_batches=ACCUMULATE,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp_path / tag,
            callbacks=[*callbacks, SaveRank(tmp_path, tag, GradProbe())],
        )
        trainer.fit(TinyNet(scheduler="step", n=256, batch_size=8), ckpt_path=ckpt_path)
        return [torch.load(tmp_path / f"{tag}{r}.pt", weights_only=True) for r in (0, 1)]

    every = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=STEPS, save_top_k=-1, filename="{step}")
    full0, _ = run("full", callbacks=[every])
    resumed0, resumed1 = run("resumed", ckpt_path=str(tmp_path / "ckpt" / f"step={STEPS}.ckpt"))
    assert full0["step"] == resumed0["step"] == 2 * STEPS
    for name, p in full0["named"].items():
        assert torch.equal(resumed0["named"][name], p), name
        assert torch.equal(resumed1["named"][name], p), name
    for a, b in zip(full0["P"], resumed0["P"]):
        assert torch.equal(a, b)


NONCONTIGUOUS: list[str] = []  # collectives a worker called on a non-contiguous tensor (each fork has its own list)


class TransposedNet(TinyNet):
    """Two weights laid out transposed (so are their gradients) and a transposed buffer that differs per rank until
    the strategy broadcasts rank 0's: tensors NCCL refuses to communicate as they are."""

    def __init__(self):
        super().__init__(scheduler=None, n=64, batch_size=8)
        for layer in (self.attn, self.lm_head):  # attn is projected (sent in full at its refreshes), lm_head dense
            layer.weight = torch.nn.Parameter(layer.weight.detach().t().contiguous().t())
        self.register_buffer("table", torch.arange(12.0).view(3, 4).t())
        self.seen = []

    def on_fit_start(self):
        self.table.mul_(self.global_rank + 1)

    def forward(self, x):
        return super().forward(x) + 1e-3 * self.table.mean()

    def training_step(self, batch, batch_idx):
        self.seen.append(self.table.clone())  # after the strategy's broadcast of the buffers
        return super().training_step(batch, batch_idx)


def _recording(name, collective):
    """``collective`` that also notes each non-contiguous tensor it is given (gloo takes them, NCCL does not)."""

    def record(tensor, *args, **kwargs):
        if not tensor.is_contiguous():
            NONCONTIGUOUS.append(f"{name} {tuple(tensor.shape)}")
        return collective(tensor, *args, **kwargs)

    return record


class SaveCollectives(Callback):
    def __init__(self, out_dir):
        self.out_dir = out_dir

    def on_train_end(self, trainer, pl_module):
        record = {"noncontiguous": NONCONTIGUOUS, "seen": pl_module.seen}
        record["named"] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        torch.save(record, f"{self.out_dir}/nc{trainer.global_rank}.pt")


def test_layerwise_ddp_communicates_non_contiguous_buffers_and_gradients_through_contiguous_copies(
    tmp_path, monkeypatch
):
    for name in ("broadcast", "all_reduce"):  # inherited by the forked workers
        monkeypatch.setattr(dist, name, _recording(name, getattr(dist, name)))
    torch.manual_seed(0)
    model = TransposedNet()
    assert not any(t.is_contiguous() for t in (model.attn.weight, model.lm_head.weight, model.table))
    strategy = LowRankDDPStrategy(
        rank=RANK, update_gap=GAP, layerwise=True, start_method="fork", timeout=HANG, memory_report=False
    )
    _two_processes(strategy, max_steps=3, callbacks=[SaveCollectives(tmp_path)]).fit(model)
    r0, r1 = (torch.load(tmp_path / f"nc{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["noncontiguous"] == [] and r1["noncontiguous"] == []
    rank0_table = torch.arange(12.0).view(3, 4).t()
    assert len(r1["seen"]) == 3 and all(torch.equal(t, rank0_table) for t in r0["seen"] + r1["seen"])
    for name, p in r0["named"].items():
        assert torch.equal(p, r1["named"][name]), name  # the averaged gradients were written back on every rank
    torch.manual_seed(0)
    assert not torch.equal(r0["named"]["attn.weight"], TransposedNet().attn.weight)  # it trained
