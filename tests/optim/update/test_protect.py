"""Protected subspaces (Sculpting Subspaces): every update of a protected weight stays in the two-sided orthogonal
complement of its top-k singular directions, so those singular triples do not move. Checked against the projection
written out densely, and through the optimizer with each rule, with and without low-rank state, weight decay on."""

from __future__ import annotations

import copy

import pytest
import torch

from lightning_lowrank.optim import ProjectedOptimizer
from lightning_lowrank.optim.layerwise import LayerwiseProjectedOptimizer
from lightning_lowrank.optim.update import protect


def _orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=torch.float64)).Q


@pytest.mark.parametrize("k", [2, 5])  # 5 of 6 rows: the left side is kept as its 1-column complement
def test_confine_is_the_two_sided_complement_projection(k):
    U, V = _orthonormal(6, k, 0), _orthonormal(9, k, 1)
    X = torch.randn(6, 9, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    state: dict = {}
    protect.store_bases(state, torch.zeros(6, 9, dtype=torch.float64), U, V)
    assert (protect.LEFT_COMPLEMENT in state) == (6 - k < k) and (protect.RIGHT_COMPLEMENT in state) == (9 - k < k)
    expected = (torch.eye(6, dtype=torch.float64) - U @ U.T) @ X @ (torch.eye(9, dtype=torch.float64) - V @ V.T)
    torch.testing.assert_close(protect.confine(X, state), expected, rtol=0, atol=1e-13)
    assert protect.protected_rank(state, torch.zeros(6, 9)) == k


def _top(W: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    return U[:, :k], S[:k], Vh[:k].T


CASES = {
    "adamw dense": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1), dict(rank=None)),
    "adamw + svd rank 4": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1), dict(rank=4)),
    "adamw + dct rank 4, fira": (
        torch.optim.AdamW,
        dict(lr=1e-2, weight_decay=0.1),
        dict(rank=4, projector="dct", residual="fira"),
    ),
    "sgd momentum dense": (torch.optim.SGD, dict(lr=1e-2, momentum=0.9, weight_decay=0.1), dict(rank=None)),
    "adamw + svd 8-bit": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1), dict(rank=4, state_bits=8)),
}


def _train(case: str, protected: bool, steps: int = 6):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 32), torch.nn.Tanh(), torch.nn.Linear(32, 16))
    base, kwargs, options = CASES[case]
    opt = ProjectedOptimizer.from_optimizer(
        base(model.parameters(), **kwargs), lambda p: p.ndim == 2, update_gap=3, **options
    )
    W = model[0].weight
    k = 8
    U, S, V = _top(W.detach(), k)
    if protected:
        opt.protect({W: (U, V)})
    before = W.detach().clone()
    x = torch.randn(64, 24, generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    return W.detach(), before, (U, S, V), opt


@pytest.mark.parametrize("case", list(CASES))
def test_a_protected_weights_top_singular_triples_do_not_move(case):
    after, before, (U, S, V), opt = _train(case, protected=True)
    assert not torch.equal(after, before)  # it trained
    U2, S2, V2 = _top(after, 8)
    # float32 weights: relative 1e-5 on the singular values, and the subspaces equal up to signs
    torch.testing.assert_close(S2, S, rtol=1e-5, atol=0)
    torch.testing.assert_close((U.T @ U2).abs(), torch.eye(8, dtype=torch.float64), rtol=0, atol=1e-4)
    torch.testing.assert_close((V.T @ V2).abs(), torch.eye(8, dtype=torch.float64), rtol=0, atol=1e-4)
    torch.testing.assert_close(U.T @ after.double(), U.T @ before.double(), rtol=0, atol=1e-5)  # Uᵀ W is kept
    assert (
        opt.protected_params() == [opt.param_groups[0]["params"][0]]
        and opt.protected_rank(opt.protected_params()[0]) == 8
    )


@pytest.mark.parametrize("case", ["adamw dense", "adamw + svd rank 4"])
def test_without_protection_the_top_singular_values_move(case):
    """The check above can fail: the same training unprotected changes them."""
    after, _, (_, S, _), _ = _train(case, protected=False)
    assert (_top(after, 8)[1] - S).abs().max() > 1e-3


def test_bases_are_checkpointed_as_their_own_kind_and_a_resume_is_bit_for_bit():
    torch.manual_seed(0)
    model = torch.nn.Linear(24, 32)

    def make(m):
        adamw = torch.optim.AdamW(m.parameters(), weight_decay=0.1)
        return ProjectedOptimizer.from_optimizer(adamw, lambda p: p.ndim == 2, rank=4)

    opt = make(model)
    U, _, V = _top(model.weight.detach(), 14)  # k = 14 of 24 columns: the right side kept as its complement
    opt.protect({model.weight: (U, V)})
    assert opt.state_kinds(model.weight) == {"protect_u": "protected_bases", "protect_v_perp": "protected_bases"}
    x = torch.randn(8, 24)

    def step(m, o):
        o.zero_grad()
        m(x).pow(2).mean().backward()
        o.step()

    step(model, opt)
    twin = copy.deepcopy(model)
    saved = copy.deepcopy(opt.state_dict())
    resumed = make(twin)
    resumed.load_state_dict(saved)
    assert resumed.protected_params() == [twin.weight]
    for _ in range(3):
        step(model, opt)
        step(twin, resumed)
    assert torch.equal(model.weight, twin.weight) and torch.equal(model.bias, twin.bias)
    opt.unprotect()
    assert opt.protected_params() == [] and "protect_u" not in opt.state[model.weight]


def test_bad_bases_and_layerwise_are_refused():
    model = torch.nn.Linear(6, 4)
    opt = ProjectedOptimizer(model.parameters(), rank=2)
    with pytest.raises(ValueError, match="U \\(m x k\\) and V \\(n x k\\)"):
        opt.protect({model.weight: (torch.eye(4)[:, :2], torch.eye(5)[:, :2])})
    with pytest.raises(ValueError, match="between 1 and min"):
        opt.protect({model.weight: (torch.eye(4)[:, :0], torch.eye(6)[:, :0])})
    with pytest.raises(KeyError):
        opt.protect({torch.nn.Parameter(torch.zeros(4, 6)): (torch.eye(4)[:, :1], torch.eye(6)[:, :1])})
    layerwise = LayerwiseProjectedOptimizer(model.parameters(), rank=2)
    with pytest.raises(NotImplementedError, match="layerwise=True does not support protected subspaces"):
        layerwise.protect({model.weight: (torch.eye(4)[:, :1], torch.eye(6)[:, :1])})
