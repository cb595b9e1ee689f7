"""``state_dtype``: a projected bf16/fp16 weight keeps its moments and P in float32 by default (dense ones in their own
dtype, as torch's optimizers), steps like a float32 GaLore computed by hand, and checkpoints, plans and budgets with
those dtypes."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_lowrank import LowRankStrategy, plan
from lightning_lowrank.config import LowRankConfig
from lightning_lowrank.optim import ProjectedOptimizer
from lightning_lowrank.optim.budget.costs import layer_cost, projector_bytes
from lightning_lowrank.optim.state.storage import state_dtype
from lightning_lowrank.optim.update import functional
from tests.models import QUIET, TinyNet

BF16 = torch.bfloat16
PROJECTORS = ["svd", "rsvd", "dct", "random", "gaussian", "online_pca"]


def _weights(dtype, shapes=((20, 48), (48, 20)), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]


def _step(opt, params, seed):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
    opt.step()


def _float_state(opt, p):
    return {k: v.dtype for k, v in opt.state[p].items() if torch.is_tensor(v) and v.is_floating_point() and k != "step"}


def _ulps(a, b):
    """Distance in bf16 units in the last place (same-sign values)."""
    return (a.view(torch.int16).int() - b.view(torch.int16).int()).abs().max().item()


# -- the option and the dtypes it gives ----------------------------------------------------------------------------


def test_state_dtype_is_an_option_of_every_front_end():
    assert "state_dtype" in LowRankConfig.field_names()
    with pytest.raises(ValueError, match="Unknown state_dtype 'float8'"):
        ProjectedOptimizer(_weights(BF16), rank=4, state_dtype="float8")
    with pytest.raises(ValueError, match="Unknown state_dtype"):
        LowRankStrategy(rank=4, state_dtype="fp32")
    assert state_dtype({"state_dtype": None}, BF16) == torch.float32
    assert state_dtype({"state_dtype": None}, torch.float16) == torch.float32
    assert state_dtype({"state_dtype": None}, torch.float64) == torch.float64
    assert state_dtype({"state_dtype": "bfloat16"}, torch.float32) == BF16


@pytest.mark.parametrize("projector", PROJECTORS)
@pytest.mark.parametrize("dtype", [BF16, torch.float16])
def test_half_precision_projected_layers_keep_float32_moments_and_P(projector, dtype):
    bias = torch.nn.Parameter(torch.zeros(20, dtype=dtype))
    params = [*_weights(dtype), bias]
    opt = ProjectedOptimizer(params, lr=1e-3, rank=4, update_gap=2, projector=projector)
    for seed in range(3):  # through a refresh
        _step(opt, params, seed)
    for p in params[:2]:
        assert _float_state(opt, p) == {"exp_avg": torch.float32, "exp_avg_sq": torch.float32} | (
            {"proj": torch.float32} if projector in ("svd", "rsvd", "online_pca") else {}
        )
        assert opt.projection_matrix(p).dtype == torch.float32
        assert p.dtype == dtype and torch.isfinite(p).all()
    assert _float_state(opt, bias) == {"exp_avg": dtype, "exp_avg_sq": dtype}  # dense: as torch.optim.AdamW


@pytest.mark.parametrize(
    "weights,option,expected",
    [(BF16, "bfloat16", BF16), (torch.float32, None, torch.float32), (torch.float32, "float64", torch.float64)],
)
def test_state_dtype_chooses_otherwise(weights, option, expected):
    params = _weights(weights)
    opt = ProjectedOptimizer(params, lr=1e-3, rank=4, state_dtype=option)
    _step(opt, params, 0)
    for p in params:
        assert set(_float_state(opt, p).values()) == {expected}
        assert opt.projection_matrix(p).dtype == expected


# -- the numbers ---------------------------------------------------------------------------------------------------


def _reference_galore(W, grads, rank, gap, lr, wd, betas, eps, residual):
    """GaLore-Adam(W) written out in float32 for a bf16 weight: P from the SVD of the float32 gradient (every ``gap``
    steps, moments kept), Adam on P^T G in float32, each update computed in float32 and rounded into the bf16 weight
    (decoupled decay first, as torch.optim.AdamW); ``frugal``: plus lr * sign(G - P P^T G)."""
    b1, b2 = betas
    left = W.shape[0] < W.shape[1]
    W, m, v, history = W.detach().clone(), 0.0, 0.0, []
    for t, G in enumerate(grads, start=1):
        g = G.float()
        if (t - 1) % gap == 0:
            U, _, Vh = torch.linalg.svd(g, full_matrices=False)
            P = U[:, :rank] if left else Vh[:rank].T
        R = P.T @ g if left else g @ P
        m = b1 * m + (1 - b1) * R
        v = b2 * v + (1 - b2) * R * R
        D = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
        W = W * (1 - lr * wd)
        W = (W.float() - lr * (P @ D if left else D @ P.T)).to(BF16)
        if residual == "frugal":
            W = (W.float() - lr * torch.sign(g - (P @ R if left else R @ P.T))).to(BF16)
        history.append((W, m, v, P))
    return history


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
@pytest.mark.parametrize("residual", ["none", "frugal"])
def test_bf16_layer_steps_as_float32_galore_to_bf16_rounding(shape, residual):
    rank, gap, lr, wd, betas, eps = 4, 3, 1e-2, 0.1, (0.9, 0.999), 1e-8
    gen = torch.Generator().manual_seed(1)
    W0 = torch.randn(shape, generator=gen).to(BF16)
    grads = [torch.randn(shape, generator=gen).to(BF16) for _ in range(7)]
    expected = _reference_galore(W0, grads, rank, gap, lr, wd, betas, eps, residual)
    runs = {}
    for option in (None, "bfloat16"):
        w = torch.nn.Parameter(W0.clone())
        opt = ProjectedOptimizer(
            [w], lr=lr, betas=betas, eps=eps, weight_decay=wd, rank=rank, update_gap=gap, residual=residual,
            state_dtype=option, svd_signs="none",  # the reference's raw torch.linalg.svd columns
        )  # fmt: skip
        errors = []
        for G, (W_ref, m_ref, v_ref, P_ref) in zip(grads, expected):
            w.grad = G.clone()
            opt.step()
            state = opt.state[w]
            if option is None:  # float32 state: the hand-written float32 numbers, the weight to one bf16 rounding
                torch.testing.assert_close(opt.projection_matrix(w), P_ref, rtol=0, atol=0)
                torch.testing.assert_close(state["exp_avg"], m_ref, rtol=1e-5, atol=1e-6)  # m ~ 0.1
                torch.testing.assert_close(state["exp_avg_sq"], v_ref, rtol=1e-5, atol=0)
                assert w.dtype == BF16 and _ulps(w.detach(), W_ref) <= 1
            errors.append(((state["exp_avg_sq"].float() - v_ref).abs() / v_ref.abs().clamp_min(1e-30)).max().item())
        runs[option] = max(errors)
    # bf16 moments (the previous behaviour, still available) are off by bf16's rounding, 1000x what float32 gives
    assert runs["bfloat16"] > 1e-3 > 1e3 * runs[None]


@pytest.mark.parametrize("residual", ["fira", "apollo", "frugal"])
@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_residuals_with_bf16_weights_compute_the_float32_update(residual, shape):
    """The residuals read the full gradient: with a bf16 weight the update is computed in float32 (by promotion), so
    from the same point a step differs from the float32 weight's step only by the rounding of each add into the weight
    (one for APOLLO, two for Fira and FRUGAL: the projected part, then the residual), within a bf16 ulp of the
    weight's size along the way."""
    gen = torch.Generator().manual_seed(2)
    W0 = (0.01 * torch.randn(shape, generator=gen)).to(BF16)  # about a step's size: the roundings stay small
    grads = [torch.randn(shape, generator=gen).to(BF16) for _ in range(3)]
    w16, w32 = torch.nn.Parameter(W0.clone()), torch.nn.Parameter(W0.float())
    opts = [ProjectedOptimizer([w], lr=1e-2, weight_decay=0.0, rank=4, residual=residual) for w in (w16, w32)]
    for G in grads:
        start = w16.detach().float()
        w32.data.copy_(start)  # the same bf16 point for both: compare one step's rounding only
        for w, opt in zip((w16, w32), opts):
            w.grad = G.to(w.dtype)
            opt.step()
        step16, step32 = w16.detach().float() - start, w32.detach() - start
        torch.testing.assert_close(step16, step32, rtol=0, atol=2**-7 * (start.abs() + step32.abs()).max().item())
        assert torch.linalg.matrix_rank(step16) > 4  # the residual's full-rank part is in the bf16 step
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opts[0].state[w16][key], opts[1].state[w32][key], rtol=1e-6, atol=1e-9)


