"""``compile=`` and ``torch.compile(optimizer.step)`` (issue 24): the projected Adam(W) update compiles once per layer
shape and dtype, and never again as the step count, the learning rate or the bias corrections change.

Compilations are counted with dynamo's own counter of the graphs it hands a backend (``unique_graphs``), under the
``eager`` backend: dynamo traces and guards as it does for inductor, without inductor's code generation, so these run
in seconds on a CPU. The control test shows the counter catches what the compiled path avoids: today's multi-tensor
pass, whose step sizes are Python floats, compiles again at every step.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from lightning_lowrank import LowRankConfig, LowRankStrategy
from lightning_lowrank.optim import ProjectedOptimizer
from lightning_lowrank.optim.layerwise import LayerwiseProjectedOptimizer
from lightning_lowrank.optim.update import compiled, dispatch

SHAPES = [(6, 10), (10, 6), (8, 8), (6, 10)]  # tall, wide, square (projects on the right), a second of one shape
GRAPHS = 3  # one per distinct shape


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()  # the compiled function's cache is global: start every test from nothing
    counters.clear()
    yield
    torch._dynamo.reset()
    counters.clear()


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def _run(steps: int = 6, dtype: torch.dtype = torch.float32, user_backend: str | None = None, **options):
    """``steps`` steps of a ProjectedOptimizer over SHAPES, a new lr at each (an LR scheduler), the first layer
    skipping step 3 (its step count then trails the others'); refreshes at steps 1 and 5. Returns the final weights
    and, after each step, how many graphs dynamo has compiled."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(dtype)) for s in SHAPES]
    options = dict(lr=0.1, weight_decay=0.1, rank=3, update_gap=4) | options
    opt = ProjectedOptimizer(params, **options)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + s))
    step = opt.step if user_backend is None else torch.compile(opt.step, backend=user_backend)
    graphs = []
    for t in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(dtype)
        if t == 2:
            params[0].grad = None
        step()
        scheduler.step()
        graphs.append(_graphs())
    return [p.detach() for p in params], graphs, opt


def test_the_update_compiles_once_per_layer_shape_whatever_the_step_and_the_lr():
    _, graphs, _ = _run(compile="eager")
    assert graphs == [GRAPHS] * 6


def test_control_python_float_step_sizes_compile_again_at_every_step(monkeypatch):
    """What the test above would see if the step sizes were Python floats: today's multi-tensor pass
    (``dispatch._projected_adam``), compiled as it is, is compiled again at every step (its step counts and lr are
    constants of each graph)."""
    today = torch.compile(dispatch._projected_adam, backend="eager", dynamic=False)
    monkeypatch.setattr(dispatch, "_projected_adam", today)
    _, graphs, _ = _run()
    assert all(later > earlier for earlier, later in zip(graphs, graphs[1:])), graphs  # a new graph at every step


@pytest.mark.parametrize("adam_form", ["torch", "hf"])
@pytest.mark.parametrize("decoupled", [True, False])
@pytest.mark.parametrize("side", ["auto", "right"])
def test_compiled_updates_equal_the_eager_pass_up_to_rounding(adam_form, decoupled, side):
    options = dict(dtype=torch.float64, adam_form=adam_form, decoupled_weight_decay=decoupled, side=side, scale=0.5)
    eager, _, _ = _run(**options)
    compiled_, graphs, _ = _run(compile="eager", **options)
    for a, b in zip(eager, compiled_):
        torch.testing.assert_close(b, a, rtol=1e-13, atol=1e-15)
    assert graphs[-1] == graphs[0]


@pytest.mark.parametrize(("state_dtype", "moments"), [(None, torch.float32), ("bfloat16", torch.bfloat16)])
def test_bf16_weights_compile_with_float32_or_bf16_state(state_dtype, moments):
    """The eager multi-tensor pass needs the state in the weight's dtype; the compiled one casts the gradient, so bf16
    weights with their default float32 moments compile too, with the numbers of the eager single-layer path."""
    eager, _, _ = _run(dtype=torch.bfloat16, state_dtype=state_dtype)
    compiled_, graphs, opt = _run(dtype=torch.bfloat16, state_dtype=state_dtype, compile="eager")
    assert graphs == [GRAPHS] * 6
    assert all(opt.state[p]["exp_avg"].dtype == moments for p in opt.projected_params())
    exact, _, _ = _run(dtype=torch.float64)
    for a, b, x in zip(eager, compiled_, exact):
        if moments == torch.float32:
            torch.testing.assert_close(b, a)
        else:  # bf16 moments: each op of the traced graph rounds to bf16, where the eager addmm_ rounds once
            assert (b.double() - x).norm() < 2 * (a.double() - x).norm()


def test_torch_compile_of_optimizer_step_compiles_the_update(monkeypatch):
    """``torch.compile(opt.step)`` works: dynamo stops at the step (one graph break), which runs eagerly with its
    update compiled (inductor, counted here through the eager backend), and compiles no more after the first step."""
    asked = []
    build = compiled.compiled
    monkeypatch.setattr(compiled, "compiled", lambda backend: (asked.append(backend), build("eager"))[1])
    eager, _, _ = _run()
    weights, graphs, opt = _run(user_backend="eager")
    assert graphs == [GRAPHS] * 6
    assert set(asked) == {True} and opt.compile is False  # inductor asked for; the option as it was afterwards
    for a, b in zip(eager, weights):
        torch.testing.assert_close(b, a)


def test_torch_compile_of_optimizer_step_with_a_closure_returns_its_loss():
    w = torch.nn.Parameter(torch.randn(6, 10))
    opt = ProjectedOptimizer([w], rank=3, compile="eager")

    def closure():
        opt.zero_grad()
        loss = w.square().sum()
        loss.backward()
        return loss

    loss = torch.compile(opt.step, backend="eager")(closure)
    assert torch.is_tensor(loss) and opt.completed_steps(w) == 1


@pytest.mark.parametrize(("value", "match"), [("nope", "Unknown compile backend 'nope'"), (1, "Invalid compile: 1")])
def test_a_bad_compile_value_fails_at_construction(value, match):
    w = torch.nn.Parameter(torch.randn(6, 10))
    with pytest.raises(ValueError, match=match):
        ProjectedOptimizer([w], compile=value)
    with pytest.raises(ValueError, match=match):
        LowRankConfig(compile=value)


def test_layerwise_refuses_compile():
    w = torch.nn.Parameter(torch.randn(6, 10))
    with pytest.raises(ValueError, match="layerwise=True does not support compile"):
        LayerwiseProjectedOptimizer([w], compile=True)
    with pytest.raises(ValueError, match="layerwise=True does not support compile"):
        LowRankStrategy(layerwise=True, compile=True)
