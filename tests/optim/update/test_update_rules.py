"""Inner rules, residuals and 8-bit moments against torch's optimizers and hand-worked first steps."""

import math

import pytest
import torch

from lightning_lowrank.optim import ProjectedOptimizer
from lightning_lowrank.optim.budget import rank_budget
from lightning_lowrank.optim.state import storage
from lightning_lowrank.optim.update.residuals import residual_update
from tests.roundtrip import assert_resumes_bit_for_bit


def _axis_aligned_then_random(shape, steps, seed=0):
    """First gradient's singular vectors are coordinate axes (so a full-rank SVD basis is a signed identity)."""
    d = min(shape)
    G0 = torch.zeros(shape)
    G0[range(d), range(d)] = torch.arange(d, 0, -1, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    return [G0] + [torch.randn(*shape, generator=g) for _ in range(steps - 1)]


def _run_pair(torch_opt_cls, kwargs, shape, steps=8, **ours_kw):
    """The same parameters stepped by a torch optimizer and by ProjectedOptimizer.from_optimizer of it."""
    torch.manual_seed(0)
    w_ref, b_ref = torch.nn.Parameter(torch.randn(*shape)), torch.nn.Parameter(torch.randn(shape[1]))
    w, b = torch.nn.Parameter(w_ref.detach().clone()), torch.nn.Parameter(b_ref.detach().clone())
    ref = torch_opt_cls([w_ref, b_ref], **kwargs)
    ours = ProjectedOptimizer.from_optimizer(
        torch_opt_cls([w, b], **kwargs), {w}, rank=min(shape), update_gap=10_000, **ours_kw
    )
    for G in _axis_aligned_then_random(shape, steps):
        gb = G.sum(0)
        w_ref.grad, b_ref.grad, w.grad, b.grad = G.clone(), gb.clone(), G.clone(), gb.clone()
        ref.step()
        ours.step()
    return (w_ref, b_ref), (w, b), ours


@pytest.mark.parametrize("shape", [(4, 6), (6, 4)])
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(lr=0.05, momentum=0.9, weight_decay=0.01),
        dict(lr=0.05, momentum=0.9, nesterov=True),
        dict(lr=0.05, momentum=0.8, dampening=0.3),
        dict(lr=0.05),
    ],
)
def test_projected_sgd_with_full_basis_matches_torch_sgd(shape, kwargs, monkeypatch):
    """Without momentum such a layer normally stays dense (projecting adds state to none); the rule's math is
    checked with that policy switched off."""
    monkeypatch.setattr(rank_budget, "keep_dense_where_projection_costs", lambda placements, budget, names: [])
    (w_ref, b_ref), (w, b), ours = _run_pair(torch.optim.SGD, kwargs, shape)
    assert ours.param_groups[0]["rule"] == "sgd" and ours.is_projected(w)
    torch.testing.assert_close(w.detach(), w_ref.detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(b.detach(), b_ref.detach(), atol=1e-6, rtol=0)
    # as torch: a momentum buffer only with momentum
    has_buffer = kwargs.get("momentum", 0) != 0
    assert ("momentum_buffer" in ours.state[w]) == ("momentum_buffer" in ours.state[b]) == has_buffer


@pytest.mark.parametrize("shape", [(4, 6), (6, 4)])
@pytest.mark.parametrize("kwargs", [dict(lr=0.01), dict(lr=0.05, weight_decay=0.1, d=2.0, beta2_decay=-0.6)])
def test_projected_adafactor_with_full_basis_matches_torch_adafactor(shape, kwargs, monkeypatch):
    """Adafactor's row/column statistics commute with signed permutations, so a signed-identity basis is exact.

    An SVD P costs more than dense Adafactor, so such a layer normally stays dense; the rule's math is checked with
    that policy switched off."""
    monkeypatch.setattr(rank_budget, "keep_dense_where_projection_costs", lambda placements, budget, names: [])
    (w_ref, b_ref), (w, b), ours = _run_pair(torch.optim.Adafactor, kwargs, shape)
    assert ours.is_projected(w)
    state = ours.state[w]
    d = min(shape)
    assert state["row_var"].shape == ((d, 1) if shape[0] <= shape[1] else (shape[0], 1))
    torch.testing.assert_close(w.detach(), w_ref.detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(b.detach(), b_ref.detach(), atol=1e-6, rtol=0)


def _first_step(residual, shape=(6, 10), rank=2, scale=0.25, lr=0.1, eps=1e-8, **kw):
    torch.manual_seed(1)
    W0 = torch.randn(*shape, dtype=torch.float64)
    G = torch.randn(*shape, dtype=torch.float64)
    w = torch.nn.Parameter(W0.clone())
    w.grad = G.clone()
    opt = ProjectedOptimizer([w], lr=lr, eps=eps, weight_decay=0.0, rank=rank, scale=scale, residual=residual, **kw)
    opt.step()
    U, _, Vh = torch.linalg.svd(G)
    left = shape[0] <= shape[1]
    P = U[:, :rank] if left else Vh[:rank].T
    R = P.T @ G if left else G @ P
    D = R / (R.abs() + eps)  # Adam's first step: m_hat / (sqrt(v_hat) + eps)
    back = P @ R if left else R @ P.T
    inside = P @ D if left else D @ P.T
    # transformers' form (Fira, APOLLO): D_hf = m / (sqrt(v) + eps), step size lr sqrt(1 - beta2) / (1 - beta1)
    D_hf = 0.1 * R / (math.sqrt(0.001) * R.abs() + eps)
    step_hf = lr * math.sqrt(0.001) / 0.1
    rank_axis = 0 if left else 1
    phi = D_hf.norm(dim=rank_axis, keepdim=True) / (R.norm(dim=rank_axis, keepdim=True) + 1e-8)
    inside_hf = P @ D_hf if left else D_hf @ P.T
    ref = dict(P=P, R=R, D=D, back=back, inside=inside, phi=phi, D_hf=D_hf, step_hf=step_hf, inside_hf=inside_hf)
    return W0, G, w.detach(), ref, opt, w


@pytest.mark.parametrize("shape", [(6, 10), (10, 6)])
def test_residual_none_frugal_fira_apollo_first_steps_by_hand(shape):
    lr, scale = 0.1, 0.25
    W0, G, W1, ref, _, _ = _first_step("none", shape)
    torch.testing.assert_close(W1, W0 - lr * scale * ref["inside"], atol=1e-9, rtol=0)
    W0, G, W1, ref, _, _ = _first_step("frugal", shape)
    expected = W0 - lr * scale * ref["inside"] - lr * torch.sign(G - ref["back"])
    torch.testing.assert_close(W1, expected, atol=1e-9, rtol=0)
    W0, G, W1, ref, _, _ = _first_step("frugal", shape, frugal_rule="sgd", residual_lr_scale=0.5)
    expected = W0 - lr * scale * ref["inside"] - 0.5 * lr * (G - ref["back"])
    torch.testing.assert_close(W1, expected, atol=1e-9, rtol=0)
    # Fira's code: alpha multiplies the projected part, inside the residual too: (G - alpha P R) phi
    W0, G, W1, ref, _, _ = _first_step("fira", shape)
    expected = W0 - ref["step_hf"] * (scale * ref["inside_hf"] + (G - scale * ref["back"]) * ref["phi"])
    torch.testing.assert_close(W1, expected, atol=1e-9, rtol=0)
    W0, G, W1, ref, _, _ = _first_step("apollo", shape, scale=4.0, projector="svd")
    torch.testing.assert_close(W1, W0 - ref["step_hf"] * math.sqrt(4.0) * G * ref["phi"], atol=1e-9, rtol=0)
    W0, G, W1, ref, _, _ = _first_step("apollo", shape, scale=4.0, rank=1, apollo_scale_type="tensor", projector="svd")
    phi = ref["D_hf"].norm() / (ref["R"].norm() + 1e-8)
    torch.testing.assert_close(W1, W0 - ref["step_hf"] * 2.0 * G * phi, atol=1e-9, rtol=0)


def test_frugal_with_an_empty_subspace_is_sign_sgd():
    G = torch.randn(5, 7)
    zero = torch.zeros(5, 7)
    group = dict(frugal_rule="signsgd", residual_lr_scale=1.0, apollo_scale_type="channel", limiter_gamma=1.01)
    update, factor = residual_update("frugal", G, torch.zeros(2, 7), torch.zeros(2, 7), zero, {}, group)
    assert torch.equal(update, G.sign()) and factor == 1.0


def test_norm_growth_limiter_caps_the_residual_norm():
    w = torch.nn.Parameter(torch.zeros(8, 12))
    opt = ProjectedOptimizer([w], lr=0.01, rank=2, residual="fira", update_gap=10_000, limiter_gamma=1.01)
    norms = []
    for k in range(4):
        w.grad = torch.randn(8, 12, generator=torch.Generator().manual_seed(k)) * (10.0**k)  # growing gradients
        opt.step()
        norms.append(opt.state[w]["residual_norm"].item())
    for a, b in zip(norms, norms[1:]):
        assert b <= 1.01 * a * (1 + 1e-6)


@pytest.mark.parametrize("shape", [(6, 10), (10, 6)])
def test_subset_norm_first_step_is_the_per_channel_normalized_gradient(shape):
    """Step 1: momentum = R, complement = G - P R, both divided by sqrt(sum of G^2 per channel): G / ||G||_channel."""
    torch.manual_seed(2)
    W0, G = torch.randn(*shape), torch.randn(*shape)
    w = torch.nn.Parameter(W0.clone())
    w.grad = G.clone()
    opt = ProjectedOptimizer([w], lr=0.1, eps=0.0, weight_decay=0.0, rank=2, scale=1.0, projected_rule="subset_norm")
    opt.step()
    axis = 0 if shape[0] <= shape[1] else 1
    expected = W0 - 0.1 * G / G.norm(dim=axis, keepdim=True)
    torch.testing.assert_close(w.detach(), expected, atol=1e-5, rtol=0)
    assert opt.state[w]["sum_sq"].shape == ((1, shape[1]) if axis == 0 else (shape[0], 1))


def _train(state_bits, steps=40, **kw):
    torch.manual_seed(0)
    target = torch.randn(32, 48)
    w = torch.nn.Parameter(torch.zeros(32, 48))
    b = torch.nn.Parameter(torch.zeros(48))
    opt = ProjectedOptimizer([w, b], lr=0.05, rank=8, update_gap=10, state_bits=state_bits, **kw)
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = ((x @ w + b - x @ target) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, opt, w, b


def test_8bit_moments_train_within_tolerance_of_fp32_and_use_a_quarter_of_the_bytes(monkeypatch):
    monkeypatch.setattr(storage, "MIN_QUANTIZED_NUMEL", 0)  # tiny tensors: quantize them anyway (see storage.py)
    fp32, opt32, w32, _ = _train(None)
    int8, opt8, w8, _ = _train(8)
    assert int8[-1] < 0.5 * int8[0]
    assert abs(int8[-1] - fp32[-1]) <= 0.01 * fp32[0]  # within 1% of the starting loss
    state = opt8.state[w8]
    assert state["exp_avg_codes"].dtype == torch.int8 and state["exp_avg_sq_codes"].dtype == torch.uint8
    assert "exp_avg" not in state
    moment_bytes_32 = sum(opt32.state[w32][k].numel() * 4 for k in ("exp_avg", "exp_avg_sq"))
    moment_bytes_8 = sum(
        state[f"{k}_{s}"].numel() * state[f"{k}_{s}"].element_size()
        for k in ("exp_avg", "exp_avg_sq")
        for s in ("codes", "absmax")
    )
    assert moment_bytes_8 <= moment_bytes_32 / 4 + 2 * 4 * math.ceil(8 * 48 / 256)


@pytest.mark.parametrize(
    "kw",
    [
        dict(state_bits=8),
        dict(residual="fira"),
        dict(residual="apollo", moments="keep"),  # APOLLO's Gaussian P (a seed chain) is not orthonormal
        dict(residual="apollo", projector="random"),
        dict(projected_rule="subset_norm"),
    ],
)
def test_checkpoint_round_trip_resumes_bit_exactly(kw):
    def make():
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(12, 20))
        return [w], ProjectedOptimizer([w], rank=3, update_gap=2, **{"moments": "rotate", **kw})

    grads = [[torch.randn(12, 20, generator=torch.Generator().manual_seed(i))] for i in range(7)]
    assert_resumes_bit_for_bit(make, grads)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(residual="galore"), "'none', 'frugal', 'fira', 'apollo'"),
        (dict(projected_rule="lion"), "projected_rule"),
        (dict(state_bits=4), "state_bits"),
        (dict(residual="fira", projected_rule="subset_norm"), "subset_norm"),
        (dict(frugal_rule="adam"), "frugal_rule"),
        (dict(momentum=1.0), "momentum"),
    ],
)
def test_bad_rule_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ProjectedOptimizer([torch.nn.Parameter(torch.randn(3, 3))], **kwargs)
