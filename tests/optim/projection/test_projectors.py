"""Every projector behind ``projector=``, checked through the optimizer against dense references written here."""

import pytest
import torch

from lightning_lowrank.optim import ProjectedAdamW
from lightning_lowrank.optim.projection.bases import online_pca_gradient, orthonormalize
from lightning_lowrank.optim.projection.refresh import move_moments as _move_moments
from lightning_lowrank.optim.update import rules
from lightning_lowrank.optim.update.dispatch import init_projected_state
from tests.roundtrip import assert_resumes_bit_for_bit

ALL = ["svd", "rsvd", "dct", "random", "online_pca"]
ORTHONORMAL = ALL


def _low_rank_gradient(shape, true_rank=4, noise=0.01, seed=0):
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    return torch.randn(m, true_rank, generator=g) @ torch.randn(true_rank, n, generator=g) + noise * torch.randn(
        m, n, generator=g
    )


def _captured(P, G):
    Q = orthonormalize(P)
    low = Q.T @ G if G.shape[0] <= G.shape[1] else G @ Q
    return (low.norm() ** 2 / G.norm() ** 2).item()


def _optimum(G, r):
    s = torch.linalg.svdvals(G.double())
    return (s[:r].pow(2).sum() / s.pow(2).sum()).item()


def _one_step(projector, G, rank, **kw):
    w = torch.nn.Parameter(torch.zeros_like(G))
    w.grad = G.clone()
    opt = ProjectedAdamW([w], rank=rank, projector=projector, **kw)
    opt.step()
    return w, opt


@pytest.mark.parametrize("projector", ALL)
@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_shapes_on_both_sides(projector, shape):
    w, opt = _one_step(projector, torch.randn(*shape), rank=5)
    assert opt.projection_matrix(w).shape == (24, 5)
    expected = (5, 40) if shape[0] <= shape[1] else (40, 5)
    assert opt.state[w]["exp_avg"].shape == expected == opt.state[w]["exp_avg_sq"].shape


@pytest.mark.parametrize("projector", ORTHONORMAL)
def test_orthonormal_columns(projector):
    w, opt = _one_step(projector, torch.randn(30, 50), rank=7, pca_lr=5.0)
    for _ in range(3):  # online PCA moves P every step; a large step must still leave orthonormal columns
        w.grad = torch.randn(30, 50)
        opt.step()
    P = opt.projection_matrix(w)
    torch.testing.assert_close(P.T @ P, torch.eye(7), atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", [(32, 48), (48, 32)])
def test_captured_energy_against_the_svd_optimum(shape):
    G = _low_rank_gradient(shape)
    best = _optimum(G, 4)
    got = {}
    for projector in ALL:
        w, opt = _one_step(projector, G, rank=4)
        got[projector] = _captured(opt.projection_matrix(w), G)
    assert got["svd"] == pytest.approx(best, abs=1e-5)
    assert got["online_pca"] == pytest.approx(best, abs=1e-3)  # initialised by SVD, one small step since
    assert got["rsvd"] >= 0.999 * best  # a clear spectral gap: two power iterations find it
    assert all(v <= best + 1e-5 for v in got.values())
    # Random subspaces capture about r/d of the energy; DCT picks the best basis columns and beats that here.
    assert got["random"] < 0.6 * best and got["dct"] > got["random"]


@pytest.mark.parametrize("projector", ["rsvd", "random"])
def test_randomness_comes_from_the_seed_not_the_global_rng(projector):
    G = torch.randn(20, 36)
    torch.manual_seed(1)
    state_before = torch.get_rng_state()
    w1, opt1 = _one_step(projector, G, rank=3, seed=7)
    assert torch.equal(torch.get_rng_state(), state_before)
    torch.manual_seed(999)
    w2, opt2 = _one_step(projector, G, rank=3, seed=7)
    w3, opt3 = _one_step(projector, G, rank=3, seed=8)
    assert torch.equal(opt1.projection_matrix(w1), opt2.projection_matrix(w2))
    assert not torch.equal(opt1.projection_matrix(w1), opt3.projection_matrix(w3))


def test_random_projector_stores_only_a_seed_and_changes_at_each_refresh():
    w = torch.nn.Parameter(torch.zeros(16, 16))
    opt = ProjectedAdamW([w], rank=4, projector="random", update_gap=2)
    seen = []
    for _ in range(4):
        w.grad = torch.randn(16, 16)
        opt.step()
        seen.append(opt.projection_matrix(w))
    assert {k for k in opt.state[w] if k.startswith("proj")} == {"proj_seed"}
    assert torch.equal(seen[0], seen[1]) and not torch.equal(seen[1], seen[2]) and torch.equal(seen[2], seen[3])


def test_online_pca_gradient_matches_autograd():
    G = torch.randn(9, 14, dtype=torch.float64)
    P = torch.randn(9, 3, dtype=torch.float64, requires_grad=True)
    G_hat = G / G.norm()
    loss = (P @ P.T @ G_hat - G_hat).pow(2).sum()
    (expected,) = torch.autograd.grad(loss, P)
    torch.testing.assert_close(online_pca_gradient(P.detach(), G).double(), expected, atol=1e-5, rtol=1e-4)
    Gr = torch.randn(14, 9, dtype=torch.float64)  # right side: G_hat P P^T
    Gr_hat = Gr / Gr.norm()
    loss = (Gr_hat @ P @ P.T - Gr_hat).pow(2).sum()
    (expected,) = torch.autograd.grad(loss, P)
    torch.testing.assert_close(online_pca_gradient(P.detach(), Gr).double(), expected, atol=1e-5, rtol=1e-4)


def test_online_pca_tracks_a_rotating_subspace_better_than_a_frozen_basis():
    d, n, r = 20, 60, 3
    g = torch.Generator().manual_seed(0)
    U0 = torch.linalg.qr(torch.randn(d, d, generator=g)).Q
    A = torch.randn(d, d, generator=g)
    skew = 0.02 * (A - A.T)  # a slow rotation of the gradient's column space
    w = torch.nn.Parameter(torch.zeros(d, n))
    frozen = ProjectedAdamW([w], rank=r, projector="svd", update_gap=10_000)
    w2 = torch.nn.Parameter(torch.zeros(d, n))
    online = ProjectedAdamW([w2], rank=r, projector="online_pca", update_gap=10_000, pca_lr=0.5)
    U = U0
    for _ in range(60):
        G = U[:, :r] @ torch.randn(r, n, generator=g) + 0.01 * torch.randn(d, n, generator=g)
        w.grad, w2.grad = G, G.clone()
        frozen.step()
        online.step()
        U = torch.matrix_exp(skew) @ U
    G = U[:, :r] @ torch.randn(r, n, generator=g)
    assert _captured(online.projection_matrix(w2), G) > _captured(frozen.projection_matrix(w), G) + 0.1


@pytest.mark.parametrize("projector", ["svd", "rsvd", "online_pca"])
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_projection_storage(projector, bits):
    G = _low_rank_gradient((64, 96))
    w_full, full = _one_step(projector, G, rank=8)
    w_q, quant = _one_step(projector, G, rank=8, projector_bits=bits, proj_group_size=64)
    P, Pq = full.projection_matrix(w_full), quant.projection_matrix(w_q)
    # Group-wise min/max quantization: each entry is within half a step of its group's range.
    step = (P.max() - P.min()) / (2**bits - 1)
    # Online PCA quantizes twice (after the SVD, then after its first step), so allow two steps of error there.
    assert (Pq - P).abs().max() <= step * (0.51 if projector != "online_pca" else 2.0)
    state = quant.state[w_q]
    assert "proj" not in state and state["proj_codes"].dtype == torch.uint8
    stored = sum(t.numel() * t.element_size() for k, t in state.items() if k.startswith("proj"))
    codes = 64 * 8 * bits // 8
    groups = 64 * 8 // 64
    assert stored == codes + 2 * 4 * groups  # uint8 codes + float32 scale and zero per group
    assert stored < full.state[w_full]["proj"].numel() * 4 * bits / 32 + 2 * 4 * groups + 1


@pytest.mark.parametrize("projector", ALL)
@pytest.mark.parametrize("bits", [None, 4])
def test_state_dict_round_trip_resumes_bit_for_bit(projector, bits):
    if bits and projector in ("dct", "random"):
        pytest.skip("nothing to quantize: these store indices or a seed")

    def make():
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(12, 20))
        return [w], ProjectedAdamW([w], rank=3, projector=projector, update_gap=2, projector_bits=bits)

    grads = [[torch.randn(12, 20, generator=torch.Generator().manual_seed(i))] for i in range(7)]
    assert_resumes_bit_for_bit(make, grads)


