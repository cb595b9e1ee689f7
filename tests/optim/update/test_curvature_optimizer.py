"""Curvature used by the optimizer through the Trainer: lazy Hessians fed by the probe, ranks under a budget."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.func import functional_call

from lightning_lowrank import CurvatureProbe, LowRankStrategy
from tests.models import QUIET, TinyNet, token_data


def test_the_probe_feeds_the_exact_subspace_diagonal_to_a_lazy_hessian_optimizer():
    torch.manual_seed(0)
    model = TinyNet(scheduler=None)
    # One projected layer: with several, one joint probe adds the cross-layer Hessian blocks to each layer's variance.
    strategy = LowRankStrategy(
        rank=4, preconditioner="lazy_hessian", hessian_beta=0.0, target_modules=("attn",), memory_report=False
    )
    samples = 3000
    probe = CurvatureProbe(every=1, estimators=("diagonal", "subspace_diagonal"), samples=samples)
    L.Trainer(strategy=strategy, max_steps=1, callbacks=[probe], **QUIET).fit(model)
    opt = strategy.optimizers[0]
    W = model.attn.weight  # 40 x 24: P acts on the right, W = Z P^T with Z (40 x 4)
    P = opt.projection_matrix(W).detach()
    x, y = token_data(64).tensors[0][:16], token_data(64).tensors[1][:16]  # the first batch (no shuffling)
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss_of(w):
        return nn.functional.cross_entropy(functional_call(model, {**params, "attn.weight": w}, (x,)), y)

    H = torch.autograd.functional.hessian(loss_of, W.detach()).reshape(W.numel(), W.numel())
    J = torch.kron(torch.eye(40), P)  # d vec(W) / d vec(Z), row-major
    HZ = J.T @ H @ J  # the Hessian in the subspace coordinates
    exact = torch.diagonal(HZ).reshape(40, 4)
    # Rademacher Hutchinson: entry i has variance (sum_j HZ_ij^2 - HZ_ii^2) / samples
    sd = ((HZ.pow(2).sum() - HZ.diagonal().pow(2).sum()) / samples).sqrt()
    assert 3 * sd < 0.2 * torch.linalg.norm(exact)  # the premise: the tolerance below is tight
    assert torch.linalg.norm(opt.state[W]["hessian"] - exact) < 3 * sd
    assert probe.diagonal["attn.weight"].shape == W.shape  # the full diagonal is kept too


def test_lazy_hessian_without_a_diagonal_probe_is_refused_before_the_first_step():
    strategy = LowRankStrategy(rank=4, preconditioner="lazy_hessian")
    trainer = L.Trainer(strategy=strategy, max_steps=1, callbacks=[CurvatureProbe(every=1)], **QUIET)
    with pytest.raises(ValueError, match=r"estimators=\('subspace_diagonal',\)"):
        trainer.fit(TinyNet())


class TwinLayers(L.LightningModule):
    """Two identical 16 x 32 layers; the first sees its input 8x larger, so its Hessian (and trace) is ~64x larger."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(32, 16), nn.Linear(32, 16)
        self.head = nn.Linear(16, 4)
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(256, 32, generator=g), torch.randint(0, 4, (256,), generator=g)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.head(self.a(8 * x) + self.b(x)), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(self.x, self.y), batch_size=64)


class StateBytes(Callback):
    def __init__(self):
        self.bytes, self.ranks = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.bytes.append(trainer.strategy.memory_report().optimizer_state_bytes)
        opt = trainer.strategy.optimizers[0]
        self.ranks.append((opt.layer_rank(pl_module.a.weight), opt.layer_rank(pl_module.b.weight)))


def test_a_budget_moves_rank_to_the_high_curvature_layer_and_is_never_exceeded():
    torch.manual_seed(0)
    model, record = TwinLayers(), StateBytes()
    # dense part (biases, head) 816 bytes of AdamW state; each 16 x 32 layer 64 bytes of scalars + 320 per rank:
    # room for 10 ranks in all
    budget = 4200
    strategy = LowRankStrategy(rank=15, update_gap=4, memory_budget=budget, memory_report=False)
    probe = CurvatureProbe(every=2, estimators=("trace",), samples=64)
    L.Trainer(strategy=strategy, max_steps=12, callbacks=[probe, record], **QUIET).fit(model)
    assert max(record.bytes) <= budget
    assert record.bytes[-1] > 0.9 * budget  # and the budget is used, not wasted
    ra, rb = record.ranks[-1]
    assert ra > 2 * rb, record.ranks
    traces = probe.history[-1]
    assert traces["trace/a.weight"] > 10 * traces["trace/b.weight"]  # the premise of the construction
    report = strategy.memory_report()
    assert report.memory_budget == budget and report.budget_used_percent <= 100
    assert {layer.name: layer.rank for layer in report.layers} == {"a": ra, "b": rb}
    assert report.as_metrics(layers=True)["lowrank/rank/a"] == ra  # per layer: with the strategy's log_layers


def test_curvature_driven_training_resumes_bit_for_bit(tmp_path):
    def run(max_steps, ckpt_path=None, checkpoint=None):
        torch.manual_seed(0)
        model = TwinLayers()
        strategy = LowRankStrategy(
            rank=15, update_gap=3, memory_budget=4200, preconditioner="lazy_hessian", memory_report=False,
        )  # fmt: skip
        callbacks = [
            CurvatureProbe(every=2, estimators=("trace", "diagonal", "subspace_diagonal"), samples=2, diagonal_beta=0.9)
        ]
        trainer = L.Trainer(
            strategy=strategy,
            max_steps=max_steps,
            callbacks=callbacks + ([checkpoint] if checkpoint else []),
            **{**QUIET, "enable_checkpointing": checkpoint is not None, "default_root_dir": tmp_path},
        )
        trainer.fit(model, ckpt_path=ckpt_path)
        return model, callbacks[0]

    # step 4 ends an epoch (4 batches): the refresh (every 3 updates), the probe (every 2) and the rank
    # reallocation all fall on different steps around it
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1, filename="{step}")
    full, full_probe = run(10, checkpoint=ckpt)
    resumed, resumed_probe = run(10, ckpt_path=str(tmp_path / "step=4.ckpt"))
    for (name, a), b in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    assert torch.equal(full_probe.diagonal["a.weight"], resumed_probe.diagonal["a.weight"])


def test_two_projected_optimizers_cannot_share_one_budget():
    class TwoOptimizers(TwinLayers):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False  # Lightning's rule for several optimizers

        def configure_optimizers(self):
            return [torch.optim.AdamW(self.a.parameters()), torch.optim.AdamW(self.b.parameters())]

    trainer = L.Trainer(strategy=LowRankStrategy(rank=4, memory_budget=10**6), max_steps=1, **QUIET)
    with pytest.raises(ValueError, match="one budget for one optimizer"):
        trainer.fit(TwoOptimizers())
