"""A module whose configure_optimizers returns torch's Muon (hidden weights) and AdamW (the rest) trains unchanged
under the low-rank strategies: projected Muon, its report against Muon's own state, ``lr-Muon``, layer-wise mode,
DDP with the gradients all-reduced in their subspaces, and Trion under DDP."""

from __future__ import annotations

import sys

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from torch import nn

from lightning_lowrank import LowRankDDPStrategy, LowRankStrategy
from lightning_lowrank.optim import ProjectedOptimizer
from tests.models import QUIET, RecordingLogger, TinyNet
from tests.strategies.test_ddp import HANG, _two_processes


def _hidden(module: nn.Module) -> list[nn.Parameter]:
    return [module.attn.weight, module.mlp.weight]


class MuonNet(TinyNet):
    """The issue's recipe: manual optimization, Muon on the hidden 2-D weights, AdamW on everything else."""

    def __init__(self, **kwargs):
        super().__init__(scheduler=None, **kwargs)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        optimizers = self.optimizers()
        for opt in optimizers:
            opt.zero_grad()
        self.manual_backward(loss)
        for opt in optimizers:
            opt.step()
        return loss

    def configure_optimizers(self):
        hidden = {id(p) for p in _hidden(self)}
        rest = [p for p in self.parameters() if id(p) not in hidden]
        return [torch.optim.Muon(_hidden(self), lr=0.02), torch.optim.AdamW(rest, lr=1e-3)]


class MuonOnlyNet(TinyNet):
    """Automatic optimization with one optimizer: Muon on the hidden weights; the rest is not trained."""

    def configure_optimizers(self):
        return torch.optim.Muon(_hidden(self), lr=0.02, weight_decay=0.05)


def _fit(model, strategy, steps=6, **kwargs):
    trainer = L.Trainer(strategy=strategy, max_steps=steps, **{**QUIET, **kwargs})
    trainer.fit(model)
    return trainer


def test_the_muon_and_adamw_module_trains_projected_with_its_own_baseline_and_lr_names():
    torch.manual_seed(0)
    model, logger = MuonNet(), RecordingLogger()
    start = [p.detach().clone() for p in _hidden(model)]
    trainer = _fit(model, LowRankStrategy(rank=4), logger=logger, callbacks=[LearningRateMonitor()])
    muon, adamw = trainer.optimizers
    assert isinstance(muon, ProjectedOptimizer) and muon.param_groups[0]["rule"] == "muon"
    assert muon.param_groups[0]["momentum"] == 0.95 and muon.param_groups[0]["eps"] == 1e-7  # Muon's, not ours
    for p, before in zip(_hidden(model), start):
        assert muon.is_projected(p) and not torch.equal(p, before)
        assert muon.state[p]["momentum_buffer"].shape[0 if p.shape[0] < p.shape[1] else 1] == 4
    assert {"lr-Muon", "lr-AdamW"} <= set(logger.metrics)
    report = trainer.strategy.memory_report()
    assert report.baseline == "Muon + AdamW"
    # The dense baseline, by hand: Muon keeps one buffer per weight and no step; AdamW two moments and a step.
    rest = [p for p in model.parameters() if all(p is not h for h in _hidden(model))]
    expected = sum(4 * p.numel() for p in _hidden(model)) + sum(8 * p.numel() + 4 for p in rest)
    assert report.baseline_state_bytes == expected


def test_a_muon_whose_weights_all_stay_dense_is_torchs_muon():
    """rank above every weight's smaller side: nothing is projected, no error, and the weights are those of the same
    module trained by plain Lightning (torch's Muon and AdamW), bit for bit."""
    torch.manual_seed(0)
    ours = MuonNet()
    torch.manual_seed(0)
    theirs = MuonNet()
    trainer = _fit(ours, LowRankStrategy(rank=512))
    _fit(theirs, "auto")
    assert not trainer.optimizers[0].projected_params()
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        assert torch.equal(a, b), name


def test_layerwise_muon_matches_the_step_at_the_end():
    models = []
    for layerwise in (False, True):
        torch.manual_seed(0)
        model = MuonOnlyNet(scheduler=None)
        _fit(model, LowRankStrategy(rank=4, update_gap=2, layerwise=layerwise), steps=5)
        models.append(model)
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5, msg=name)
    assert not torch.equal(models[0].attn.weight, MuonOnlyNet().attn.weight)


class SaveParams(Callback):
    def __init__(self, out_dir):
        self.out_dir = out_dir

    def on_train_end(self, trainer, pl_module):
        params = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        params["sent"] = torch.tensor(trainer.optimizers[0].sharded_step_bytes)
        torch.save(params, f"{self.out_dir}/rank{trainer.global_rank}.pt")


