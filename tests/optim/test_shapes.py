"""Every inner rule and every residual on tall, wide and square weights, with refreshes inside the run.

The references are written here as plain dense math in float64 on R = P^T G (P on the left, m < n) or R = G P (on the
right, m >= n, square included), mapped back, with the moments carried across each refresh by hand (keep, reset,
rotate). They read only P from the optimizer (the projector is tested elsewhere); the rule, the side, the moment
policy and the step counter are the test's own.
"""

import math
import warnings

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lowrank import LowRankStrategy, ProjectedOptimizer
from lightning_lowrank.memory import account_memory, plan
from lightning_lowrank.optim.projection.bases import projected_shape
from lightning_lowrank.optim.state import storage
from lightning_lowrank.optim.update import rules
from tests.models import QUIET

SHAPES = {"tall": (24, 16), "wide": (16, 24), "square": (16, 16)}
POLICIES = ("keep", "reset", "rotate")
RANK, GAP, STEPS, EVERY = 4, 4, 13, 3  # refreshes before updates 1, 5, 9 and 13; curvature probes every 3 steps
LR, WD, BETAS, EPS = 0.02, 0.1, (0.9, 0.99), 1e-8


def _problem(shape):
    g = torch.Generator().manual_seed(sum(shape))
    A = torch.rand(shape, generator=g, dtype=torch.float64) + 0.5
    T = torch.randn(shape, generator=g, dtype=torch.float64)
    W0 = torch.randn(shape, generator=g, dtype=torch.float64)
    noise = [torch.randn(shape, generator=g, dtype=torch.float64) * 0.3 for _ in range(STEPS)]
    return A, T, W0, noise


def _grad(W, t, problem):
    """A quadratic's gradient plus a fixed noise sequence (so the subspace moves between refreshes)."""
    A, T, _, noise = problem
    return A * (W - T) + noise[t - 1]


def _curvature(t, shape):
    """A positive curvature diagonal in P's coordinates, fed at probe t (shaped like R)."""
    g = torch.Generator().manual_seed(1000 + t)
    return torch.rand(projected_shape(shape, RANK), generator=g, dtype=torch.float64) + 0.2


def _build(kind, W, policy, **extra):
    """The optimizer as the strategy builds it: from the torch optimizer, with the options of the strategy."""
    base = {
        "adamw": lambda: torch.optim.AdamW([W], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD),
        "adam": lambda: torch.optim.Adam([W], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD),
        "sgd": lambda: torch.optim.SGD([W], lr=LR, momentum=0.9, weight_decay=WD),
        "adafactor": lambda: torch.optim.Adafactor([W], lr=LR, weight_decay=WD),
        "subset_norm": lambda: torch.optim.AdamW([W], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD),
        "sophia": lambda: torch.optim.AdamW([W], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD),
    }[kind]()
    options = dict(rank=RANK, update_gap=GAP, moments=policy, **extra)
    if kind == "subset_norm":
        options["projected_rule"] = "subset_norm"
    if kind == "sophia":
        options.update(preconditioner="lazy_hessian", rho=0.5, hessian_beta=0.8)
    if kind == "adafactor":
        options.setdefault("projector", "random")  # an SVD P costs more than dense Adafactor: it would stay dense
    return ProjectedOptimizer.from_optimizer(base, {W}, **options)


def _run(kind, shape, policy, **extra):
    """Train W; returns it (the parameter), the optimizer, the P each update used and the curvature fed."""
    problem = _problem(shape)
    W = torch.nn.Parameter(problem[2].clone())
    opt = _build(kind, W, policy, **extra)
    Ps, fed = [], {}
    for t in range(1, STEPS + 1):
        W.grad = _grad(W.detach(), t, problem)
        opt.step()
        assert opt.is_projected(W)
        Ps.append(opt.projection_matrix(W).clone())  # the refresh runs before the update: this P made step t
        if kind == "sophia" and t % EVERY == 0:
            fed[t] = _curvature(t, shape)
            opt.update_curvature({W: fed[t]})
    return W, opt, Ps, fed


# -- the references ------------------------------------------------------------------------------------------------


