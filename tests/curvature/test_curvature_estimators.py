"""Curvature estimators checked against the exact Hessian of a tiny float64 MLP (torch.autograd.functional.hessian).

Stochastic estimators are given tolerances derived from their exact variance, computed here from the same Hessian:
a Rademacher quadratic form z^T A z has variance 2 * sum_{i != j} S_ij^2 with S = (A + A^T) / 2, and the diagonal
entry estimate z_k (A z)_k has variance sum_{l != k} A_kl^2. Every bound is a 5-sigma bound on the sample mean.
"""

from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.func import functional_call

from lightning_lowrank.curvature import hutchinson, hvp, rademacher_like, subspace_diagonal, top_eigenvalues

SIGMAS = 5.0


@dataclass
class Problem:
    params: list[torch.Tensor]
    loss_grads: list[torch.Tensor]
    hessian: torch.Tensor  # dense, over the params flattened row-major and concatenated
    offsets: list[tuple[int, int]]  # [start, stop) of each param in the flat vector


def _make_problem() -> Problem:
    """4 -> 6 -> 3 tanh MLP, cross-entropy on 16 fixed samples, 50 SGD steps in (a curvature-dominated point).

    W1 is 6x4 (right projection) and W2 is 3x6 (left projection), so both sides of subspace_diagonal are exercised.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(16, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (16,))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(50):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    names = [n for n, _ in model.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    offsets, start = [], 0
    for p in params:
        offsets.append((start, start + p.numel()))
        start += p.numel()

    def loss_of(tensors):
        return nn.functional.cross_entropy(functional_call(model, dict(zip(names, tensors)), (x,)), y)

    def loss_of_flat(flat):
        return loss_of([flat[a:b].reshape(p.shape) for (a, b), p in zip(offsets, params)])

    flat = torch.cat([p.detach().reshape(-1) for p in params])
    hessian = torch.autograd.functional.hessian(loss_of_flat, flat)
    loss_grads = list(torch.autograd.grad(loss_of(params), params, create_graph=True))
    return Problem(params=params, loss_grads=loss_grads, hessian=hessian, offsets=offsets)


@pytest.fixture
def problem() -> Problem:
    return _make_problem()


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _quadratic_form_std(a: torch.Tensor, samples: int) -> float:
    """Std of the sample mean of z^T A z over Rademacher z."""
    s = (a + a.T) / 2
    off = s - torch.diag(torch.diag(s))
    return float(torch.sqrt(2 * (off**2).sum() / samples))


def _diag_estimate_std(a: torch.Tensor, samples: int) -> torch.Tensor:
    """Per-entry std of the sample mean of z ⊙ (A z) over Rademacher z."""
    off = a - torch.diag(torch.diag(a))
    return torch.sqrt((off**2).sum(dim=1) / samples)


def test_problem_is_well_posed(problem):
    """Guard the fixture: a symmetric Hessian with a clear top eigenvalue and a trace far from zero."""
    h = problem.hessian
    assert torch.allclose(h, h.T, atol=1e-12)
    assert problem.hessian.trace() > 1.0
    assert all(p.grad is None for p in problem.params)


def test_hvp_matches_dense_hessian(problem):
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):  # repeated calls must work (graph retained) and stay exact
        vectors = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in problem.params]
        result = hvp(problem.loss_grads, problem.params, vectors)
        assert [r.shape for r in result] == [p.shape for p in problem.params]
        torch.testing.assert_close(_flat(result), problem.hessian @ _flat(vectors), atol=1e-10, rtol=0)
    assert all(p.grad is None for p in problem.params)


def test_rademacher_like_is_pm_one_and_uses_only_the_generator(problem):
    state = torch.get_rng_state()
    a = rademacher_like(problem.params, torch.Generator().manual_seed(3))
    b = rademacher_like(problem.params, torch.Generator().manual_seed(3))
    assert torch.equal(torch.get_rng_state(), state)
    for p, va, vb in zip(problem.params, a, b):
        assert va.shape == p.shape and va.dtype == p.dtype
        assert torch.equal(va, vb)
        assert torch.all(va.abs() == 1)
    both = _flat(a)
    assert (both == 1).any() and (both == -1).any()


def test_hutchinson_trace_layers_and_diagonal(problem):
    samples = 2000
    h = problem.hessian
    gen = torch.Generator().manual_seed(1234)
    state = torch.get_rng_state()
    result = hutchinson(problem.loss_grads, problem.params, samples, gen)
    assert torch.equal(torch.get_rng_state(), state), "hutchinson touched the global RNG"
    assert all(p.grad is None for p in problem.params)
    assert result.samples == samples

    # Trace: the stated 5% tolerance is justified only if it is at least 4 sigma of this estimator here.
    exact_trace = float(h.trace())
    sigma = _quadratic_form_std(h, samples)
    assert 4 * sigma <= 0.05 * abs(exact_trace), f"5% is not a 4-sigma bound: sigma={sigma}, trace={exact_trace}"
    assert abs(result.trace - exact_trace) <= 0.05 * abs(exact_trace)

    # Per-layer traces: z^T (rows of H for that layer) z, a quadratic form with its own variance.
    assert len(result.layer_traces) == len(problem.params)
    assert result.trace == pytest.approx(sum(result.layer_traces), rel=1e-12)
    for (a, b), estimate in zip(problem.offsets, result.layer_traces):
        rows = torch.zeros_like(h)
        rows[a:b] = h[a:b]
        exact = float(h[a:b, a:b].trace())
        assert abs(estimate - exact) <= SIGMAS * _quadratic_form_std(rows, samples) + 1e-12

    # Diagonal, entrywise 5-sigma.
    diag = _flat(result.diagonal)
    assert [d.shape for d in result.diagonal] == [p.shape for p in problem.params]
    err = (diag - torch.diag(h)).abs()
    bound = SIGMAS * _diag_estimate_std(h, samples) + 1e-12
    assert torch.all(err <= bound), f"worst error / bound = {float((err / bound).max())}"


def test_hutchinson_is_deterministic_given_seed(problem):
    a = hutchinson(problem.loss_grads, problem.params, 50, torch.Generator().manual_seed(7))
    b = hutchinson(problem.loss_grads, problem.params, 50, torch.Generator().manual_seed(7))
    c = hutchinson(problem.loss_grads, problem.params, 50, torch.Generator().manual_seed(8))
    assert a.trace == b.trace
    assert all(torch.equal(x, y) for x, y in zip(a.diagonal, b.diagonal))
    assert a.trace != c.trace


def test_hutchinson_single_sample_is_exact_quadratic_form(problem):
    """With one probe the estimates are v ⊙ Hv and v^T H v exactly: pins the formula, not just its mean."""
    result = hutchinson(problem.loss_grads, problem.params, 1, torch.Generator().manual_seed(5))
    v = _flat(rademacher_like(problem.params, torch.Generator().manual_seed(5)))
    hv = problem.hessian @ v
    torch.testing.assert_close(_flat(result.diagonal), v * hv, atol=1e-10, rtol=0)
    assert result.trace == pytest.approx(float(v @ hv), abs=1e-10)


def _exact_by_magnitude(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    evals, evecs = torch.linalg.eigh(h)
    order = evals.abs().argsort(descending=True)
    return evals[order], evecs[:, order]


def test_top_eigenvalue(problem):
    exact_vals, exact_vecs = _exact_by_magnitude(problem.hessian)
    assert float(torch.linalg.eigvalsh(problem.hessian).abs().max()) == pytest.approx(float(exact_vals[0].abs()))
    state = torch.get_rng_state()
    result = top_eigenvalues(problem.loss_grads, problem.params, 1, torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), state)
    assert all(p.grad is None for p in problem.params)
    assert len(result.eigenvalues) == 1 and 1 <= result.iterations <= 100
    assert result.eigenvalues[0] == pytest.approx(float(exact_vals[0]), rel=0.01)
    v = _flat(result.eigenvectors[0])
    assert float(v.norm()) == pytest.approx(1.0, abs=1e-10)
    assert abs(float(v @ exact_vecs[:, 0])) > 0.99


def test_top_three_eigenvalues_with_deflation(problem):
    exact_vals, _ = _exact_by_magnitude(problem.hessian)
    result = top_eigenvalues(problem.loss_grads, problem.params, 3, torch.Generator().manual_seed(0), max_iter=300)
    assert len(result.eigenvalues) == 3 and len(result.eigenvectors) == 3
    mags = [abs(e) for e in result.eigenvalues]
    assert mags == sorted(mags, reverse=True)
    for got, want in zip(result.eigenvalues, exact_vals[:3].tolist()):
        assert got == pytest.approx(want, rel=0.02)
    vecs = torch.stack([_flat(v) for v in result.eigenvectors])
    torch.testing.assert_close(vecs @ vecs.T, torch.eye(3, dtype=vecs.dtype), atol=1e-8, rtol=0)


def _random_orthogonal(n: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q[:, :cols].contiguous()


def _lift(param: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Matrix L with vec(v) = L vec(z) for the probe v = P z (left) or z P^T (right), row-major vec.

    Row-major vec(A X B) = (A ⊗ B^T) vec(X): left is P ⊗ I_n, right is I_m ⊗ P.
    """
    m, n = param.shape
    if m <= n:
        return torch.kron(basis, torch.eye(n, dtype=basis.dtype))
    return torch.kron(torch.eye(m, dtype=basis.dtype), basis)


