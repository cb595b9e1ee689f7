"""GaLore, Fira and APOLLO step for step against their reference code, transcribed here as plain dense math.

The references below are written from galore-torch 1.0 ``GaLoreAdamW``, fira 1.0.2 ``FiraAdamW`` and apollo-torch
1.0.3 ``APOLLOAdamW`` (transformers' AdamW form: eps added to sqrt(v), both bias corrections in the step size,
decoupled decay after the update), in float64 on a small MLP whose three weights are tall, wide and square, over 12
steps with refreshes every 4. The SVD bases are computed the same way on both sides; APOLLO's Gaussian bases are
drawn here from its seed chain (seed = parameter number from 1, then ``next_seed``), so no basis is shared.
``benchmarks/parity.py`` runs the installed packages themselves.
"""

import math

import pytest
import torch

from lightning_lowrank.optim import ProjectedOptimizer

STEPS, GAP, RANK = 12, 4, 5
LR, BETAS, EPS, WD = 1e-2, (0.9, 0.999), 1e-6, 0.1


def _mlp_weights():
    g = torch.Generator().manual_seed(0)
    shapes = [(24, 16), (16, 24), (16, 16)]  # tall, wide, square (nn.Linear's (out, in))
    return [torch.randn(*s, generator=g, dtype=torch.float64) / math.sqrt(s[1]) for s in shapes]


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 16, generator=g, dtype=torch.float64), torch.randn(32, 16, generator=g, dtype=torch.float64)


def _grads(weights, step):
    """Gradients of a small regression loss; the targets drift with the step so the subspaces move."""
    X, Y = _data()
    ws = [w.detach().clone().requires_grad_(True) for w in weights]
    h = torch.tanh(X @ ws[0].T)
    h = torch.tanh(h @ ws[1].T)
    loss = ((h @ ws[2].T - Y * (1 + 0.3 * math.sin(step))) ** 2).mean()
    return torch.autograd.grad(loss, ws)


# -- the references, transcribed -------------------------------------------------------------------------------------


def _svd_basis(G, rank):
    """GaLore's 'std' projection: right (Vh rows, r x n) for m >= n, left (U columns, m x r) otherwise."""
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    return Vh[:rank, :] if G.shape[0] >= G.shape[1] else U[:, :rank]


