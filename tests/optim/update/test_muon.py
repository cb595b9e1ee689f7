"""The ``muon`` rule: torch.optim.Muon taken over by ``from_optimizer``, dense or projected.

Dense (nothing projected) and through P = I it is torch's Muon bit for bit. Through any full orthonormal basis it is
Muon in exact arithmetic: checked in float64 against Muon written out below with a float64 Newton-Schulz. A
low-rank P is checked against the same formulas with the momentum kept in P's coordinates.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch.optim._muon import _single_tensor_muon

from lightning_lowrank.optim import ProjectedOptimizer
from lightning_lowrank.optim.update import functional

COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz64(X: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """torch's quintic iteration, written out in float64."""
    a, b, c = COEFFICIENTS
    Y = X.double()
    if X.shape[0] > X.shape[1]:
        Y = Y.T
    Y = Y / Y.norm().clamp(min=eps)
    for _ in range(steps):
        A = Y @ Y.T
        Y = a * Y + (b * A + c * A @ A) @ Y
    return Y.T if X.shape[0] > X.shape[1] else Y


class MuonReference:
    """Muon as torch documents it (B <- mu B + (1 - mu) g; Nesterov g + mu (B - g); decoupled decay; lr adjusted by
    the full shape), on the coordinates of a fixed basis P (None: the weight itself)."""

    def __init__(self, W, lr, wd, momentum=0.95, nesterov=True, adjust="original", P=None, left=False):
        self.W, self.lr, self.wd, self.mu, self.nesterov, self.P, self.left = W, lr, wd, momentum, nesterov, P, left
        rows, cols = W.shape
        self.adjusted = lr * (math.sqrt(max(1, rows / cols)) if adjust == "original" else 0.2 * math.sqrt(max(W.shape)))
        self.B = None

    def step(self, G):
        P = self.P
        g = G if P is None else (P.T @ G if self.left else G @ P)
        self.B = (1 - self.mu) * g if self.B is None else self.mu * self.B + (1 - self.mu) * g
        u = g + self.mu * (self.B - g) if self.nesterov else self.B
        ortho = newton_schulz64(u)
        ortho = ortho if P is None else (P @ ortho if self.left else ortho @ P.T)
        self.W = self.W * (1 - self.lr * self.wd) - self.adjusted * ortho
        return self.W


def _model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.Tanh(), torch.nn.Linear(24, 6)).to(dtype)


def _hidden(model):
    return [p for p in model.parameters() if p.ndim == 2]


def _train(model, opt, steps, seed=1):
    x = torch.randn(16, 12, generator=torch.Generator().manual_seed(seed), dtype=model[0].weight.dtype)
    for _ in range(steps):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("adjust_lr_fn", [None, "match_rms_adamw"])
def test_dense_muon_is_torchs_bit_for_bit(nesterov, adjust_lr_fn):
    ours, theirs = _model(), _model()
    kwargs = dict(lr=0.02, weight_decay=0.1, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn)
    opt = ProjectedOptimizer.from_optimizer(torch.optim.Muon(_hidden(ours), **kwargs), lambda p: False)
    ref = torch.optim.Muon(_hidden(theirs), **kwargs)
    _train(ours, opt, 4)
    _train(theirs, ref, 4)
    for a, b in zip(_hidden(ours), _hidden(theirs)):
        assert torch.equal(a, b)
    state = opt.state[ours[0].weight]
    assert torch.equal(state["momentum_buffer"], ref.state[theirs[0].weight]["momentum_buffer"])


def test_through_the_identity_it_is_torchs_muon_bit_for_bit():
    W = torch.randn(24, 12, generator=torch.Generator().manual_seed(0))
    ours, theirs = W.clone(), W.clone()
    group = dict(
        lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True, ns_coefficients=COEFFICIENTS, eps=1e-7, ns_steps=5,
        adjust_lr_fn=None, ns_dtype="bfloat16", scale=1.0, side="auto", residual="none", rule="muon",
        decoupled_weight_decay=True,
    )  # fmt: skip
    buf_ours, buf_theirs = torch.zeros(24, 12), torch.zeros(24, 12)
    for step in range(1, 4):
        G = torch.randn(24, 12, generator=torch.Generator().manual_seed(step))
        moments = {"momentum_buffer": buf_ours}
        functional.projected_update(ours, G, torch.eye(12), moments, {}, group, "muon", step)
        _single_tensor_muon(
            [theirs], [G], [buf_theirs], lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True,
            ns_coefficients=COEFFICIENTS, ns_steps=5, eps=1e-7, adjust_lr_fn=None, has_complex=False,
        )  # fmt: skip
        assert torch.equal(ours, theirs), step
        assert torch.equal(buf_ours, buf_theirs)


def _projected(model, rank, **options):
    base = torch.optim.Muon(_hidden(model), lr=0.02, weight_decay=0.1)
    return ProjectedOptimizer.from_optimizer(base, lambda p: p.ndim == 2, rank=rank, ns_dtype="float64", **options)


