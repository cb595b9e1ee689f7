"""Non-finite gradients (``nonfinite=``): a bad step is skipped whole, refused with a clear error, or applied.

"Skipped whole" is checked against an independent reference: the same run with that step left out. Every weight,
every state tensor and the refresh schedule must be exactly what they are when the bad step never happened.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from lightning_lowrank.optim import ProjectedOptimizer
from lightning_lowrank.optim.layerwise import LayerwiseProjectedOptimizer
from lightning_lowrank.optim.nonfinite import NonFiniteGradientError, _finite, finite_flag

CASES = {
    "svd": dict(),
    "dct": dict(projector="dct"),
    "online_pca": dict(projector="online_pca"),
    "8-bit state": dict(state_bits=8, state_block_size=16),
    "fira": dict(residual="fira"),
    "apollo": dict(residual="apollo"),
    "projector_bits 4": dict(projector_bits=4, proj_group_size=16),
    "memory_budget": dict(memory_budget=40_000, rank_by="residual"),
    "subset_norm": dict(projected_rule="subset_norm"),
}


def _model(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 48), nn.ReLU(), nn.Linear(48, 24), nn.Linear(24, 8)).to(dtype)


def _grads(model: nn.Module, steps: int) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [[torch.randn(p.shape, generator=g).to(p.dtype) for p in model.parameters()] for _ in range(steps)]


def _poison(grads: list[torch.Tensor], value: float = float("nan"), which: int = 2) -> list[torch.Tensor]:
    bad = [g.clone() for g in grads]
    bad[which].view(-1)[3] = value
    return bad


def _run(make, model, schedule) -> ProjectedOptimizer:
    opt = make(model)
    for grads in schedule:
        for p, g in zip(model.parameters(), grads):
            p.grad = g.clone()
        opt.step()
    return opt


def _snapshot(model, opt):
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict()["state"])


def _assert_same(a, b):
    (pa, sa), (pb, sb) = a, b
    for x, y in zip(pa, pb):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].keys() == sb[k].keys(), k
        for name in sa[k]:
            torch.testing.assert_close(sa[k][name], sb[k][name], rtol=0, atol=0, equal_nan=False)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("bad_at", [2, 4])  # 4 is a refresh step (update_gap=4): a refresh never sees a NaN
def test_a_skipped_step_leaves_the_run_as_if_it_never_happened(name, bad_at):
    def make(m):
        return ProjectedOptimizer.from_optimizer(
            torch.optim.AdamW(m.parameters(), lr=1e-2), lambda p: p.ndim == 2, rank=4, update_gap=4, **CASES[name]
        )

    grads = _grads(_model(), 8)
    with_bad = grads[:bad_at] + [_poison(grads[bad_at])] + grads[bad_at:]
    reference_model, model = _model(), _model()
    reference = _run(make, reference_model, grads)
    with pytest.warns(RuntimeWarning, match=r"skipped an optimizer step: the gradient of .* holds nan"):
        opt = _run(make, model, with_bad)
    assert opt.nonfinite_steps == 1
    _assert_same(_snapshot(model, opt), _snapshot(reference_model, reference))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_the_step_is_skipped_before_anything_is_touched_even_on_a_refresh():
    """Before: an SVD refresh on a NaN gradient crashed in linalg.svd with 8 dense parameters already updated."""
    model = _model()
    opt = ProjectedOptimizer.from_optimizer(torch.optim.AdamW(model.parameters()), lambda p: p.ndim == 2, rank=4)
    _run(lambda m: opt, model, _grads(model, 1))
    before = _snapshot(model, opt)
    for p, g in zip(model.parameters(), _poison(_grads(model, 1)[0], float("inf"), which=0)):
        p.grad = g
    opt.request_refresh(opt.projected_params())
    with pytest.warns(RuntimeWarning, match="holds inf"):
        opt.step()
    _assert_same(_snapshot(model, opt), before)
    assert opt.last_refreshes == {}
    assert opt.refresher.requests == set(opt.projected_params())  # still pending, for the next good step


def test_only_the_first_skip_warns():
    model = _model()
    opt = ProjectedOptimizer.from_optimizer(torch.optim.AdamW(model.parameters()), lambda p: p.ndim == 2, rank=4)
    bad = _poison(_grads(model, 1)[0])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _run(lambda m: opt, model, [bad, bad, bad])
    assert opt.nonfinite_steps == 3
    assert sum("skipped an optimizer step" in str(w.message) for w in caught) == 1


def test_raise_names_the_first_bad_parameter_and_applies_nothing():
    model = _model()
    opt = ProjectedOptimizer.from_optimizer(
        torch.optim.AdamW(model.parameters()), lambda p: p.ndim == 2, rank=4, nonfinite="raise"
    )
    opt.param_names.update({p: n for n, p in model.named_parameters()})
    _run(lambda m: opt, model, _grads(model, 2))
    before = _snapshot(model, opt)
    for p, g in zip(model.parameters(), _poison(_grads(model, 1)[0], which=2)):  # "2.weight", the 3rd tensor
        p.grad = g
    with pytest.raises(NonFiniteGradientError, match=r"'2\.weight' holds nan at its update 3 .*nothing was updated"):
        opt.step()
    _assert_same(_snapshot(model, opt), before)


def test_ignore_applies_the_step_as_torch_adamw_does():
    """The old behaviour, for speed: no check, the NaN goes into the weights (a refresh on it may fail)."""
    model, torch_model = _model(), _model()
    good, bad = _grads(model, 1)[0], _poison(_grads(model, 1)[0])
    ours = ProjectedOptimizer.from_optimizer(
        torch.optim.AdamW(model.parameters()), lambda p: p.ndim == 2, rank=4, nonfinite="ignore"
    )
    _run(lambda m: ours, model, [good, bad])
    _run(lambda m: torch.optim.AdamW(m.parameters()), torch_model, [good, bad])
    assert ours.nonfinite_steps == 0
    for p, q in zip(model.parameters(), torch_model.parameters()):
        assert torch.isnan(p).any() == torch.isnan(q).any()
    assert torch.isnan(model[2].weight).any()


def test_bf16_weights_are_checked_in_their_own_dtype():
    model = _model(torch.bfloat16)
    opt = ProjectedOptimizer.from_optimizer(torch.optim.AdamW(model.parameters()), lambda p: p.ndim == 2, rank=4)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.warns(RuntimeWarning):
        _run(lambda m: opt, model, [_poison(_grads(model, 1)[0], float("-inf"), which=5)])
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert opt.state[model[0].weight] == {}  # not even created


def test_finite_flag_over_mixed_dtypes():
    good = [torch.randn(3, 3), torch.randn(4).bfloat16(), torch.randn(2, dtype=torch.float64), torch.randn(5).half()]
    good[0][0, 0] = 3e38  # large but finite: no false alarm
    kept = [g.clone() for g in good]
    assert bool(finite_flag(good))
    for i, value in enumerate((float("nan"), float("inf"), float("-inf"), float("nan"))):
        bad = [g.clone() for g in good]
        bad[i].view(-1)[1] = value
        assert not bool(finite_flag(bad))
    assert finite_flag([]) is None
    assert all(torch.equal(a, b) for a, b in zip(good, kept))  # the check leaves the gradients as they are


@pytest.mark.parametrize("fused_norm", [True, False])  # the GPU's read-only max-norm and the CPU's AMP check
def test_both_kernels_of_the_check_agree(fused_norm):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        tensors = [torch.randn(4, 4).to(dtype), torch.randn(3).to(dtype)]
        assert bool(_finite(tensors, fused_norm))
        for value in (float("nan"), float("inf"), float("-inf")):
            bad = [t.clone() for t in tensors]
            bad[1][2] = value
            assert not bool(_finite(bad, fused_norm)), (dtype, value)


def test_a_grad_scaler_skip_never_reaches_the_optimizer():
    """GradScaler (16-mixed) finds the inf itself and does not call step(): our counters do not move and our own
    check does not count it; on its next good step the scaler calls us with finite, unscaled gradients."""
    model = _model()
    opt = ProjectedOptimizer.from_optimizer(torch.optim.AdamW(model.parameters()), lambda p: p.ndim == 2, rank=4)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x = torch.randn(4, 16)
    for loss_scale in (1.0, float("inf"), 1.0):
        opt.zero_grad()
        scaler.scale(model(x).pow(2).mean() * loss_scale).backward()
        scaler.step(opt)
        scaler.update()
    assert scaler.get_scale() == 2.0**9  # one skip halved it
    assert opt.completed_steps(model[0].weight) == 2
    assert opt.nonfinite_steps == 0


def _layerwise(model, **options):
    opt = LayerwiseProjectedOptimizer.from_optimizer(
        torch.optim.AdamW(model.parameters(), lr=1e-2), lambda p: p.ndim == 2, rank=4, **options
    )
    opt.param_names.update({p: n for n, p in model.named_parameters()})
    opt.attach()
    return opt


def _layerwise_step(model, opt, poison_output: bool):
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(3))

    def closure():
        loss = model(x).pow(2).mean()
        if poison_output:  # a term of the loss that only "2.weight" sees: only its gradient is NaN
            loss = loss + model[2].weight.sum() * float("nan")
        loss.backward()
        return loss

    opt.step(closure)


def test_layerwise_skips_each_bad_layer_and_counts_the_step_once():
    model = _model()
    opt = _layerwise(model)
    _layerwise_step(model, opt, poison_output=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    moments = {k: t.clone() for k, t in opt.state[model[2].weight].items()}
    with pytest.warns(RuntimeWarning, match="'2.weight' holds nan. Its update was skipped"):
        _layerwise_step(model, opt, poison_output=True)
    assert opt.nonfinite_steps == 1
    after = dict(model.named_parameters())
    assert torch.equal(after["2.weight"], before["2.weight"])  # the bad layer is untouched
    assert moments.keys() == opt.state[model[2].weight].keys()
    assert all(torch.equal(t, opt.state[model[2].weight][k]) for k, t in moments.items())  # moments and P too
    assert opt.completed_steps(after["2.weight"]) == 1
    assert not torch.equal(after["0.weight"], before["0.weight"])  # the layers with finite gradients stepped
    assert all(torch.isfinite(p).all() for p in model.parameters())
    opt.detach()


def test_layerwise_raise_says_earlier_layers_were_updated():
    """A first update is checked in its hook, before it is applied; a steady one at the end of the step, after the
    layers with finite gradients were updated and the bad layer's update was taken back."""
    model = _model()
    opt = _layerwise(model, nonfinite="raise")
    with pytest.raises(NonFiniteGradientError, match="'2.weight' holds nan.*earlier in this backward were already"):
        _layerwise_step(model, opt, poison_output=True)
    opt.detach()

    model = _model()
    opt = _layerwise(model, nonfinite="raise")
    _layerwise_step(model, opt, poison_output=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(NonFiniteGradientError, match="'2.weight' holds nan at its update 2.*finite gradients were upd"):
        _layerwise_step(model, opt, poison_output=True)
    after = dict(model.named_parameters())
    assert torch.equal(after["2.weight"], before["2.weight"])
    assert opt.completed_steps(after["2.weight"]) == 1
    assert not torch.equal(after["0.weight"], before["0.weight"])
    opt.detach()


def test_the_count_survives_a_checkpoint():
    model = _model()
    opt = ProjectedOptimizer.from_optimizer(torch.optim.AdamW(model.parameters()), lambda p: p.ndim == 2, rank=4)
    with pytest.warns(RuntimeWarning):
        _run(lambda m: opt, model, [_grads(model, 1)[0], _poison(_grads(model, 1)[0])])
    saved = copy.deepcopy(opt.state_dict())
    assert saved["nonfinite_steps"] == saved["param_groups"][0]["nonfinite_steps"] == 1
    assert "nonfinite_steps" not in opt.param_groups[0]  # only the saved copy of the group carries it
    resumed = ProjectedOptimizer.from_optimizer(torch.optim.AdamW(model.parameters()), lambda p: p.ndim == 2, rank=4)
    resumed.load_state_dict(saved)
    assert resumed.nonfinite_steps == 1
    # what a distributed checkpoint gives back: no top-level key, the count in the first group only
    dcp_like = {k: v for k, v in copy.deepcopy(saved).items() if k != "nonfinite_steps"}
    again = ProjectedOptimizer.from_optimizer(torch.optim.AdamW(model.parameters()), lambda p: p.ndim == 2, rank=4)
    again.load_state_dict(dcp_like)
    assert again.nonfinite_steps == 1 and all("nonfinite_steps" not in g for g in again.param_groups)
    assert (
        ProjectedOptimizer.from_optimizer(
            torch.optim.AdamW(model.parameters()), lambda p: p.ndim == 2, rank=4
        ).state_dict()["nonfinite_steps"]
        == 0
    )


@pytest.mark.parametrize("nonfinite", ["skip", "raise", "ignore"])
def test_a_sparse_gradient_is_refused_before_anything_is_updated(nonfinite):
    """One check, before the first update (also under ``nonfinite="ignore"``, where no finiteness check runs), and in
    layer-wise mode in the layer's own hook."""
    dense, embed = nn.Linear(8, 12), nn.Embedding(10, 12, sparse=True)
    opt = ProjectedOptimizer(
        [{"params": dense.parameters()}, {"params": embed.parameters()}], rank=2, nonfinite=nonfinite
    )
    before = [p.detach().clone() for p in dense.parameters()]
    (dense(torch.randn(3, 8)).sum() + embed(torch.tensor([1, 2])).sum()).backward()
    with pytest.raises(RuntimeError, match="do not support sparse gradients"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(dense.parameters(), before)) and not opt.state
    layerwise = LayerwiseProjectedOptimizer(embed.parameters(), rank=2, nonfinite=nonfinite)
    layerwise.attach()
    with pytest.raises(RuntimeError, match="do not support sparse gradients"):
        embed(torch.tensor([1, 2])).sum().backward()
