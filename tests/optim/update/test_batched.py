"""The multi-tensor step (``dispatch.projected_adam``) against GaLore-Adam written out per layer in plain dense math."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_lowrank.optim import ProjectedOptimizer
from lightning_lowrank.optim.update import dispatch

SHAPES = [(6, 10), (10, 6), (8, 8), (6, 10)]  # tall, wide, square (projects on the right), a second of one shape


def _reference(W, grads, rank, lr, betas, eps, wd, form, decoupled, scale, gap):
    """One layer, float64: P = top singular vectors on the smaller side (refreshed every ``gap``), Adam on P^T G or
    G P, the update mapped back; ``grads[t]`` is None where the layer got no gradient at step t."""
    W = W.clone()
    m = v = P = None
    t = 0
    beta1, beta2 = betas
    for G in grads:
        if G is None:
            continue
        left = W.shape[0] < W.shape[1]
        if t % gap == 0:  # the subspace of the raw gradient
            U, _, Vh = torch.linalg.svd(G, full_matrices=False)
            P = U[:, :rank] if left else Vh[:rank].T
        if not decoupled:  # Adam's L2 penalty, in either form
            G = G + wd * W
        if form == "torch" and decoupled:
            W = W * (1 - lr * wd)
        R = P.T @ G if left else G @ P
        if m is None:
            m, v = torch.zeros_like(R), torch.zeros_like(R)
        t += 1
        m = beta1 * m + (1 - beta1) * R
        v = beta2 * v + (1 - beta2) * R * R
        if form == "torch":
            N = (m / (1 - beta1**t)) / (v.sqrt() / math.sqrt(1 - beta2**t) + eps)
            size = lr
        else:
            N = m / (v.sqrt() + eps)
            size = lr * math.sqrt(1 - beta2**t) / (1 - beta1**t)
        W = W - size * scale * (P @ N if left else N @ P.T)
        if form == "hf" and decoupled:
            W = W - lr * wd * W
    return W


@pytest.mark.parametrize("form", ["torch", "hf"])
@pytest.mark.parametrize("decoupled", [True, False])
@pytest.mark.parametrize("chunk", [None, 40])  # 40 elements: each run of the multi-tensor pass holds 1 or 2 layers
def test_batched_step_matches_dense_galore_adam(form, decoupled, chunk, monkeypatch):
    if chunk is not None:
        monkeypatch.setattr(dispatch, "CHUNK_ELEMENTS", chunk)
    calls = []
    original_chunk = dispatch._projected_adam
    monkeypatch.setattr(dispatch, "_projected_adam", lambda *a, **k: (calls.append(len(a[0])), original_chunk(*a, **k)))
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    steps = 7
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES] for _ in range(steps)]
    grads[2][1] = grads[4][1] = None  # one layer skips steps: its counter differs from the others'
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    options = dict(lr=0.05, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, decoupled_weight_decay=decoupled)
    # svd_signs='none': the reference takes torch.linalg.svd's columns as they come, as galore-torch does
    opt = ProjectedOptimizer(params, rank=3, update_gap=3, scale=0.5, adam_form=form, svd_signs="none", **options)
    for step in grads:
        for p, g in zip(params, step):
            p.grad = g
        opt.step()
    # the layers did step together: all four in one run, or (small chunks) in runs that add up to them
    assert calls and (max(calls) == len(SHAPES) if chunk is None else 1 <= min(calls) and max(calls) <= 2)
    for i, (w, p) in enumerate(zip(weights, params)):
        expected = _reference(w, [s[i] for s in grads], 3, 0.05, (0.9, 0.99), 1e-8, 0.1, form, decoupled, 0.5, 3)
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "options",
    [dict(residual="fira"), dict(projected_rule="subset_norm"), dict(state_bits=8), dict(rule="sgd", momentum=0.9)],
)
def test_rules_the_batch_does_not_cover_step_one_layer_at_a_time(options, monkeypatch):
    monkeypatch.setattr(dispatch, "projected_adam", lambda *a, **k: pytest.fail("batched a rule it does not cover"))
    params = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    opt = ProjectedOptimizer(params, rank=2, **options)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(p.shape)
        opt.step()


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize(
    "sgd", [dict(momentum=0.9, nesterov=True, weight_decay=0.1), dict(momentum=0.8, dampening=0.3), dict()]
)
def test_dense_sgd_parameters_step_exactly_as_torch_sgd(sgd, foreach):
    """Dense parameters of an SGD group go through torch's own functional SGD: the same numbers as torch.optim.SGD."""
    gen = torch.Generator().manual_seed(1)
    shapes = [(5, 3), (3,), (4, 4)]
    ours = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = ProjectedOptimizer.from_optimizer(torch.optim.SGD(ours, lr=0.1, foreach=foreach, **sgd), set(), rank=2)
    ref = torch.optim.SGD(theirs, lr=0.1, foreach=foreach, **sgd)
    for _ in range(4):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn(a.shape, generator=gen, dtype=torch.float64)
            b.grad = a.grad.clone()
        opt.step()
        ref.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