@pytest.mark.parametrize("moments", ["rotate", "reset"])
def test_a_full_orthonormal_basis_is_muon_in_float64(moments):
    """rank = min(m, n) with SVD bases, refreshed every 2 steps: momentum rotated into each new basis is Muon's
    (NS commutes with the change of basis); reset restarts it, which the reference does not, so it must differ."""
    ours = _model(torch.float64)
    opt = _projected(ours, rank=6, update_gap=2, moments=moments)
    layer = ours[2].weight  # 6 x 24: P on the left, 6 x 6, a full basis
    refs = [MuonReference(p.detach().clone(), 0.02, 0.1) for p in _hidden(ours)]
    x = torch.randn(16, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for _ in range(5):
        opt.zero_grad()
        ours(x).pow(2).mean().backward()
        grads = [p.grad.clone() for p in _hidden(ours)]
        opt.step()
        for ref, g in zip(refs, grads):  # the reference steps on our gradients, from its own weights
            ref.step(g)
    assert opt.is_projected(layer) and opt.state[layer]["momentum_buffer"].shape == (6, 24)
    error = (layer.detach() - refs[1].W).abs().max().item()
    if moments == "rotate":
        assert error < 1e-10
    else:
        assert error > 1e-6


def test_low_rank_muon_keeps_its_momentum_in_the_subspace_and_steps_by_the_full_shape():
    """A 24 x 12 weight at rank 4 (P on the right, 12 x 4; the buffer 24 x 4): with P fixed (no refresh) each step
    is Muon on G P mapped back, its lr adjusted by sqrt(24 / 12), not by the projection's shape."""
    model = _model(torch.float64)
    opt = _projected(model, rank=4, update_gap=1000)
    W = model[0].weight
    x = torch.randn(16, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    first = W.grad.clone()
    before = W.detach().clone()
    opt.step()
    P = opt.projection_matrix(W)
    assert P.shape == (12, 4) and opt.state[W]["momentum_buffer"].shape == (24, 4)
    ref = MuonReference(before, 0.02, 0.1, P=P)
    torch.testing.assert_close(W.detach(), ref.step(first), rtol=0, atol=1e-12)
    for _ in range(3):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        G = W.grad.clone()
        opt.step()
        torch.testing.assert_close(W.detach(), ref.step(G), rtol=0, atol=1e-12)


def test_eight_bit_momentum_and_a_resume_bit_for_bit():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 96), torch.nn.Tanh(), torch.nn.Linear(96, 8))
    opt = ProjectedOptimizer.from_optimizer(
        torch.optim.Muon(_hidden(model), lr=0.02), lambda p: p is model[0].weight, rank=48, state_bits=8
    )
    x = torch.randn(16, 128, generator=torch.Generator().manual_seed(1))

    def steps(m, o, n):
        for _ in range(n):
            o.zero_grad()
            m(x).pow(2).mean().backward()
            o.step()

    steps(model, opt, 3)
    assert "momentum_buffer" not in opt.state[model[0].weight]  # 48 x 128 >= 4096 elements: kept in 8 bits
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    twin = copy.deepcopy(model)
    again = ProjectedOptimizer.from_optimizer(
        torch.optim.Muon(_hidden(twin), lr=0.02), lambda p: p is twin[0].weight, rank=48, state_bits=8
    )
    buffer.seek(0)
    again.load_state_dict(torch.load(buffer, weights_only=True))
    steps(model, opt, 3)
    steps(twin, again, 3)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(residual="apollo"), "residual='apollo' does not apply to torch.optim.Muon"),
        (dict(projected_rule="subset_norm"), "projected_rule='subset_norm' does not apply"),
        (dict(preconditioner="lazy_hessian"), "preconditioner='lazy_hessian' does not apply"),
        (dict(ns_dtype="float16"), "ns_dtype"),
    ],
)
def test_options_muon_has_no_place_for_are_refused(options, match):
    model = _model()
    with pytest.raises(ValueError, match=match):
        ProjectedOptimizer.from_optimizer(torch.optim.Muon(_hidden(model)), lambda p: True, rank=4, **options)


def test_bad_newton_schulz_settings_are_refused_at_construction():
    model = _model()
    with pytest.raises(ValueError, match="ns_steps"):
        ProjectedOptimizer.from_optimizer(torch.optim.Muon(_hidden(model), ns_steps=100), lambda p: True, rank=4)
    with pytest.raises(ValueError, match="ns_coefficients"):
        ProjectedOptimizer.from_optimizer(
            torch.optim.Muon(_hidden(model), ns_coefficients=(1.0, 2.0)), lambda p: True, rank=4
        )


def test_muons_own_constraints_fail_at_construction():
    """A 1-D parameter is refused by torch's Muon itself (at configure_optimizers, before any step); a complex one,
    which torch's Muon refuses only at its first step, is refused when the projected optimizer is built."""
    with pytest.raises(ValueError, match="Muon only supports 2D parameters"):
        torch.optim.Muon([torch.nn.Parameter(torch.zeros(3))])
    W = torch.nn.Parameter(torch.zeros(4, 6, dtype=torch.complex64))
    with pytest.raises(ValueError, match="complex"):
        ProjectedOptimizer.from_optimizer(torch.optim.Muon([W]), lambda p: False)