def test_projecting_a_bf16_gradient_is_float32_exact_in_bounded_slices(monkeypatch):
    """``project_gradient`` casts the bf16 gradient up in slices (at most ``UPCAST_ELEMENTS`` elements) and returns the
    float32 product of the bf16 values; ``add_projected_back`` adds the float32 update slice by slice, rounded once."""
    gen = torch.Generator().manual_seed(3)
    monkeypatch.setattr(functional, "UPCAST_ELEMENTS", 3 * 24)
    for shape in [(24, 50), (50, 24)]:
        G = torch.randn(shape, generator=gen).to(BF16)
        P = torch.linalg.qr(torch.randn(24, 4, generator=gen)).Q
        left = shape[0] < shape[1]
        exact = P.double().T @ G.double() if left else G.double() @ P.double()
        with _LargestCast() as casts:
            low = functional.project_gradient(G, P)
        assert low.dtype == torch.float32 and casts.largest == 3 * 24  # slices of 3 columns (rows), never all of G
        torch.testing.assert_close(low.double(), exact, rtol=1e-6, atol=1e-6)
        # casting P down instead (a bf16 product) is ~1000x further from the exact projection
        rounded = (P.to(BF16).T @ G if left else G @ P.to(BF16)).double()
        assert (rounded - exact).abs().max() > 100 * (low.double() - exact).abs().max()

        D = torch.randn(low.shape, generator=gen)
        W = torch.randn(shape, generator=gen).to(BF16)
        expected = (W.float() - 0.5 * (P @ D if left else D @ P.T)).to(BF16)
        with _LargestCast() as casts:
            functional.add_projected_back(W, D, P, 0.5, -1.0)
        assert casts.largest <= 24 * 4  # P and D cast (no-ops here): no weight-sized float32 tensor
        assert _ulps(W, expected) <= 1


