"""low_rank_comm=True: projected gradients are all-reduced in their subspace (two CPU processes, gloo, fork)."""

import sys

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_lowrank import LowRankDDPStrategy, SubspaceRefresh
from lightning_lowrank.optim import ProjectedOptimizer
from lightning_lowrank.strategies.comm import check_optimizers, low_rank_comm_bytes
from tests.models import TinyNet
from tests.strategies.test_ddp import HANG, _two_processes

RANK, GAP, STEPS = 4, 2, 6


class SaveParamsAndBytes(Callback):
    def __init__(self, out_dir, tag):
        self.out_dir, self.tag = out_dir, tag

    def on_train_end(self, trainer, pl_module):
        state = {
            "params": {n: p.detach().clone() for n, p in pl_module.named_parameters()},
            "sent": [b.sent for b in trainer.strategy.comm_bytes],
            "full": [b.full for b in trainer.strategy.comm_bytes],
            "step": trainer.optimizers[0].state[pl_module.attn.weight]["step"].item(),
        }
        torch.save(state, f"{self.out_dir}/{self.tag}{trainer.global_rank}.pt")


def _fit(tmp_path, low_rank_comm, callbacks=()):
    torch.manual_seed(0)
    tag = ("low" if low_rank_comm else "full") + str(len(callbacks))
    strategy = LowRankDDPStrategy(
        rank=RANK, update_gap=GAP, low_rank_comm=low_rank_comm, start_method="fork", timeout=HANG, memory_report=False
    )
    # 256 samples / 2 ranks / 16 per batch = 8 batches, 2 accumulated: DDP communicates on every second one only
    trainer = _two_processes(
        strategy,
        max_steps=STEPS,
        accumulate_grad_batches=2,
        callbacks=[*callbacks, SaveParamsAndBytes(str(tmp_path), tag)],
    )
    model = TinyNet(scheduler="step", n=256)
    trainer.fit(model)
    return model, [torch.load(tmp_path / f"{tag}{r}.pt", weights_only=True) for r in (0, 1)]


@pytest.mark.skipif(sys.platform == "win32", reason="fork start method")
def test_low_rank_comm_matches_full_all_reduce_and_sends_fewer_bytes(tmp_path):
    model, (full0, full1) = _fit(tmp_path, low_rank_comm=False)
    _, (low0, low1) = _fit(tmp_path, low_rank_comm=True)
    assert full0["step"] == low0["step"] == STEPS  # refreshes at steps 0, 2, 4
    for name, p in full0["params"].items():
        assert torch.equal(low0["params"][name], low1["params"][name]), name  # ranks agree bit for bit
        torch.testing.assert_close(low0["params"][name], p, atol=1e-5, rtol=0, msg=name)
    assert full0["sent"] == []  # no hook, nothing counted

    # What the counter must read, from the parameter shapes: a projected layer goes in its subspace except at its
    # refreshes (steps 0, 2, 4 with update_gap=2; step 0 has no subspace yet), everything else in full.
    projected = {"attn.weight", "mlp.weight"}
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    full = low_rank_comm_bytes((s, None) for s in shapes.values())
    low = low_rank_comm_bytes((s, RANK if n in projected else None) for n, s in shapes.items())
    assert full == 4 * sum(p.numel() for p in model.parameters())
    assert full - low == 4 * ((40 * 24 - 40 * RANK) + (24 * 40 - RANK * 40))  # attn (40, 24): m x r; mlp: r x n
    expected = [full if step % GAP == 0 else low for step in range(STEPS)]
    for r in (low0, low1):
        assert r["sent"] == expected
        assert r["full"] == [full] * STEPS


@pytest.mark.skipif(sys.platform == "win32", reason="fork start method")
def test_low_rank_comm_follows_a_subspace_refresh_schedule(tmp_path):
    # SubspaceRefresh requests refreshes at batch start, before backward: the hook sends those layers in full.
    _, (full0, _) = _fit(tmp_path, low_rank_comm=False, callbacks=[SubspaceRefresh(every=3)])
    _, (low0, low1) = _fit(tmp_path, low_rank_comm=True, callbacks=[SubspaceRefresh(every=3)])
    for name, p in full0["params"].items():
        assert torch.equal(low0["params"][name], low1["params"][name]), name
        torch.testing.assert_close(low0["params"][name], p, atol=1e-5, rtol=0, msg=name)
    full = low0["full"][0]
    assert [sent == full for sent in low0["sent"]] == [True, False, False, True, False, False]


def test_low_rank_comm_refuses_options_that_need_the_full_gradient():
    for option in (dict(residual="fira"), dict(residual="frugal"), dict(inner="subset_norm")):
        key, value = next(iter(option.items()))
        with pytest.raises(ValueError, match=f"low_rank_comm=True.*{key}={value!r}"):
            LowRankDDPStrategy(rank=4, low_rank_comm=True, **option)
        LowRankDDPStrategy(rank=4, **option)  # fine with the full all-reduce
    with pytest.raises(ValueError, match="projector='online_pca'"):
        LowRankDDPStrategy(rank=4, projector="online_pca", low_rank_comm=True)
    with pytest.raises(ValueError, match="projector_bits=8"):
        LowRankDDPStrategy(rank=4, projector_bits=8, low_rank_comm=True)
    with pytest.raises(ValueError, match="projector='gaussian'.*not orthonormal"):  # APOLLO's P
        LowRankDDPStrategy(rank=4, projector="gaussian", low_rank_comm=True)
    with pytest.raises(ValueError, match="drop ddp_comm_hook"):
        LowRankDDPStrategy(rank=4, low_rank_comm=True, ddp_comm_hook=lambda state, bucket: None)


def test_low_rank_comm_checks_param_groups_of_a_projected_optimizer():
    w, v = torch.nn.Parameter(torch.zeros(8, 8)), torch.nn.Parameter(torch.zeros(8, 8))
    ok = ProjectedOptimizer([{"params": [w]}, {"params": [v], "rank": None, "residual": "apollo"}], rank=2)
    check_optimizers([ok])  # the dense group's residual never runs
    bad = ProjectedOptimizer([{"params": [w]}, {"params": [v], "residual": "apollo"}], rank=2)
    with pytest.raises(ValueError, match="residual='apollo' \\(in a param group"):
        check_optimizers([bad])