def _subspace_operator(problem: Problem, bases) -> tuple[torch.Tensor, list[tuple[int, int] | None]]:
    """A = L^T H L over the concatenated low-rank coordinates of all params that have a basis.

    E[z ⊙ (L^T H L z)] = diag(A) is the exact reference; A's off-diagonal gives the estimator's variance (cross-param
    terms included, since all params are probed jointly).
    """
    h = problem.hessian
    blocks, slices, start = [], [], 0
    total = h.shape[0]
    for p, basis, (a, b) in zip(problem.params, bases, problem.offsets):
        if basis is None:
            slices.append(None)
            continue
        lift = _lift(p, basis)
        block = torch.zeros(total, lift.shape[1], dtype=h.dtype)
        block[a:b] = lift
        blocks.append(block)
        slices.append((start, start + lift.shape[1]))
        start += lift.shape[1]
    lift_all = torch.cat(blocks, dim=1)
    return lift_all.T @ h @ lift_all, slices


def _check_subspace(problem: Problem, bases, samples: int, seed: int) -> None:
    state = torch.get_rng_state()
    result = subspace_diagonal(problem.loss_grads, problem.params, bases, samples, torch.Generator().manual_seed(seed))
    assert torch.equal(torch.get_rng_state(), state)
    assert all(p.grad is None for p in problem.params)
    op, slices = _subspace_operator(problem, bases)
    bound_all = SIGMAS * _diag_estimate_std(op, samples) + 1e-12
    for p, basis, got, sl in zip(problem.params, bases, result, slices):
        if basis is None:
            assert got is None
            continue
        m, n = p.shape
        r = basis.shape[1]
        assert got.shape == ((r, n) if m <= n else (m, r))
        exact = torch.diag(op)[sl[0] : sl[1]].reshape(got.shape)
        err = (got - exact).abs()
        bound = bound_all[sl[0] : sl[1]].reshape(got.shape)
        assert torch.all(err <= bound), f"worst error / bound = {float((err / bound).max())}"