class _LargestCast(TorchDispatchMode):
    """The most elements of any dtype cast (``aten._to_copy``) run under it."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default:
            self.largest = max(self.largest, out.numel())
        return out


# -- checkpoints ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        dict(projector="svd"),
        dict(projector="dct"),
        dict(projector="online_pca", projector_bits=8),
        dict(residual="fira"),
        dict(preconditioner="lazy_hessian"),
        dict(state_bits=8, state_block_size=64),
        dict(state_dtype="bfloat16"),
    ],
)
def test_a_checkpoint_round_trip_keeps_every_dtype_and_resumes_bit_for_bit(tmp_path, options):
    shapes = ((64, 160), (160, 64))  # 8-bit moments (64 x 4 ... 4 x 160 is below storage's minimum: kept in full)
    params = _weights(BF16, shapes)
    opt = ProjectedOptimizer(params, lr=1e-3, rank=40, update_gap=2, **options)
    for seed in range(3):
        _step(opt, params, seed)
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fresh = ProjectedOptimizer(twins, lr=1e-3, rank=40, update_gap=2, **options)
    fresh.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    for p, q in zip(params, twins):
        saved, loaded = opt.state[p], fresh.state[q]
        assert {k: v.dtype for k, v in loaded.items()} == {k: v.dtype for k, v in saved.items()}
        for key in saved:
            assert torch.equal(loaded[key], saved[key]), key
    expected = BF16 if options.get("state_dtype") else torch.float32
    assert opt.projection_matrix(params[0]).dtype == expected
    if "exp_avg" in opt.state[params[0]]:
        assert opt.state[params[0]]["exp_avg"].dtype == expected
    for seed in range(3, 6):  # through another refresh
        _step(opt, params, seed)
        _step(fresh, twins, seed)
    for p, q in zip(params, twins):
        assert torch.equal(p, q)


def test_a_checkpoint_with_bf16_moments_resumes_in_float32():
    """Written before ``state_dtype`` existed (bf16 moments, no such key in its groups): the moments come back in the
    state dtype, so they match the float32 P the projector now rebuilds."""
    params = _weights(BF16)
    opt = ProjectedOptimizer(params, lr=1e-3, rank=4, state_dtype="bfloat16", projector="random")
    _step(opt, params, 0)
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        del group["state_dtype"]
    fresh = ProjectedOptimizer(params, lr=1e-3, rank=4, projector="random")
    fresh.load_state_dict(saved)
    assert fresh.param_groups[0]["state_dtype"] is None
    for p in params:
        assert fresh.state[p]["exp_avg"].dtype == torch.float32
        assert torch.equal(fresh.state[p]["exp_avg"], opt.state[p]["exp_avg"].float())
    _step(fresh, params, 1)


# -- Lightning, the planner and the budget -------------------------------------------------------------------------


def _fit_bf16(max_steps, root, ckpt_path=None, checkpoint=None, **options):
    torch.manual_seed(0)
    model = TinyNet(scheduler=None)
    trainer = L.Trainer(
        precision="bf16-true",
        strategy=LowRankStrategy(rank=4, update_gap=3, memory_report=False, **options),
        max_steps=max_steps,
        callbacks=[checkpoint] if checkpoint else [],
        **{**QUIET, "enable_checkpointing": checkpoint is not None, "default_root_dir": root},
    )
    trainer.fit(model, ckpt_path=ckpt_path)
    return model, trainer


def test_lightning_bf16_true_fit_keeps_float32_state_and_resumes_bit_for_bit(tmp_path):
    # step 4 ends an epoch (4 batches): resumed there, the data order is the same; refreshes at updates 3 and 6
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1, filename="{step}")
    full, trainer = _fit_bf16(7, tmp_path, checkpoint=ckpt)
    opt = trainer.optimizers[0]
    assert [p.dtype for p in full.parameters()] == [BF16] * len(list(full.parameters()))
    projected = {full.attn.weight, full.mlp.weight}
    assert set(opt.projected_params()) == projected
    for p in full.parameters():
        state_dtypes = set(_float_state(opt, p).values())
        assert state_dtypes == ({torch.float32} if p in projected else {BF16})
    loaded = torch.load(tmp_path / "step=4.ckpt", weights_only=True)["optimizer_states"][0]["state"]
    assert {t.dtype for s in loaded.values() for k, t in s.items() if k == "exp_avg"} == {torch.float32, BF16}
    resumed, trainer = _fit_bf16(7, tmp_path, ckpt_path=str(tmp_path / "step=4.ckpt"))
    opt = trainer.optimizers[0]
    assert {opt.state[p]["exp_avg"].dtype for p in (resumed.attn.weight, resumed.mlp.weight)} == {torch.float32}
    for (name, a), b in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


def test_layerwise_bf16_accumulates_the_projected_gradient_in_float32(tmp_path):
    torch.manual_seed(0)
    model = TinyNet(scheduler=None, batch_size=8)
    trainer = L.Trainer(
        precision="bf16-true",
        strategy=LowRankStrategy(rank=4, update_gap=2, layerwise=True, memory_report=False),
        max_steps=4,
        accumulate_grad_batches=2,
        **{**QUIET, "default_root_dir": tmp_path},
    )
    trainer.fit(model)
    opt = trainer.optimizers[0]
    assert opt.state[model.attn.weight]["exp_avg"].dtype == torch.float32
    assert int(opt.state[model.attn.weight]["step"]) == 4
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("options", [dict(), dict(projector="dct"), dict(state_dtype="bfloat16")])
def test_plan_equals_what_bf16_true_training_measures(tmp_path, options):
    torch.manual_seed(0)
    model = TinyNet(scheduler=None)
    planned = plan(model, rank=4, dtype="bf16", **options).report
    trainer = L.Trainer(
        precision="bf16-true",
        strategy=LowRankStrategy(rank=4, memory_report=False, **options),
        max_steps=1,
        **{**QUIET, "default_root_dir": tmp_path},
    )
    trainer.fit(model)
    measured = trainer.strategy.memory_report()
    assert planned.layers == measured.layers
    for key in ("optimizer_state_bytes", "projected_state_bytes", "projector_bytes", "dense_state_bytes"):
        assert getattr(planned, key) == getattr(measured, key), key
    assert planned.shared_basis_bytes == measured.shared_basis_bytes
    es = 2 if options.get("state_dtype") else 4  # attn 40x24, mlp 24x40 at rank 4: moments 4x40 or 40x4, P 24x4
    projector = 8 * 4 if options.get("projector") == "dct" else 24 * 4 * es
    assert [(x.state_bytes, x.projector_bytes) for x in measured.layers] == [
        (2 * 4 * 40 * es + projector + 4, projector)
    ] * 2
    assert measured.shared_basis_bytes == (24 * 24 * 4 if options.get("projector") == "dct" else 0)


@pytest.mark.parametrize("projector", ["svd", "dct"])
def test_the_budget_counts_float32_state_for_bf16_weights(projector):
    """16 x 32 bf16 weights, float32 state: per rank 2 * 32 moments (+ 16 of P for svd, an int64 index for dct) at 4
    bytes; counted at the weights' 2 bytes, the ranks handed out would overrun the budget."""
    a, b = (torch.nn.Linear(32, 16, bias=False).to(BF16) for _ in range(2))
    per_rank = {"svd": (2 * 32 + 16) * 4, "dct": 2 * 32 * 4 + 8}[projector]
    shared = 16 * 16 * 4 if projector == "dct" else 0
    budget = 2 * 64 + shared + 12 * per_rank
    opt = ProjectedOptimizer(
        [a.weight, b.weight], lr=1e-3, rank=15, update_gap=3, projector=projector, memory_budget=budget
    )
    group = opt.param_groups[0]
    assert layer_cost(a.weight, group).per_rank == per_rank
    assert projector_bytes(a.weight, group, 3) == 3 * (16 * 4 if projector == "svd" else 8)
    assert projector_bytes(a.weight, {**group, "state_dtype": "bfloat16"}, 3) == 3 * (
        16 * 2 if projector == "svd" else 8
    )
    x = torch.randn(64, 32).to(BF16)
    for _ in range(4):
        opt.zero_grad()
        (a(x).float().pow(2).mean() + b(x).float().pow(2).mean()).backward()
        opt.step()
        held = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
        held += sum(t.numel() * t.element_size() for t in opt.dct_bases().values())
        assert held <= budget
    assert opt.layer_rank(a.weight) + opt.layer_rank(b.weight) == 12
    assert opt.state[a.weight]["exp_avg"].dtype == torch.float32