def _reference(kind, shape, policy, Ps, fed, residual="none"):
    problem = _problem(shape)
    W = problem[2].clone()
    left = shape[0] < shape[1]  # square goes right
    proj = (lambda X, P: P.T @ X) if left else (lambda X, P: X @ P)
    back = (lambda Y, P: P @ Y) if left else (lambda Y, P: Y @ P.T)
    rshape = (RANK, shape[1]) if left else (shape[0], RANK)
    zeros = lambda *s: torch.zeros(s, dtype=torch.float64)  # noqa: E731
    # Each buffer: (tensor, has a rank axis, is a first moment). Adafactor's rank axis is on row_var on the left
    # (R is r x n) and on col_var on the right (R is m x r); Subset-Norm's accumulator is per kept channel.
    if kind in ("adamw", "adam"):
        buf = {"m": [zeros(*rshape), True, True], "v": [zeros(*rshape), True, False]}
    elif kind == "sgd":
        buf = {"b": [zeros(*rshape), True, True]}
    elif kind == "adafactor":
        buf = {"row": [zeros(rshape[0], 1), left, False], "col": [zeros(1, rshape[1]), not left, False]}
    elif kind == "subset_norm":
        acc = zeros(1, shape[1]) if left else zeros(shape[0], 1)
        buf = {"m": [zeros(*rshape), True, True], "acc": [acc, False, False]}
    else:  # sophia
        buf = {"m": [zeros(*rshape), True, True], "h": [zeros(*rshape), True, False]}
    probes = 0
    for t in range(1, STEPS + 1):
        P = Ps[t - 1]
        if t > 1 and (t - 1) % GAP == 0:  # a refresh before this update: carry the buffers into the new basis
            Rot = Ps[t - 2].T @ P
            for entry in buf.values():
                x, rank_axis, first = entry
                if policy == "reset":
                    entry[0] = torch.zeros_like(x)
                elif policy == "rotate" and rank_axis:
                    M = Rot if first else Rot**2
                    entry[0] = M.T @ x if left else x @ M
            if policy == "reset":
                probes = 0
        G = _grad(W, t, problem)
        b1, b2 = BETAS
        if kind in ("adamw", "adam"):
            g = G + WD * W if kind == "adam" else G
            if kind == "adamw":
                W = W * (1 - LR * WD)
            R = proj(g, P)
            buf["m"][0] = b1 * buf["m"][0] + (1 - b1) * R
            buf["v"][0] = b2 * buf["v"][0] + (1 - b2) * R * R
            D = buf["m"][0] / (buf["v"][0].sqrt() / math.sqrt(1 - b2**t) + EPS)
            W = W - LR / (1 - b1**t) * back(D, P)
            if residual == "frugal":
                W = W - LR * torch.sign(g - back(R, P))
        elif kind == "sgd":
            R = proj(G + WD * W, P)
            buf["b"][0] = R.clone() if t == 1 else 0.9 * buf["b"][0] + R
            W = W - LR * back(buf["b"][0], P)
        elif kind == "adafactor":
            rms = W.norm().item() / math.sqrt(W.numel())
            W = W * (1 - LR * WD)
            R = proj(G, P)
            w = t**-0.8
            row, col = buf["row"][0], buf["col"][0]
            row = row + w * ((R * R).mean(dim=1, keepdim=True) - row)
            col = col + w * ((R * R).mean(dim=0, keepdim=True) - col)
            buf["row"][0], buf["col"][0] = row, col
            eps1 = torch.finfo(torch.float64).eps
            var = (row @ col / row.mean().clamp(min=eps1)).clamp(min=eps1 * eps1)
            U = R / var.sqrt()
            alpha = max(1e-3, rms) * min(LR, 1 / math.sqrt(t))
            denom = max(1.0, U.norm().item() / math.sqrt(U.numel()))
            W = W - alpha / denom * back(U, P)
        elif kind == "subset_norm":
            W = W * (1 - LR * WD)
            R = proj(G, P)
            buf["m"][0] = R.clone() if t == 1 else b1 * buf["m"][0] + (1 - b1) * R
            buf["acc"][0] = buf["acc"][0] + (G * G).sum(dim=0 if left else 1, keepdim=True)
            s = 1 / (buf["acc"][0].sqrt() + EPS)
            W = W - LR * (back(buf["m"][0] * s, P) + (G - back(R, P)) * s)
        else:  # sophia: clip(m / max(rho h, eps), 1) with h the bias-corrected EMA of the fed diagonals
            W = W * (1 - LR * WD)
            R = proj(G, P)
            buf["m"][0] = b1 * buf["m"][0] + (1 - b1) * R
            D = (buf["m"][0] / (0.5 * buf["h"][0]).clamp(min=EPS)).clamp(-1, 1)
            W = W - LR * back(D, P)
            if t in fed:
                probes += 1
                buf["h"][0] = buf["h"][0] + (fed[t] - buf["h"][0]) * (1 - 0.8) / (1 - 0.8**probes)
    return W


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("kind", ["adamw", "adam", "sgd", "adafactor", "subset_norm", "sophia"])
def test_every_inner_rule_on_every_orientation_matches_dense_math(kind, shape, policy):
    W, opt, Ps, fed = _run(kind, shape, policy)
    assert torch.isfinite(W).all()
    assert not torch.allclose(W, _problem(shape)[2])
    assert not torch.allclose(Ps[0], Ps[GAP])  # the refreshes did move the basis
    torch.testing.assert_close(W.detach(), _reference(kind, shape, policy, Ps, fed), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("policy", POLICIES)
def test_frugal_residual_matches_dense_math(shape, policy):
    W, _, Ps, fed = _run("adamw", shape, policy, residual="frugal")
    W = W.detach()
    torch.testing.assert_close(W, _reference("adamw", shape, policy, Ps, fed, residual="frugal"), rtol=1e-9, atol=1e-11)
    assert not torch.allclose(W, _reference("adamw", shape, policy, Ps, fed), atol=1e-4)


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("residual", ["none", "frugal", "fira", "apollo"])
@pytest.mark.parametrize("inner", ["adamw", "adafactor"])
def test_every_residual_runs_on_every_orientation(inner, residual, shape):
    W, opt, _, _ = _run(inner, shape, "keep", residual=residual)  # APOLLO's projector does not rotate
    assert torch.isfinite(W).all()
    assert not torch.allclose(W, _problem(shape)[2])
    state, rshape = opt.state[W], projected_shape(shape, RANK)
    if inner == "adamw":
        assert state["exp_avg"].shape == rshape and state["exp_avg_sq"].shape == rshape
    else:
        assert state["row_var"].shape == (rshape[0], 1) and state["col_var"].shape == (1, rshape[1])
    if residual in ("fira", "apollo"):
        assert state["residual_norm"].shape == () and torch.isfinite(state["residual_norm"])


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("kind", ["adafactor", "subset_norm", "adamw"])
def test_8bit_state_keeps_its_shapes_across_refreshes(kind, shape, policy, monkeypatch):
    monkeypatch.setattr(storage, "MIN_QUANTIZED_NUMEL", 0)  # tiny tensors: quantize them anyway (see storage.py)
    W, opt, _, _ = _run(kind, shape, policy, state_bits=8, state_block_size=16)
    assert torch.isfinite(W).all()
    rshape = projected_shape(shape, RANK)
    expected = {
        "adafactor": {"row_var": (rshape[0], 1), "col_var": (1, rshape[1])},
        "subset_norm": {"exp_avg": rshape, "sum_sq": (1, shape[1]) if shape[0] < shape[1] else (shape[0], 1)},
        "adamw": {"exp_avg": rshape, "exp_avg_sq": rshape},
    }[kind]
    for key, want in expected.items():
        assert tuple(opt.state[W][f"{key}_shape"].tolist()) == want


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("kind", ["adafactor", "subset_norm"])
def test_rank_changes_under_memory_budget_resize_the_right_axis(kind, policy):
    """Three layers (tall, wide, square) whose gradient energy trades places: the budget moves rank between them at
    the refreshes, and every buffer keeps the shape of the layer's current rank."""
    torch.manual_seed(0)
    Ws = [torch.nn.Parameter(torch.randn(*s, dtype=torch.float64)) for s in SHAPES.values()]
    base = torch.optim.Adafactor(Ws, lr=LR) if kind == "adafactor" else torch.optim.AdamW(Ws, lr=LR)
    options = dict(rank=8, update_gap=3, moments=policy, projector="random", rank_by="residual")
    if kind == "subset_norm":
        options["projected_rule"] = "subset_norm"
    probe = ProjectedOptimizer.from_optimizer(
        torch.optim.Adafactor([torch.nn.Parameter(w.detach().clone()) for w in Ws], lr=LR)
        if kind == "adafactor"
        else torch.optim.AdamW([torch.nn.Parameter(w.detach().clone()) for w in Ws], lr=LR),
        lambda p: True,
        **options,
    )
    other, costs = probe.budget_bytes()
    budget = other + sum(c.bytes(4) for c in costs.values())
    opt = ProjectedOptimizer.from_optimizer(base, set(Ws), memory_budget=budget, **options)
    assert all(opt.is_projected(w) for w in Ws)
    ranks = set()
    for t in range(1, 13):
        for i, w in enumerate(Ws):
            loud = (i == (t - 1) // 3 % 3) * 50 + 1  # one layer at a time carries most of the gradient
            w.grad = torch.randn(w.shape, dtype=torch.float64) * loud
        opt.step()
        for w in Ws:
            r = opt.layer_rank(w)
            ranks.add((id(w), r))
            rshape = projected_shape(w.shape, r)
            state = opt.state[w]
            if kind == "adafactor":
                assert state["row_var"].shape == (rshape[0], 1) and state["col_var"].shape == (1, rshape[1])
            else:
                assert state["exp_avg"].shape == rshape
            assert torch.isfinite(w).all()
    assert len(ranks) > len(Ws)  # some layer's rank changed


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_subset_axis_follows_the_projection_side(shape):
    """Subsets are the channels the projection keeps: columns when P acts on the left, rows otherwise (square too),
    for the full shape and the projected shape alike; the dense use (no full gradient passed) agrees with itself."""
    left = shape[0] < shape[1]
    assert rules.subset_axis(shape) == (0 if left else 1)
    assert rules.subset_axis(projected_shape(shape, RANK)) == rules.subset_axis(shape)
    assert rules.subset_axis(projected_shape(shape, min(shape))) == rules.subset_axis(shape)  # full rank, square too
    G = torch.randn(shape, dtype=torch.float64)
    state = rules.init_state("subset_norm", shape, torch.float64, torch.device("cpu"))
    group = {"lr": 0.1, "betas": (0.9, 0.99), "eps": 1e-8}
    direction, _ = rules.direction("subset_norm", G, state, 1, group)
    acc = (G * G).sum(dim=0 if left else 1, keepdim=True)
    torch.testing.assert_close(direction, G / (acc.sqrt() + 1e-8))


# -- Adafactor through the Trainer, and the memory it reports ------------------------------------------------------


class ThreeShapes(L.LightningModule):
    """A tall, a wide and a square weight, trained with torch's Adafactor (all defaults)."""

    def __init__(self):
        super().__init__()
        self.tall = nn.Linear(16, 48)  # weight 48 x 16: smaller side 16
        self.wide = nn.Linear(48, 32)  # weight 32 x 48: smaller side 32
        self.square = nn.Linear(32, 32)  # weight 32 x 32

    def forward(self, x):
        return self.square(torch.tanh(self.wide(torch.tanh(self.tall(x)))))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adafactor(self.parameters())

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        return DataLoader(TensorDataset(torch.randn(64, 16, generator=g), torch.randn(64, 32, generator=g)), 8)


def _fit(**options):
    torch.manual_seed(0)
    model = ThreeShapes()
    strategy = LowRankStrategy(target_modules=("tall", "wide", "square"), update_gap=3, memory_report=False, **options)
    trainer = L.Trainer(strategy=strategy, max_steps=10, **QUIET)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model)
    return model, trainer, [str(w.message) for w in caught]


@pytest.mark.parametrize("policy", POLICIES)
def test_adafactor_trains_through_the_strategy_on_every_orientation(policy):
    model, trainer, messages = _fit(rank=4, projector="random", moments=policy)
    opt = trainer.optimizers[0]
    weights = [model.tall.weight, model.wide.weight, model.square.weight]
    assert all(opt.is_projected(w) for w in weights)
    assert all(int(opt.state[w]["step"]) == 10 for w in weights)  # three refreshes after the first one
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not any("Adafactor's factored second moment" in m for m in messages)
    report = trainer.strategy.memory_report()
    assert report.saving_bytes > 0 and all(layer.saving_bytes > 0 for layer in report.layers)


def test_adafactor_keeps_a_layer_dense_where_projecting_would_cost_and_names_it():
    # dct indices (8 bytes each) at rank 8 save on a smaller side of 32, not on one of 16 (float32: r < d / 3)
    model, trainer, messages = _fit(rank=8, projector="dct", dct_scorer="fft", moments="rotate")
    opt = trainer.optimizers[0]
    assert not opt.is_projected(model.tall.weight)
    assert opt.is_projected(model.wide.weight) and opt.is_projected(model.square.weight)
    assert len(opt.kept_dense) == 1 and opt.kept_dense[0] is model.tall.weight
    warned = [m for m in messages if "Adafactor's factored second moment" in m]
    assert len(warned) == 1 and "1 of 3" in warned[0] and "tall (48, 16)" in warned[0]
    assert "wide" not in warned[0] and "square" not in warned[0]
    assert set(trainer.strategy.lowrank_layer_names().values()) == {"wide", "square"}
    report = trainer.strategy.memory_report()
    assert report.saving_bytes > 0 and all(layer.saving_bytes > 0 for layer in report.layers)
    assert all(m.saving_bytes >= 0 for m in report.modules)
    assert not any("negative saving" in m for m in messages)


def test_adafactor_with_svd_stays_dense_and_never_reports_a_negative_saving():
    model, trainer, messages = _fit(rank=4)  # svd: P alone (d x r) is more than Adafactor's m + n
    opt = trainer.optimizers[0]
    assert opt.projected_params() == []
    warned = [m for m in messages if "Adafactor's factored second moment" in m]
    assert len(warned) == 1 and all(name in warned[0] for name in ("tall", "wide", "square"))
    report = trainer.strategy.memory_report()
    assert report.saving_bytes == 0 and report.baseline == "Adafactor"


def test_plan_agrees_with_the_strategy_for_adafactor():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        planned = plan(ThreeShapes(), target_modules=("tall", "wide", "square"), rank=8, projector="dct",
                       dct_scorer="fft")  # fmt: skip
    assert [layer.name for layer in planned.report.layers] == ["square", "wide"]
    assert planned.report.saving_bytes > 0
    assert any("Adafactor's factored second moment" in str(w.message) and "tall" in str(w.message) for w in caught)
    assert not any("negative saving" in str(w.message) for w in caught)


# -- the negative-saving warning -----------------------------------------------------------------------------------


def _report_for(ranks):
    """AdamW with an SVD P at the given rank per 16 x 16 layer; a rank above 2/3 of 16 holds more than AdamW."""
    torch.manual_seed(0)
    layers = nn.ModuleDict({f"layer{i}": nn.Linear(16, 16, bias=False) for i in range(len(ranks))})
    groups = [{"params": [layers[f"layer{i}"].weight], "rank": r} for i, r in enumerate(ranks)]
    names = {layers[k].weight: k for k in layers}
    opt = ProjectedOptimizer.from_optimizer(torch.optim.AdamW(groups), names)
    for p in names:
        p.grad = torch.randn_like(p)
    opt.step()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = account_memory([opt], layers.parameters(), names, module=layers)
    return report, [str(w.message) for w in caught if "negative saving" in str(w.message)]


def test_negative_saving_warns_naming_the_layers():
    report, messages = _report_for([12, 2, 13])
    assert [layer.name for layer in report.layers if layer.saving_bytes < 0] == ["layer0", "layer2"]
    assert len(messages) == 1
    assert "2 layer(s)" in messages[0] and "layer0" in messages[0] and "layer2" in messages[0]
    assert "layer1" not in messages[0]


def test_negative_saving_warning_collapses_a_long_list():
    report, messages = _report_for([12] * 11)
    assert len(messages) == 1 and "11 layer(s)" in messages[0] and "and 3 more" in messages[0]
    assert "layer6" in messages[0] and "layer9" not in messages[0]  # sorted by name: layer0, layer1, layer10, ...


def test_no_warning_when_every_layer_saves():
    report, messages = _report_for([2, 4, 8])
    assert all(layer.saving_bytes > 0 for layer in report.layers) and messages == []
