"""preconditioner="lazy_hessian": Sophia's clipped step in the subspace, against a dense Sophia written here."""

import pytest
import torch

from lightning_lowrank.curvature import subspace_diagonal
from lightning_lowrank.optim import ProjectedOptimizer
from lightning_lowrank.optim.state import storage
from lightning_lowrank.optim.state.storage import moment_view

M, N = 4, 6
LR, WD, BETA1, RHO, HBETA, EPS = 0.05, 0.1, 0.9, 0.5, 0.8, 1e-12


def _problem():
    """A separable loss sum(a w^4 / 12 + c w^2 / 2 + b w): its Hessian is diagonal, a w^2 + c, and changes with W.

    W starts at 0, so the first gradient is b = diag(s) Q with orthonormal rows Q and decreasing s: its left singular
    vectors are the identity up to signs, so the full-rank SVD subspace is the dense coordinate system.
    """
    g = torch.Generator().manual_seed(0)
    a = torch.rand(M, N, generator=g, dtype=torch.float64) * 3
    c = torch.rand(M, N, generator=g, dtype=torch.float64) - 0.3  # some negative curvature early on
    Q, _ = torch.linalg.qr(torch.randn(N, N, generator=g, dtype=torch.float64))
    b = torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)) @ Q[:M]
    return a, c, b


def _loss(W, a, c, b):
    return (a * W**4 / 12 + c * W**2 / 2 + b * W).sum()


def _dense_sophia(steps, every, a, c, b, hbeta=HBETA, bias_correction=True):
    """Sophia with decoupled decay, h = exact diagonal every `every` steps, EMA with explicit bias correction (or,
    ``bias_correction=False``, SophiaG's plain EMA h = hbeta h + (1 - hbeta) estimate from h = 0)."""
    W = torch.zeros(M, N, dtype=torch.float64)
    m = torch.zeros_like(W)
    h_raw = torch.zeros_like(W)
    h = torch.zeros_like(W)
    probes = 0
    for t in range(1, steps + 1):
        G = a * W**3 / 3 + c * W + b
        W = W * (1 - LR * WD)
        m = BETA1 * m + (1 - BETA1) * G
        ratio = m / torch.maximum(RHO * h, torch.full_like(h, EPS))
        W = W - LR * ratio.clamp(-1, 1)
        if t % every == 0:
            probes += 1
            h_raw = hbeta * h_raw + (1 - hbeta) * (a * W**2 + c)
            h = h_raw / (1 - hbeta**probes) if bias_correction else h_raw
    return W


