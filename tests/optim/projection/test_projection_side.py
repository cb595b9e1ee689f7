"""``side=``: which side P multiplies the gradient from, whatever the weight's shape.

``"auto"`` is GaLore's smaller side (the other tests). ``"right"`` (G P) is what a row-sharded weight needs, and
``"left"`` (P^T G) its mirror. Each is checked against the update written out by hand with dense torch math.
"""

from __future__ import annotations

import pytest
import torch

from lightning_lowrank.optim import ProjectedOptimizer
from lightning_lowrank.optim.layerwise import LayerwiseProjectedOptimizer
from lightning_lowrank.optim.projection.bases import dct_basis

LR, BETAS, EPS, WD, RANK = 0.01, (0.9, 0.999), 1e-8, 0.1, 3


def _weight(shape, seed=0):
    return torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))


def _grads(shape, steps):
    g = torch.Generator().manual_seed(7)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(steps)]


def _run(w, grads, **options):
    options = {"update_gap": 100, **options}
    opt = ProjectedOptimizer([w], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, rank=RANK, **options)
    for g in grads:
        w.grad = g.clone()
        opt.step()
    return opt


def _by_hand(w0, grads, P, left):
    """AdamW (torch's form) on R = P^T G or G P, update projected back, decoupled decay: GaLore with a fixed P."""
    w, m, v = w0.clone(), 0, 0
    for t, g in enumerate(grads, start=1):
        r = P.T @ g if left else g @ P
        m = BETAS[0] * m + (1 - BETAS[0]) * r
        v = BETAS[1] * v + (1 - BETAS[1]) * r * r
        direction = (m / (1 - BETAS[0] ** t)) / ((v / (1 - BETAS[1] ** t)).sqrt() + EPS)
        w = w * (1 - LR * WD) - LR * (P @ direction if left else direction @ P.T)
    return w


@pytest.mark.parametrize(("shape", "side"), [((8, 20), "right"), ((20, 8), "left"), ((8, 20), "auto")])
def test_svd_on_the_chosen_side_matches_galore_written_out(shape, side):
    w = _weight(shape)
    w0, grads = w.detach().clone(), _grads(shape, 4)
    opt = _run(w, grads, side=side)
    U, _, Vh = torch.linalg.svd(grads[0], full_matrices=False)
    left = side == "left" or (side == "auto" and shape[0] < shape[1])
    P = U[:, :RANK] if left else Vh[:RANK].T
    state = opt.state[w]
    torch.testing.assert_close(state["proj"].abs(), P.abs())  # singular vectors up to sign
    assert state["exp_avg"].shape == ((RANK, shape[1]) if left else (shape[0], RANK))
    torch.testing.assert_close(w.detach(), _by_hand(w0, grads, state["proj"], left), rtol=1e-10, atol=1e-12)


def test_dct_on_the_right_of_a_wide_weight_picks_columns_of_the_n_basis():
    shape = (6, 16)
    w = _weight(shape)
    w0, grads = w.detach().clone(), _grads(shape, 3)
    opt = _run(w, grads, projector="dct", side="right")
    basis = dct_basis(16, dtype=torch.float64)
    scores = (grads[0] @ basis).norm(dim=0)  # energy of G on each of the n columns
    idx = torch.topk(scores, RANK).indices
    assert torch.equal(opt.state[w]["proj_idx"], idx)
    P = basis[:, idx]
    torch.testing.assert_close(w.detach(), _by_hand(w0, grads, P, left=False), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "options",
    [
        dict(projector="random"),
        dict(projector="rsvd"),
        dict(projector="online_pca"),
        dict(residual="apollo"),  # Gaussian P
        dict(residual="fira"),
        dict(residual="frugal", projector="dct"),
        dict(state_bits=8, state_block_size=8),
        dict(projector_bits=8, proj_group_size=8),
    ],
)
def test_every_projector_and_residual_keeps_the_right_side_of_a_wide_weight(options):
    shape = (6, 40)
    w = _weight(shape)
    opt = _run(w, _grads(shape, 3), side="right", **options)
    assert opt.projection_matrix(w).shape == (40, RANK)  # d = n: P multiplies G from the right
    shapes = {tuple(opt.state[w][k].shape) for k in ("exp_avg", "exp_avg_sq") if k in opt.state[w]}
    shapes |= {tuple(opt.state[w][k].tolist()) for k in ("exp_avg_shape", "exp_avg_sq_shape") if k in opt.state[w]}
    assert shapes == {(6, RANK)}  # m x r moments (8-bit ones by their recorded shape)
    assert torch.isfinite(w).all() and opt.projection_side(w) == "right"


def test_the_report_prices_p_on_the_projected_side():
    from lightning_lowrank.memory.accounting import account_memory

    w = torch.nn.Parameter(torch.randn(8, 64))
    opt = _run(w, [torch.randn(8, 64)], side="right")
    report = account_memory([opt], [w], {w: "w"}, torch.device("cpu"))
    assert report.projector_bytes == 64 * RANK * 4  # P is n x r = 64 x 3 float32, not min(m, n) x r
    assert report.projected_state_bytes == 2 * 8 * RANK * 4 + 4  # m x r moments and the float32 step counter


def test_subset_norm_refuses_a_fixed_side():
    with pytest.raises(ValueError, match="subset_norm.*side='auto' only"):
        ProjectedOptimizer([_weight((4, 6))], rank=2, projected_rule="subset_norm", side="right")
    with pytest.raises(ValueError, match="Unknown side 'top'"):
        ProjectedOptimizer([_weight((4, 6))], rank=2, side="top")


def test_layerwise_on_the_right_equals_the_ordinary_step():
    shape = (6, 20)
    grads = _grads(shape, 5)
    a, b = _weight(shape), _weight(shape)
    _run(a, grads, side="right", update_gap=2)
    opt = LayerwiseProjectedOptimizer(
        [b], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, rank=RANK, update_gap=2, side="right"
    )
    opt.attach()
    for g in grads:

        def closure(g=g):
            (b * g).sum().backward()  # d/db = g

        opt.step(closure)
    opt.detach()
    torch.testing.assert_close(b.detach(), a.detach(), rtol=0, atol=1e-12)  # batched vs one-layer op order


def test_resuming_with_another_side_converts_the_moments():
    shape = (8, 20)
    w = _weight(shape)
    saved = _run(w, _grads(shape, 2)).state_dict()  # auto: left, moments (r, n)
    assert saved["state"][0]["exp_avg"].shape == (RANK, 20)
    fresh = ProjectedOptimizer([w], lr=LR, rank=RANK, side="right")
    with pytest.warns(UserWarning, match="side 'left' -> 'right'"):
        fresh.load_state_dict(saved)
    assert fresh.state[w]["exp_avg"].shape == (8, RANK) and fresh.projection_matrix(w).shape == (20, RANK)
