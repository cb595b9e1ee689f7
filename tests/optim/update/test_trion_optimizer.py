"""Trion through the optimizer (``inner="trion"`` / ``projected_rule="trion"`` on a torch Muon): each step against
Trion's formulas written out below in float64 (a DCT matrix from its definition, l1 column scores, error feedback,
Newton-Schulz on the chosen coefficients, the shape factor of Muon's ``adjust_lr_fn``), its state (the whole buffer, no
P) and what it refuses. The functions themselves are checked against the reference in tests/parity."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from lightning_lowrank import LowRankStrategy
from lightning_lowrank.optim import ProjectedOptimizer
from tests.models import QUIET
from tests.optim.update.test_muon import newton_schulz64
from tests.strategies.test_muon_strategy import MuonNet


def dct_matrix(d: int) -> torch.Tensor:
    """Q[k, j] = c_k cos(pi k (2j + 1) / (2d)): rows are the orthonormal DCT-II frequencies."""
    k, j = torch.arange(d, dtype=torch.float64)[:, None], torch.arange(d, dtype=torch.float64)[None, :]
    Q = torch.cos(math.pi * k * (2 * j + 1) / (2 * d)) * math.sqrt(2 / d)
    Q[0] /= math.sqrt(2)
    return Q


class TrionReference:
    """The reference's vectors: the rows of Q (DCT-II frequencies), except for matmul scoring of a tall weight, which
    multiplies M @ Q and so uses Q's columns (DCT-III vectors), as ista-daslab-optimizers' trion_update does."""

    def __init__(self, W, rank, lr, wd, mu=0.95, adjust_lr_fn=None, scorer="matmul"):
        self.W, self.rank, self.lr, self.wd, self.mu, self.scorer = W.clone(), rank, lr, wd, mu, scorer
        self.M = torch.zeros_like(W)
        rows, cols = W.shape
        kimi = adjust_lr_fn == "match_rms_adamw"
        self.scale = 0.2 * math.sqrt(max(rows, cols)) if kimi else math.sqrt(max(1.0, rows / cols))

    def step(self, G):
        self.M += G
        rows, cols = self.M.shape
        left = rows < cols  # the smaller side: frequencies over rows
        Q = dct_matrix(min(rows, cols))
        V = Q if self.scorer == "matmul" and not left else Q.T  # the vectors, as columns of V
        coeffs = V.T @ self.M if left else self.M @ V  # (d x n) or (m x d): one row / column per vector
        scores = coeffs.abs().sum(dim=1 if left else 0)
        idx = scores.topk(self.rank).indices
        P = V[:, idx]  # d x r
        low = P.T @ self.M if left else self.M @ P
        self.M -= (1 - self.mu) * (P @ low if left else low @ P.T)
        ortho = newton_schulz64(low)
        update = P @ ortho if left else ortho @ P.T
        self.W = self.W * (1 - self.lr * self.wd) - self.lr * self.scale * update
        return self.W


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.Tanh(), torch.nn.Linear(24, 6)).double()


@pytest.mark.parametrize("scorer", ["matmul", "fft"])
@pytest.mark.parametrize("adjust_lr_fn", [None, "match_rms_adamw"])
def test_each_step_is_trions_formulas(scorer, adjust_lr_fn):
    model = _model()
    hidden = [model[0].weight, model[2].weight]  # 24 x 12 (columns on the right) and 6 x 24 (rows, left)
    base = torch.optim.Muon(hidden, lr=0.02, weight_decay=0.1, adjust_lr_fn=adjust_lr_fn)
    opt = ProjectedOptimizer.from_optimizer(
        base, lambda p: True, rank=3, projected_rule="trion", ns_dtype="float64", dct_scorer=scorer
    )
    kind = "matmul" if scorer == "matmul" else "makhoul"
    refs = [TrionReference(p.detach(), 3, 0.02, 0.1, adjust_lr_fn=adjust_lr_fn, scorer=kind) for p in hidden]
    x = torch.randn(16, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for _ in range(4):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        grads = [p.grad.clone() for p in hidden]
        opt.step()
        for p, ref, g in zip(hidden, refs, grads):
            torch.testing.assert_close(p.detach(), ref.step(g), rtol=0, atol=1e-12)
    for p, ref in zip(hidden, refs):
        state = opt.state[p]
        assert opt.is_projected(p) and opt.projector("dct") is not None
        assert set(state) == {"step", "momentum_buffer"}  # the whole buffer; no P, no indices kept
        torch.testing.assert_close(state["momentum_buffer"], ref.M, rtol=0, atol=1e-12)
        assert not opt.last_refreshes  # Trion never refreshes: it chooses its columns in every update


def test_the_report_claims_no_saving_against_muon():
    torch.manual_seed(0)
    model = MuonNet()
    strategy = LowRankStrategy(rank=4, inner="trion", memory_json=False)
    L.Trainer(strategy=strategy, max_steps=3, **QUIET).fit(model)
    report = strategy.memory_report()
    trion_rows = [layer for layer in report.layers if layer.name in ("attn", "mlp")]
    assert len(trion_rows) == 2
    for layer in trion_rows:  # the buffer is Muon's (m x n, 4 bytes each); only Trion's step counter is extra
        assert layer.state_bytes - layer.baseline_bytes == 4 and layer.projector == "trion"
    assert report.projector_bytes == 24 * 24 * 4  # no P: only the shared 24 x 24 DCT basis of dct_scorer="matmul"


@pytest.mark.parametrize(
    "base, options, match",
    [
        ("adamw", dict(), "needs torch.optim.Muon"),
        ("muon", dict(projector="svd"), "projector='svd'"),
        ("muon", dict(residual="fira"), "residual='fira'"),
        ("muon", dict(side="right"), "side='right'"),
    ],
)
def test_what_trion_cannot_take_is_refused(base, options, match):
    model = _model()
    hidden = [model[0].weight, model[2].weight]
    opt = torch.optim.Muon(hidden) if base == "muon" else torch.optim.AdamW(hidden)
    with pytest.raises(ValueError, match=match):
        ProjectedOptimizer.from_optimizer(opt, lambda p: True, rank=3, projected_rule="trion", **options)


def test_the_strategy_refuses_trion_with_low_rank_comm():
    from lightning_lowrank import LowRankDDPStrategy

    with pytest.raises(ValueError, match="inner='trion'"):
        LowRankDDPStrategy(rank=4, inner="trion", low_rank_comm=True)


def test_layerwise_trion_matches_the_step_at_the_end_and_the_report_does_not_warn(recwarn):
    from tests.strategies.test_muon_strategy import MuonOnlyNet

    models = []
    for layerwise in (False, True):
        torch.manual_seed(0)
        model = MuonOnlyNet(scheduler=None)
        strategy = LowRankStrategy(rank=4, inner="trion", layerwise=layerwise, memory_json=False)
        L.Trainer(strategy=strategy, max_steps=4, **QUIET).fit(model)
        models.append(model)
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5, msg=name)
    assert not [w for w in recwarn if "more optimizer state" in str(w.message) or "holds more" in str(w.message)]