@pytest.mark.skipif(sys.platform == "win32", reason="fork start method")
@pytest.mark.parametrize(
    "options, make",
    [(dict(low_rank_comm=True), "muon"), (dict(inner="trion"), "muon"), (dict(low_rank_comm=True), "muon+adamw")],
    ids=["muon", "trion", "the issue's module: Muon + AdamW, manual optimization"],
)
def test_two_process_ddp_ends_with_identical_parameters(tmp_path, options, make):
    """Projected Muon with its gradients all-reduced in their subspaces; Trion with its column choice and
    Newton-Schulz split over the ranks (each layer on one rank, shared), the feedback and update on every rank."""
    torch.manual_seed(0)
    model = MuonOnlyNet(scheduler=None, n=64) if make == "muon" else MuonNet(n=64)
    strategy = LowRankDDPStrategy(rank=4, update_gap=2, start_method="fork", timeout=HANG, **options)
    trainer = _two_processes(strategy, max_steps=4, callbacks=[SaveParams(str(tmp_path))])
    trainer.fit(model)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for name, p in r0.items():
        assert torch.equal(p, r1[name]), name
    torch.manual_seed(0)
    assert not torch.equal(r0["attn.weight"], MuonOnlyNet().attn.weight)
    # Trion splits each step's work over the ranks (layer i on rank i % 2) and shares it; projected Muon shares none
    assert (int(r0["sent"]) > 0) == ("inner" in options)


@pytest.mark.parametrize("inner", [None, "trion"])
def test_a_mid_run_checkpoint_of_the_muon_and_adamw_module_resumes_bit_for_bit(tmp_path, inner):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(max_steps, ckpt_path=None, callbacks=()):
        torch.manual_seed(0)
        model = MuonNet(batch_size=32)  # 2 batches per epoch
        options = dict(rank=4, update_gap=3, memory_report=False, memory_json=False, inner=inner)
        trainer = L.Trainer(
            strategy=LowRankStrategy(**options),
            max_steps=max_steps,
            callbacks=list(callbacks),
            **{**QUIET, "enable_checkpointing": bool(callbacks)},
            default_root_dir=tmp_path,
        )
        trainer.fit(model, ckpt_path=ckpt_path)
        return model

    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1, filename="{step}")
    full = run(8, callbacks=[ckpt])
    resumed = run(8, ckpt_path=str(tmp_path / "step=4.ckpt"))
    for (name, a), b in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    state = torch.load(tmp_path / "step=4.ckpt", weights_only=True)["optimizer_states"][0]["state"]
    assert all("momentum_buffer" in s for s in state.values())


@pytest.mark.parametrize("projector", ["svd", "rsvd", "dct", "random", "gaussian", "online_pca"])
def test_every_projector_trains_muon(projector):
    torch.manual_seed(0)
    model = MuonOnlyNet(scheduler=None)
    before = model.attn.weight.detach().clone()
    trainer = _fit(model, LowRankStrategy(rank=4, update_gap=2, projector=projector), steps=4)
    opt = trainer.optimizers[0]
    assert opt.is_projected(model.attn.weight) and opt.state[model.attn.weight]["momentum_buffer"].shape == (40, 4)
    assert torch.isfinite(model.attn.weight).all() and not torch.equal(model.attn.weight, before)


class MuonHalves(MuonOnlyNet):
    """Rank r trains on rows [8r, 8r + 8) of every batch of 16: DDP then averages the single-device gradient."""

    def __init__(self):
        super().__init__(scheduler=None, batch_size=16, n=64)

    def train_dataloader(self):
        from torch.utils.data import DataLoader, Subset

        from tests.models import token_data

        world = self.trainer.world_size
        rank, half = self.trainer.global_rank, 16 // world
        rows = [b + rank * half + i for b in range(0, self.n, 16) for i in range(half)]
        return DataLoader(Subset(token_data(self.n), rows), batch_size=half, shuffle=False)


@pytest.mark.skipif(sys.platform == "win32", reason="fork start method")
def test_trion_split_over_ranks_equals_one_device(tmp_path):
    """The split (each layer's columns and Newton-Schulz on one rank, shared) changes nothing but rounding."""
    torch.manual_seed(0)
    model = MuonHalves()
    strategy = LowRankDDPStrategy(rank=4, inner="trion", start_method="fork", timeout=HANG)
    callbacks = [SaveParams(str(tmp_path))]
    trainer = _two_processes(strategy, max_steps=4, callbacks=callbacks, use_distributed_sampler=False)
    trainer.fit(model)
    split = torch.load(tmp_path / "rank0.pt", weights_only=True)
    torch.manual_seed(0)
    single = MuonHalves()
    _fit(single, LowRankStrategy(rank=4, inner="trion"), steps=4)
    for name, p in single.named_parameters():
        torch.testing.assert_close(split[name], p.detach(), rtol=0, atol=1e-5, msg=name)
    assert int(split["sent"]) > 0