def test_subspace_diagonal_identity_basis_is_the_hessian_diagonal(problem):
    """With P = I the subspace coordinates are the param's own, so the reference is just diag(H) on that block."""
    w1, _, w2, _ = problem.params
    bases = [torch.eye(4, dtype=torch.float64), None, torch.eye(3, dtype=torch.float64), None]
    op, slices = _subspace_operator(problem, bases)
    for (a, b), sl in [(problem.offsets[0], slices[0]), (problem.offsets[2], slices[2])]:
        torch.testing.assert_close(torch.diag(op)[sl[0] : sl[1]], torch.diag(problem.hessian)[a:b])
    _check_subspace(problem, bases, samples=2000, seed=11)


def test_subspace_diagonal_random_orthogonal_basis(problem):
    bases = [_random_orthogonal(4, 4, 1), None, _random_orthogonal(3, 3, 2), None]
    op, slices = _subspace_operator(problem, bases)
    # Independent spelling of the left-side reference: entry (a, j) is (P^T H_jj P)_aa, H_jj the column-j block.
    w2_start, _ = problem.offsets[2]
    p2 = bases[2]
    h = problem.hessian
    left_ref = torch.empty(3, 6, dtype=torch.float64)
    for j in range(6):
        idx = [w2_start + i * 6 + j for i in range(3)]
        left_ref[:, j] = torch.diag(p2.T @ h[idx][:, idx] @ p2)
    torch.testing.assert_close(torch.diag(op)[slices[2][0] : slices[2][1]].reshape(3, 6), left_ref)
    # A full orthogonal basis mixes entries, so this reference must differ from the raw diagonal.
    assert not torch.allclose(left_ref.reshape(-1), torch.diag(h)[w2_start : w2_start + 18], atol=1e-3)
    _check_subspace(problem, bases, samples=2000, seed=12)


def test_subspace_diagonal_low_rank_basis(problem):
    bases = [_random_orthogonal(4, 2, 3), None, _random_orthogonal(3, 2, 4), None]
    _check_subspace(problem, bases, samples=2000, seed=13)


def test_subspace_diagonal_single_sample_is_exact(problem):
    """One probe: the result is z ⊙ (L^T H L z) with z drawn in the order the estimator draws it (params in order)."""
    bases = [_random_orthogonal(4, 3, 5), None, _random_orthogonal(3, 2, 6), None]
    result = subspace_diagonal(problem.loss_grads, problem.params, bases, 1, torch.Generator().manual_seed(9))
    gen = torch.Generator().manual_seed(9)
    z = torch.cat([(torch.randint(0, 2, s, generator=gen) * 2 - 1).double().reshape(-1) for s in [(6, 3), (2, 6)]])
    op, _ = _subspace_operator(problem, bases)
    torch.testing.assert_close(
        torch.cat([result[0].reshape(-1), result[2].reshape(-1)]), z * (op @ z), atol=1e-10, rtol=0
    )
    assert result[1] is None and result[3] is None


def test_subspace_diagonal_rejects_bad_bases(problem):
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError):
        subspace_diagonal(
            problem.loss_grads, problem.params, [torch.eye(6, dtype=torch.float64), None, None, None], 1, gen
        )
    with pytest.raises(ValueError):
        subspace_diagonal(
            problem.loss_grads, problem.params, [None, torch.eye(6, dtype=torch.float64), None, None], 1, gen
        )
    with pytest.raises(ValueError):
        subspace_diagonal(problem.loss_grads, problem.params, [None, None], 1, gen)