def _projected_sophia(steps, every, a, c, b, samples=1, hbeta=HBETA, bias_correction=True):
    W = torch.zeros(M, N, dtype=torch.float64, requires_grad=True)
    opt = ProjectedOptimizer(
        [W], lr=LR, betas=(BETA1, 0.999), eps=EPS, weight_decay=WD, rank=M, update_gap=10_000,
        preconditioner="lazy_hessian", rho=RHO, hessian_beta=hbeta, hessian_bias_correction=bias_correction,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(1)
    for t in range(1, steps + 1):
        opt.zero_grad()
        _loss(W, a, c, b).backward()
        opt.step()
        if t % every == 0:
            (grad,) = torch.autograd.grad(_loss(W, a, c, b), [W], create_graph=True)
            (h,) = subspace_diagonal([grad], [W], [opt.projection_matrix(W)], samples, generator)
            opt.update_curvature({W: h})
    return W, opt


def test_full_basis_equals_dense_sophia():
    a, c, b = _problem()
    expected = _dense_sophia(40, 5, a, c, b)
    W, opt = _projected_sophia(40, 5, a, c, b)
    P = opt.projection_matrix(W)
    assert torch.allclose(P.abs(), torch.eye(M, dtype=P.dtype), atol=1e-12)  # the premise: a signed identity
    assert int(opt.state[W]["hessian_updates"]) == 8
    got = W.detach()
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    # and the update differs from plain projected AdamW on the same problem: the test can tell them apart
    assert not torch.allclose(got, _projected_adamw(40, a, c, b), atol=1e-3)


def test_uncorrected_hessian_ema_equals_dense_sophia():
    """hessian_bias_correction=False: SophiaG's / SophiaH's EMA from zero, beta 0.9, 7 probes over 14 steps."""
    a, c, b = _problem()
    expected = _dense_sophia(14, 2, a, c, b, hbeta=0.9, bias_correction=False)
    W, opt = _projected_sophia(14, 2, a, c, b, hbeta=0.9, bias_correction=False)
    assert int(opt.state[W]["hessian_updates"]) == 7
    got = W.detach()
    assert (got - expected).abs().max() <= 1e-10 * expected.abs().max()
    corrected = _projected_sophia(14, 2, a, c, b, hbeta=0.9)[0].detach()
    torch.testing.assert_close(corrected, _dense_sophia(14, 2, a, c, b, hbeta=0.9), rtol=1e-10, atol=0)
    assert (corrected - got).abs().max() > 1e-3  # the two EMAs lead to different weights


def test_uncorrected_hessian_ema_equals_installed_sophiag():
    """Against sophia-opt 0.2.2's SophiaG itself (a dev-only package) where curvature is positive, as its ratio
    |m| / (rho h + 1e-15) needs: its update_hessian folds p.grad^2, so p.grad carries the square root of h."""
    sophia_opt = pytest.importorskip("sophia_opt")
    a, c, b = _problem()
    c = c.abs() + 0.1

    def run(sophiag):
        W = torch.zeros(M, N, dtype=torch.float64, requires_grad=True)
        if sophiag:
            opt = sophia_opt.SophiaG([W], lr=LR, betas=(BETA1, 0.9), rho=RHO, weight_decay=WD)
        else:
            opt = ProjectedOptimizer(
                [W], lr=LR, betas=(BETA1, 0.999), eps=1e-15, weight_decay=WD, rank=M, update_gap=10_000,
                preconditioner="lazy_hessian", rho=RHO, hessian_beta=0.9, hessian_bias_correction=False,
            )  # fmt: skip
        for t in range(1, 31):
            opt.zero_grad()
            _loss(W, a, c, b).backward()
            opt.step(bs=1) if sophiag else opt.step()
            if t % 3 == 0:
                h = a * W.detach() ** 2 + c  # exact, and the same in the signed-identity subspace
                if sophiag:
                    W.grad = h.sqrt()
                    opt.update_hessian()
                else:
                    opt.update_curvature({W: h})
        return W.detach()

    expected = run(sophiag=True)
    assert (run(sophiag=False) - expected).abs().max() <= 1e-10 * expected.abs().max()


@pytest.mark.parametrize("bias_correction", [True, False])
def test_a_reset_refresh_restarts_the_hessian_ema(bias_correction):
    """moments="reset" zeroes h and the probe count: the next probe is taken whole (corrected) or as (1 - beta) of it
    (uncorrected, as a fresh EMA from zero); without a reset the EMA goes on across the refresh."""
    beta = 0.9
    for moments in ("reset", "keep"):
        torch.manual_seed(0)
        W = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
        opt = ProjectedOptimizer(
            [W], lr=0.01, rank=2, update_gap=2, preconditioner="lazy_hessian", moments=moments, hessian_beta=beta,
            hessian_bias_correction=bias_correction,
        )  # fmt: skip
        h1, h2 = torch.rand(2, 8, dtype=torch.float64), torch.rand(2, 8, dtype=torch.float64)
        W.grad = torch.randn(5, 8, dtype=torch.float64)
        opt.step()
        opt.update_curvature({W: h1})
        first = h1 if bias_correction else (1 - beta) * h1
        torch.testing.assert_close(opt.state[W]["hessian"], first)
        for _ in range(2):  # the second step refreshes (update_gap=2)
            W.grad = torch.randn(5, 8, dtype=torch.float64)
            opt.step()
        opt.update_curvature({W: h2})
        if moments == "reset":
            expected = h2 if bias_correction else (1 - beta) * h2
        else:
            weight = (1 - beta) / (1 - beta**2) if bias_correction else 1 - beta
            expected = first + weight * (h2 - first)
        torch.testing.assert_close(opt.state[W]["hessian"], expected)


def _projected_adamw(steps, a, c, b):
    W = torch.zeros(M, N, dtype=torch.float64, requires_grad=True)
    opt = ProjectedOptimizer([W], lr=LR, betas=(BETA1, 0.999), eps=EPS, weight_decay=WD, rank=M, update_gap=10_000)
    for _ in range(steps):
        opt.zero_grad()
        _loss(W, a, c, b).backward()
        opt.step()
    return W.detach()


def test_before_any_probe_the_step_is_a_clipped_sign_step():
    a, c, b = _problem()
    W, _ = _projected_sophia(1, 100, a, c, b)
    # h = 0: every coordinate is clipped, so W = -lr * sign(m) = -lr * sign(b) after one step (decay of 0 is 0)
    torch.testing.assert_close(W.detach(), -LR * torch.sign(b))


def test_curvature_rotates_with_the_subspace_like_a_variance():
    torch.manual_seed(0)
    W = torch.randn(5, 8, requires_grad=True)
    opt = ProjectedOptimizer([W], lr=0.01, rank=2, update_gap=1, preconditioner="lazy_hessian", moments="rotate")
    W.grad = torch.randn(5, 8)
    opt.step()
    P_old = opt.projection_matrix(W).clone()
    h = torch.rand(2, 8)
    opt.update_curvature({W: h})
    W.grad = torch.randn(5, 8)
    opt.step()  # refreshes (update_gap=1): h moves to the new basis before the step uses it
    R = P_old.T @ opt.projection_matrix(W)
    torch.testing.assert_close(opt.state[W]["hessian"], (R**2).T @ h)


def test_update_curvature_rejects_what_it_cannot_use():
    W = torch.randn(5, 8, requires_grad=True)
    plain = ProjectedOptimizer([W], rank=2)
    W.grad = torch.randn(5, 8)
    plain.step()
    with pytest.raises(ValueError, match="without a lazy Hessian"):
        plain.update_curvature({W: torch.ones(2, 8)})
    opt = ProjectedOptimizer([W], rank=2, preconditioner="lazy_hessian")
    opt.step()
    with pytest.raises(ValueError, match=r"must have shape \(2, 8\)"):
        opt.update_curvature({W: torch.ones(8, 2)})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(preconditioner="sophia"), "Unknown preconditioner"),
        (dict(preconditioner="lazy_hessian", projected_rule="subset_norm"), "is itself the projected rule"),
        (dict(preconditioner="lazy_hessian", rho=0), "Invalid rho"),
        (dict(preconditioner="lazy_hessian", hessian_beta=1.0), "Invalid hessian_beta"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ProjectedOptimizer([torch.zeros(3, 3, requires_grad=True)], **kwargs)


def test_with_8bit_state_the_curvature_is_stored_in_8_bits_and_read_back(monkeypatch):
    monkeypatch.setattr(storage, "MIN_QUANTIZED_NUMEL", 0)  # tiny tensors: quantize them anyway (see storage.py)
    torch.manual_seed(0)
    W = torch.randn(5, 8, requires_grad=True)
    opt = ProjectedOptimizer([W], lr=0.01, rank=2, preconditioner="lazy_hessian", state_bits=8)
    W.grad = torch.randn(5, 8)
    opt.step()
    h = torch.rand(2, 8) - 0.2  # a Hutchinson diagonal may be negative
    opt.update_curvature({W: h})
    assert "hessian" not in opt.state[W] and opt.state[W]["hessian_codes"].dtype in (torch.int8, torch.uint8)
    with moment_view(opt.state[W], "sophia", opt.param_groups[0], torch.float32) as moments:
        torch.testing.assert_close(moments["hessian"], h, atol=0.02, rtol=0.05)
