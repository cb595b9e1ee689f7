"""The update functions called directly, against their formulas written out here in plain dense math (float64).

``functional.projected_update`` and ``low_rank_update`` (one layer's GaLore-Adam step, with and without Fira's
residual) and the residual helpers ``residuals.channel_ratio`` and ``limit_growth``; elsewhere they are only reached
through the optimizer.
"""

from __future__ import annotations

import math

import torch

from lightning_lowrank.optim import ProjectedOptimizer
from lightning_lowrank.optim.update import functional
from lightning_lowrank.optim.update.residuals import RESIDUAL_NORM, channel_ratio, limit_growth

B1, B2, EPS, LR, WD = 0.9, 0.999, 1e-8, 0.01, 0.1


def _group(**options):
    w = torch.nn.Parameter(torch.zeros(4, 6, dtype=torch.float64))
    opt = ProjectedOptimizer([w], lr=LR, betas=(B1, B2), eps=EPS, weight_decay=WD, rank=2, **options)
    return opt.param_groups[0]


def _problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    G = [torch.randn(4, 6, generator=gen, dtype=torch.float64) for _ in range(3)]
    P = torch.linalg.qr(torch.randn(4, 2, generator=gen, dtype=torch.float64)).Q  # 4 < 6: P acts on the left
    return W, G, P


def test_projected_update_is_galore_adamw():
    """torch's AdamW form on R = Pᵀ G: decay W by (1 - lr wd), then W -= lr * scale * P (m̂ / (√v̂ + eps))."""
    group = _group(scale=0.25, adam_form="torch")
    W, grads, P = _problem()
    ours, moments, state = W.clone(), {"exp_avg": torch.zeros(2, 6, dtype=W.dtype)}, {}
    moments["exp_avg_sq"] = torch.zeros(2, 6, dtype=W.dtype)
    ref, m, v = W.clone(), torch.zeros(2, 6, dtype=W.dtype), torch.zeros(2, 6, dtype=W.dtype)
    for t, G in enumerate(grads, 1):
        functional.projected_update(ours, G, P, moments, state, group, "adamw", t)
        R = P.T @ G
        m = B1 * m + (1 - B1) * R
        v = B2 * v + (1 - B2) * R * R
        D = (m / (1 - B1**t)) / ((v / (1 - B2**t)).sqrt() + EPS)
        ref = ref * (1 - LR * WD) - LR * 0.25 * (P @ D)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-14)
    assert not state  # no residual, nothing kept besides the moments


def test_low_rank_update_takes_the_projected_gradient_as_given():
    """The same step from R = Pᵀ G handed over already projected (layer-wise accumulation, low-rank DDP)."""
    group = _group(scale=1.0, adam_form="torch")
    W, grads, P = _problem(1)
    ours = W.clone()
    moments = {"exp_avg": torch.zeros(2, 6, dtype=W.dtype), "exp_avg_sq": torch.zeros(2, 6, dtype=W.dtype)}
    ref, m, v = W.clone(), torch.zeros(2, 6, dtype=W.dtype), torch.zeros(2, 6, dtype=W.dtype)
    for t, G in enumerate(grads, 1):
        functional.low_rank_update(ours, P.T @ G, P, moments, group, "adamw", t)
        R = P.T @ G
        m = B1 * m + (1 - B1) * R
        v = B2 * v + (1 - B2) * R * R
        ref = ref * (1 - LR * WD) - LR * (P @ ((m / (1 - B1**t)) / ((v / (1 - B2**t)).sqrt() + EPS)))
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-14)


def test_projected_update_with_fira_is_fira_adamw():
    """Fira (its code's form): D = m / (√v + eps) without bias correction, step size lr √(1-β₂ᵗ)/(1-β₁ᵗ);
    W -= size * (scale P D + limit((G - scale P R) * φ)), φ = ‖D‖/(‖R‖+1e-8) per column; then W -= lr wd W."""
    scale, gamma = 0.25, 1.01
    group = _group(scale=scale, residual="fira")
    W, grads, P = _problem(2)
    ours, state = W.clone(), {}
    moments = {"exp_avg": torch.zeros(2, 6, dtype=W.dtype), "exp_avg_sq": torch.zeros(2, 6, dtype=W.dtype)}
    ref, m, v, last = W.clone(), torch.zeros(2, 6, dtype=W.dtype), torch.zeros(2, 6, dtype=W.dtype), None
    for t, G in enumerate(grads, 1):
        functional.projected_update(ours, G, P, moments, state, group, "adamw", t)
        R = P.T @ G
        m = B1 * m + (1 - B1) * R
        v = B2 * v + (1 - B2) * R * R
        D = m / (v.sqrt() + EPS)
        size = LR * math.sqrt(1 - B2**t) / (1 - B1**t)
        phi = torch.stack([D[:, j].norm() / (R[:, j].norm() + 1e-8) for j in range(6)]).reshape(1, 6)
        S = (G - scale * (P @ R)) * phi
        if last is not None:
            limiter = max(S.norm().item() / (last + 1e-8), gamma) / gamma
            S = S / limiter
        last = S.norm().item()
        ref = ref - size * scale * (P @ D) - size * S
        ref = ref - LR * WD * ref
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-13)
    assert math.isclose(state[RESIDUAL_NORM].item(), last, rel_tol=1e-12)


def test_channel_ratio_per_column_and_per_tensor():
    D = torch.tensor([[3.0, 0.0, 1.0], [4.0, 2.0, 0.0]], dtype=torch.float64)
    R = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 2.0]], dtype=torch.float64)
    left = channel_ratio(D, R, torch.Size([2, 3]))  # (2, 3): rows < columns, P on the left, one factor a column
    expected = torch.tensor([[5.0 / (1 + 1e-8), 2.0 / (1 + 1e-8), 1.0 / (2 + 1e-8)]], dtype=torch.float64)
    torch.testing.assert_close(left, expected, rtol=0, atol=1e-15)
    right = channel_ratio(D.T, R.T, torch.Size([3, 2]))  # (3, 2): P on the right, one factor a row
    torch.testing.assert_close(right, expected.T, rtol=0, atol=1e-15)
    whole = channel_ratio(D, R, torch.Size([2, 3]), tensor_wise=True)  # APOLLO-Mini: ‖D‖_F / (‖R‖_F + 1e-8)
    assert math.isclose(whole.item(), math.sqrt(30) / (math.sqrt(6) + 1e-8), rel_tol=1e-15)


def test_limit_growth_caps_the_norm_at_gamma_times_the_last():
    gamma, state = 1.01, {}
    first = torch.tensor([3.0, 4.0], dtype=torch.float64)
    assert torch.equal(limit_growth(first, state, gamma), first) and state[RESIDUAL_NORM].item() == 5.0
    grown = limit_growth(torch.tensor([30.0, 40.0], dtype=torch.float64), state, gamma)
    # limiter = max(50 / (5 + 1e-8), γ) / γ, so the norm becomes γ (5 + 1e-8): growth capped at γ per step
    torch.testing.assert_close(grown.norm(), torch.tensor(gamma * (5 + 1e-8), dtype=torch.float64), rtol=1e-15, atol=0)
    torch.testing.assert_close(state[RESIDUAL_NORM], grown.norm(), rtol=1e-15, atol=0)
    small = torch.tensor([0.3, 0.4], dtype=torch.float64)  # shrinking is never limited
    assert torch.equal(limit_growth(small, state, gamma), small) and state[RESIDUAL_NORM].item() == 0.5