def _apollo_randn(shape, seed):
    """apollo-torch's stable_randn on CPU: float32 from a fresh generator."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def _apollo_next_seed(seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, torch.iinfo(torch.int64).max, (15,), generator=gen).tolist()[-1]


def _apollo_basis(G, rank, st):
    """APOLLO's random projection: N(0, 1) / sqrt(r) in float32, cast to the weight's dtype; then advance the seed."""
    right = G.shape[0] >= G.shape[1]
    shape = (rank, G.shape[1]) if right else (G.shape[0], rank)
    P = (_apollo_randn(shape, st["seed"]) / math.sqrt(rank)).to(G.dtype)
    st["seed"] = _apollo_next_seed(st["seed"])
    return P


def _project(G, P):
    return G @ P.T if G.shape[0] >= G.shape[1] else P.T @ G


def _project_back(R, P, full_shape):
    return R @ P if full_shape[0] >= full_shape[1] else P @ R


def _limit(S, st):
    """Fira's norm-growth limiter (also APOLLO's), gamma = 1.01."""
    if "last" in st:
        norm = S.norm()
        limiter = max(norm / (st["last"] + 1e-8), 1.01) / 1.01
        S = S / limiter
        st["last"] = norm / limiter
    else:
        st["last"] = S.norm()
    return S


def reference_step(kind, W, G, st, alpha, scale_type="channel", exact_complement=False):
    """One step of GaLoreAdamW / FiraAdamW / APOLLOAdamW on one projected weight."""
    st.setdefault("step", 0)
    if "P" not in st or st["step"] % GAP == 0:
        st["P"] = _apollo_basis(G, st["rank"], st) if kind == "apollo" else _svd_basis(G, st["rank"])
    P = st["P"]
    R = _project(G, P)
    if "m" not in st:
        st["m"], st["v"] = torch.zeros_like(R), torch.zeros_like(R)
    st["step"] += 1
    t = st["step"]
    st["m"].mul_(BETAS[0]).add_(R, alpha=1 - BETAS[0])
    st["v"].mul_(BETAS[1]).addcmul_(R, R, value=1 - BETAS[1])
    N = st["m"] / (st["v"].sqrt() + EPS)
    step_size = LR * math.sqrt(1 - BETAS[1] ** t) / (1 - BETAS[0] ** t)
    if kind == "galore":
        update = alpha * _project_back(N, P, G.shape)
    elif kind == "fira":
        dim = 0 if N.shape[0] < N.shape[1] else 1
        phi = N.norm(dim=dim) / (R.norm(dim=dim) + 1e-8)
        phi = phi.unsqueeze(1) if dim == 1 else phi
        inside = _project_back(R, P, G.shape) * (1.0 if exact_complement else alpha)
        S = _limit((G - inside) * phi, st)
        update = alpha * _project_back(N, P, G.shape) + S
    else:  # apollo
        dim = 0 if G.shape[0] < G.shape[1] else 1
        if scale_type == "channel":
            phi = N.norm(dim=dim) / (R.norm(dim=dim) + 1e-8)
            phi = phi.unsqueeze(1) if dim == 1 else phi
        else:
            phi = N.norm() / (R.norm() + 1e-8)
        update = _limit(G * phi, st) * math.sqrt(alpha)
    W.add_(update, alpha=-step_size)
    W.add_(W, alpha=-LR * WD)


# -- the comparison --------------------------------------------------------------------------------------------------


def _run_both(kind, alpha, rank=RANK, reference_exact=None, **options):
    """Ours with ``options`` against the reference (with the true complement when ``fira_complement="exact"``, unless
    ``reference_exact`` says otherwise): the relative difference after each step."""
    ref_w = _mlp_weights()
    ours_w = [torch.nn.Parameter(w.clone()) for w in _mlp_weights()]
    ref_states = [{"rank": min(rank, *w.shape), "seed": i + 1} for i, w in enumerate(ref_w)]
    residual = {"galore": "none"}.get(kind, kind)
    opt = ProjectedOptimizer(
        ours_w, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, rank=rank, update_gap=GAP, scale=alpha,
        residual=residual, **{"svd_signs": "none", **options},  # the references' raw SVD columns (galore-torch's)
    )  # fmt: skip
    worst = []
    for step in range(STEPS):
        for w, g in zip(ours_w, _grads(ours_w, step)):
            w.grad = g
        opt.step()
        for w, g, st in zip(ref_w, _grads(ref_w, step), ref_states):
            exact = options.get("fira_complement") == "exact" if reference_exact is None else reference_exact
            reference_step(kind, w, g, st, alpha, options.get("apollo_scale_type", "channel"), exact)
        worst.append(max(((a.detach() - b).norm() / b.norm()).item() for a, b in zip(ours_w, ref_w)))
    return worst, ref_w, opt


@pytest.mark.parametrize(
    "kind,alpha,options",
    [
        ("galore", 0.25, dict(adam_form="hf")),
        ("fira", 0.5, {}),
        ("fira", 1.0, {}),
        ("fira", 0.5, dict(fira_complement="exact")),  # our option: the true complement G - P P^T G
        ("apollo", 1.0, {}),
        ("apollo", 4.0, {}),
    ],
)
def test_matches_the_transcribed_reference_for_12_steps(kind, alpha, options):
    worst, _, opt = _run_both(kind, alpha, **options)
    assert max(worst) <= 1e-10, worst
    assert worst[-1] > 0 or kind == "galore"  # the weights did move identically, not stay put


def test_apollo_mini_matches_the_reference():
    """APOLLO-Mini: rank 1, one tensor-wise factor, scale 128."""
    worst, _, _ = _run_both("apollo", 128.0, rank=1, apollo_scale_type="tensor")
    assert max(worst) <= 1e-10, worst


def test_the_limiter_acts_in_the_compared_runs():
    """The comparison is only meaningful if Fira's limiter clips at some step (that is where ours used to differ)."""
    ref_w = _mlp_weights()
    st = {"rank": RANK}
    clipped = 0
    for step in range(STEPS):
        G = _grads(ref_w, step)[0]
        before = st.get("last")
        reference_step("fira", ref_w[0], G, st, 0.5)
        if before is not None and abs(st["last"] / before - 1.01) < 1e-6:  # limited to gamma times the last norm
            clipped += 1
    assert clipped >= STEPS // 2


@pytest.mark.parametrize("options", [dict(adam_form="torch"), dict(fira_complement="exact")])
def test_the_documented_deviations_differ_from_the_reference(options):
    """``adam_form="torch"`` (eps after the bias correction, the limiter on the corrected direction) and
    ``fira_complement="exact"`` are our options, one flag away from Fira's code; each changes the result."""
    worst, _, _ = _run_both("fira", 0.5, reference_exact=False, **options)
    assert max(worst) > 1e-8


def test_apollo_basis_is_apollos_gaussian_not_orthonormal():
    w = torch.nn.Parameter(torch.zeros(16, 24, dtype=torch.float64))
    w.grad = torch.randn(16, 24, dtype=torch.float64)
    opt = ProjectedOptimizer([w], rank=4, residual="apollo")
    opt.step()
    P = opt.projection_matrix(w)
    expected = (_apollo_randn((16, 4), 1) / 2.0).double()  # parameter 1, left projection (m < n): (m, r)
    torch.testing.assert_close(P, expected, atol=0, rtol=0)
    assert not torch.allclose(P.T @ P, torch.eye(4, dtype=torch.float64), atol=1e-3)
    assert opt.param_groups[0]["projector"] == "gaussian"
    assert "proj" not in opt.state[w] and opt.state[w]["proj_seed"].dtype == torch.int64  # stored as a seed


def test_gaussian_projector_refuses_rotated_moments():
    with pytest.raises(ValueError, match="orthonormal"):
        ProjectedOptimizer([torch.nn.Parameter(torch.zeros(4, 6))], residual="apollo", moments="rotate")