def test_dct_fft_scorer_selects_the_same_columns_and_keeps_no_basis():
    G = torch.randn(48, 80, dtype=torch.float64)
    w1, by_matmul = _one_step("dct", G, rank=6, dct_scorer="matmul")
    w2, by_fft = _one_step("dct", G, rank=6, dct_scorer="fft")
    assert set(by_matmul.state[w1]["proj_idx"].tolist()) == set(by_fft.state[w2]["proj_idx"].tolist())
    torch.testing.assert_close(by_fft.projection_matrix(w2), by_matmul.projection_matrix(w1))
    assert by_fft.dct_bases() == {} and len(by_matmul.dct_bases()) == 1


@pytest.mark.parametrize("left", [True, False])
def test_moment_policies_at_a_refresh(left):
    shape = (6, 10) if left else (10, 6)
    d = 6
    P_old = torch.eye(d)[:, :3]
    P_new = torch.eye(d)[:, [2, 0, 4]]  # keeps two directions (reordered), swaps one for a new one
    results = {}
    for policy in ("keep", "reset", "rotate"):
        w = torch.nn.Parameter(torch.zeros(shape))
        opt = ProjectedAdamW([w], rank=3, moments=policy)
        init_projected_state(w, opt.state[w], opt.param_groups[0])
        state = opt.state[w]
        state["exp_avg"].copy_(torch.arange(1.0, 31.0).reshape(state["exp_avg"].shape))
        state["exp_avg_sq"].copy_(state["exp_avg"] ** 2)
        m, v = state["exp_avg"].clone(), state["exp_avg_sq"].clone()
        _move_moments(state, rules.MOMENT_KEYS["adamw"], {"exp_avg", "exp_avg_sq"}, P_old, P_new, policy, left)
        results[policy] = (m, v, state["exp_avg"], state["exp_avg_sq"])
    m, v, m_keep, v_keep = results["keep"]
    assert torch.equal(m_keep, m) and torch.equal(v_keep, v)
    _, _, m_reset, v_reset = results["reset"]
    assert not m_reset.any() and not v_reset.any()
    _, _, m_rot, v_rot = results["rotate"]
    # New coordinate 0 is old coordinate 2, new 1 is old 0, new 2 (e_4) is new: its moments start at zero.
    take = (lambda t, i: t[i]) if left else (lambda t, i: t[:, i])
    for new, old in ((0, 2), (1, 0)):
        assert torch.equal(take(m_rot, new), take(m, old)) and torch.equal(take(v_rot, new), take(v, old))
    assert not take(m_rot, 2).any() and not take(v_rot, 2).any()
