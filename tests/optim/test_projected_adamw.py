"""ProjectedAdamW against torch.optim.AdamW and hand-worked updates."""

import pytest
import torch

from lightning_lowrank.optim import ProjectedAdamW
from lightning_lowrank.optim.projection.bases import project, project_back
from lightning_lowrank.optim.update import rules
from tests.roundtrip import assert_resumes_bit_for_bit

HYPER = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)


def _grads(shape, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(steps)]


@pytest.mark.parametrize("shape", [(5, 7), (7, 5)])
@pytest.mark.parametrize("basis", ["identity", "signed_permutation"])
def test_rule_with_full_identity_like_basis_matches_torch_adamw(shape, basis):
    d = min(shape)
    if basis == "identity":
        P = torch.eye(d)
    else:  # Adam is elementwise, so it commutes with signed permutations of coordinates
        P = torch.eye(d)[torch.randperm(d, generator=torch.Generator().manual_seed(3))]
        P = P * torch.tensor([1.0, -1.0] * d)[:d]
    ref = torch.nn.Parameter(torch.randn(*shape))
    ours = ref.detach().clone()
    opt = torch.optim.AdamW([ref], **HYPER)
    low_shape = (d, shape[1]) if shape[0] <= shape[1] else (shape[0], d)
    state = rules.init_state("adamw", low_shape, torch.float32, torch.device("cpu"))
    group = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8)
    for t, G in enumerate(_grads(shape, 10), start=1):
        ref.grad = G.clone()
        opt.step()
        ours.mul_(1 - 1e-2 * 0.1)  # AdamW's decoupled decay
        direction, step_size = rules.direction("adamw", project(G, P), state, t, group)
        ours.add_(project_back(direction, P, ours.shape), alpha=-step_size)
    torch.testing.assert_close(ours, ref.detach(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape", [(4, 6), (6, 4)])
def test_class_with_full_rank_svd_on_axis_aligned_gradient_matches_adamw(shape):
    """First gradient's singular vectors are the coordinate axes, so the SVD basis is a signed identity."""
    d = min(shape)
    G0 = torch.zeros(shape)
    G0[range(d), range(d)] = torch.tensor([4.0, 3.0, 2.0, 1.0])[:d]
    grads = [G0] + _grads(shape, 9)
    w_ref = torch.nn.Parameter(torch.randn(*shape))
    w = torch.nn.Parameter(w_ref.detach().clone())
    ref = torch.optim.AdamW([w_ref], **HYPER)
    ours = ProjectedAdamW([w], **HYPER, rank=d, projector="svd", update_gap=1000)
    for G in grads:
        w_ref.grad, w.grad = G.clone(), G.clone()
        ref.step()
        ours.step()
    assert ours.state[w]["exp_avg"].shape == ((d, shape[1]) if shape[0] <= shape[1] else (shape[0], d))
    torch.testing.assert_close(w.detach(), w_ref.detach(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("cls,decoupled", [(torch.optim.AdamW, True), (torch.optim.Adam, False)])
def test_dense_parameters_match_torch(cls, decoupled):
    shapes = [(6,), (3, 4, 2), (5, 3)]
    ref_params = [torch.nn.Parameter(torch.randn(*s)) for s in shapes]
    params = [torch.nn.Parameter(p.detach().clone()) for p in ref_params]
    ref = cls(ref_params, **HYPER)
    ours = ProjectedAdamW(params, **HYPER, rank=None, decoupled_weight_decay=decoupled)
    for step in range(8):
        for i, (p, q) in enumerate(zip(ref_params, params)):
            g = torch.randn(p.shape, generator=torch.Generator().manual_seed(step * 10 + i))
            p.grad, q.grad = g.clone(), g.clone()
        ref.step()
        ours.step()
    for p, q in zip(ref_params, params):
        torch.testing.assert_close(q.detach(), p.detach(), atol=1e-6, rtol=0)


def test_first_projected_step_matches_hand_worked_update():
    """Step 1 of Adam is m_hat / (sqrt(v_hat) + eps) = R / (|R| + eps): almost sign(R), mapped back by P."""
    torch.manual_seed(0)
    W0 = torch.randn(6, 10, dtype=torch.float64)
    G = torch.randn(6, 10, dtype=torch.float64)
    w = torch.nn.Parameter(W0.clone())
    w.grad = G.clone()
    lr, scale, wd, eps = 0.1, 0.25, 0.01, 1e-8
    opt = ProjectedAdamW([w], lr=lr, betas=(0.9, 0.999), eps=eps, weight_decay=wd, rank=2, scale=scale)
    opt.step()
    U, _, _ = torch.linalg.svd(G)
    P = U[:, :2]
    R = P.T @ G
    expected = W0 * (1 - lr * wd) - lr * scale * P @ (R / (R.abs() + eps))
    torch.testing.assert_close(w.detach(), expected, atol=1e-9, rtol=0)


@pytest.mark.parametrize("projector", ["svd", "dct"])
def test_update_lies_in_the_subspace_and_refresh_follows_the_gap(projector):
    w = torch.nn.Parameter(torch.randn(8, 12))
    opt = ProjectedAdamW([w], lr=1e-2, weight_decay=0.0, rank=3, projector=projector, update_gap=3)
    key = "proj" if projector == "svd" else "proj_idx"
    seen = []
    for G in _grads((8, 12), 7, seed=5):
        before = w.detach().clone()
        w.grad = G
        opt.step()
        P = opt.projection_matrix(w)
        delta = w.detach() - before
        torch.testing.assert_close(P @ (P.T @ delta), delta, atol=1e-6, rtol=0)  # no component outside span(P)
        seen.append(opt.state[w][key].clone())
    changed = [t for t in range(1, 7) if not torch.equal(seen[t], seen[t - 1])]
    assert set(changed) <= {3, 6} and 3 in changed  # refreshes only at steps 0, 3, 6
    assert opt.state[w]["step"].item() == 7


def test_dct_state_holds_indices_only_and_moments_on_the_long_side():
    w = torch.nn.Parameter(torch.randn(20, 9))
    w.grad = torch.randn(20, 9)
    opt = ProjectedAdamW([w], rank=4, projector="dct")
    opt.step()
    state = opt.state[w]
    assert set(state) == {"step", "exp_avg", "exp_avg_sq", "proj_idx"}
    assert state["exp_avg"].shape == (20, 4) and state["proj_idx"].shape == (4,)


def test_rank_is_clamped_to_the_smaller_side():
    w = torch.nn.Parameter(torch.randn(3, 10))
    w.grad = torch.randn(3, 10)
    opt = ProjectedAdamW([w], rank=64)
    opt.step()
    assert opt.state[w]["exp_avg"].shape == (3, 10)


def test_closure_runs_first_and_loss_is_returned():
    w = torch.nn.Parameter(torch.ones(4, 4))
    opt = ProjectedAdamW([w], rank=2)
    calls = []

    def closure():
        calls.append(w.detach().clone())
        opt.zero_grad()
        loss = (w**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() == 16.0 and torch.equal(calls[0], torch.ones(4, 4))
    assert not torch.equal(w.detach(), torch.ones(4, 4))


def test_grad_scaler_skip_does_not_advance_the_schedule():
    w = torch.nn.Parameter(torch.randn(4, 6))
    opt = ProjectedAdamW([w], rank=2, update_gap=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    scaler.scale((w**2).sum()).backward()
    scaler.step(opt)  # finite grads: steps, calling step() without a closure
    scaler.update()
    assert opt.state[w]["step"].item() == 1
    opt.zero_grad()
    before = w.detach().clone()
    scaler.scale((w * float("inf")).sum()).backward()
    scaler.step(opt)  # inf grads: the scaler skips the step
    scaler.update()
    assert opt.state[w]["step"].item() == 1 and torch.equal(w.detach(), before)


@pytest.mark.parametrize("projector", ["svd", "dct"])
def test_state_dict_round_trip_with_weights_only_resumes_bit_for_bit(projector):
    def make():
        torch.manual_seed(0)
        ws = [torch.nn.Parameter(torch.randn(6, 9)), torch.nn.Parameter(torch.randn(9))]
        return ws, ProjectedAdamW(ws, rank=3, projector=projector, update_gap=2)

    grads = [[torch.randn(6, 9), torch.randn(9)] for _ in range(6)]
    assert_resumes_bit_for_bit(make, grads)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(rank=0), "rank"),
        (dict(rank=-3), "rank"),
        (dict(projector="pca"), "'svd', 'rsvd', 'dct', 'random', 'gaussian', 'online_pca'"),
        (dict(moments="rotate_all"), "'keep', 'reset', 'rotate'"),
        (dict(projector_bits=2), "None, 4, 8"),
        (dict(dct_scorer="dft"), "'matmul', 'fft'"),
        (dict(update_gap=0), "update_gap"),
        (dict(scale=0.0), "scale"),
        (dict(lr=-1.0), "learning rate"),
        (dict(betas=(0.9, 1.0)), "beta parameter at index 1"),
    ],
)
def test_bad_hyperparameters_raise_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ProjectedAdamW([torch.nn.Parameter(torch.randn(3, 3))], **kwargs)


def test_from_optimizer_rejects_unsupported_classes_and_flags():
    p = torch.nn.Parameter(torch.randn(3, 3))
    supported = "torch.optim.AdamW, torch.optim.Adam, torch.optim.SGD, torch.optim.Adafactor"
    with pytest.raises(TypeError, match=f"{supported}.*RMSprop.*fallback='dense'"):
        ProjectedAdamW.from_optimizer(torch.optim.RMSprop([p], lr=0.1), {p}, rank=2)
    with pytest.raises(ValueError, match="amsgrad"):
        ProjectedAdamW.from_optimizer(torch.optim.AdamW([p], amsgrad=True), {p}, rank=2)


def test_from_optimizer_shares_the_param_group_dicts():
    a, b = torch.nn.Parameter(torch.randn(4, 5)), torch.nn.Parameter(torch.randn(5))
    old = torch.optim.AdamW([{"params": [a, b], "lr": 0.3, "my_key": 1}], weight_decay=0.05)
    new = ProjectedAdamW.from_optimizer(old, {a}, rank=2)
    assert new.param_groups[0] is old.param_groups[0]
    assert new.param_groups[0]["lowrank_mask"] == [True, False]
    assert new.param_groups[0]["lr"] == 0.3 and new.param_groups[0]["weight_decay"] == 0.05
    assert new.is_projected(a) and not new.is_projected(b)


def test_loaded_dct_indices_stay_int64_for_half_precision_weights():
    """bf16 holds integers exactly only up to 256; indices must not be cast to the weight's dtype."""
    w = torch.nn.Parameter(torch.randn(600, 700).to(torch.bfloat16))
    w.grad = torch.randn(600, 700).to(torch.bfloat16)
    opt = ProjectedAdamW([w], rank=300, projector="dct")
    opt.step()
    saved = opt.state_dict()
    expected = opt.state[w]["proj_idx"].clone()
    assert expected.max() > 256
    fresh = ProjectedAdamW([w], rank=300, projector="dct")
    fresh.load_state_dict(saved)
    assert fresh.state[w]["proj_idx"].dtype == torch.int64
    assert torch.equal(fresh.state[w]["proj_idx"], expected)
