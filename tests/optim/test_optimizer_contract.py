"""torch.optim.Optimizer's contract, checked as torch's own optimizer tests (test/optim/test_optim.py) check it (issue
24: it must not change). Each check runs on ``ProjectedOptimizer`` (svd; dct with 8-bit state on layers whose
moments are quantized), ``LayerwiseProjectedOptimizer``, and torch's own ``AdamW``, the reference that the check
itself is right: state_dict round trips and continued runs, Python-number step counters, the step, state_dict and
load_state_dict hooks, ``add_param_group``, ``step(closure)`` and ``copy.deepcopy``.

Gradients are given, not computed: each step's closure backpropagates sum(p * g), whose gradient is exactly g, so
layer-wise mode (which updates in gradient hooks, during backward) sees the same gradients as the others.
"""

import copy
import io

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from lightning_lowrank.optim import ProjectedOptimizer
from lightning_lowrank.optim.layerwise import LayerwiseProjectedOptimizer

LR, WD = 1e-2, 1e-2
SMALL = [(48, 16), (48,), (12, 48), (12,)]  # projected on the right and on the left, and two dense vectors
# Moments of 512 x 8 and 8 x 512: 4096 elements, the fewest that 8-bit state quantizes (storage.MIN_QUANTIZED_NUMEL).
WIDE = [(512, 9), (512,), (10, 512)]
KINDS = {
    "torch-adamw": (SMALL, lambda params: torch.optim.AdamW(params, lr=LR, weight_decay=WD), {}),
    "svd": (
        SMALL,
        lambda params: ProjectedOptimizer(params, lr=LR, weight_decay=WD, rank=4, update_gap=3),
        {"rank": 2},
    ),
    "dct-8bit": (
        WIDE,
        lambda params: ProjectedOptimizer(
            params, lr=LR, weight_decay=WD, rank=8, update_gap=3, projector="dct", state_bits=8
        ),
        {"rank": 4},
    ),
    # Dense only, the SGD rule: counters advanced by this package (host_ints), not by torch's Adam.
    "dense-sgd": (
        SMALL,
        lambda params: ProjectedOptimizer(params, lr=LR, weight_decay=WD, rank=None, rule="sgd", momentum=0.9),
        {"momentum": 0.5},
    ),
    "layerwise": (
        SMALL,
        lambda params: LayerwiseProjectedOptimizer(params, lr=LR, weight_decay=WD, rank=4, update_gap=3),
        {"rank": 2},
    ),
}
OURS = [k for k in KINDS if k != "torch-adamw"]


def _params(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def _grads(shapes, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g) for s in shapes] for _ in range(steps)]


def _make(kind, params=None, seed=0):
    shapes, build, _ = KINDS[kind]
    params = _params(shapes, seed) if params is None else params
    opt = build(params)
    if isinstance(opt, LayerwiseProjectedOptimizer):
        opt.attach()
    return params, opt


def _closure(opt, params, grads):
    def closure():
        opt.zero_grad()
        loss = sum((p * g).sum() for p, g in zip(params, grads))
        loss.backward()
        return loss

    return closure


def _run(opt, params, grads):
    for g in grads:
        opt.step(_closure(opt, params, g))


def _all_params(opt):
    return [p for group in opt.param_groups for p in group["params"]]


def _clone_params(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def _assert_params_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x.detach(), y.detach()), f"{tuple(x.shape)}: max |diff| {(x - y).abs().max()}"


def _through_bytes(state_dict):
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _resumed(kind, edit=lambda sd: sd, split=4, steps=7):
    """(uninterrupted run, run saved after ``split`` steps, ``edit``-ed, loaded into a fresh optimizer and continued):
    their params and optimizers. 7 steps at update_gap 3 refresh at steps 0, 3 and 6: one before and one after."""
    shapes = KINDS[kind][0]
    grads = _grads(shapes, steps)
    params_a, opt_a = _make(kind)
    _run(opt_a, params_a, grads)
    params_b, opt_b = _make(kind)
    _run(opt_b, params_b, grads[:split])
    saved = edit(_through_bytes(opt_b.state_dict()))
    params_c, opt_c = _make(kind, _clone_params(params_b))
    opt_c.load_state_dict(saved)
    _run(opt_c, params_c, grads[split:])
    return (params_a, opt_a), (params_c, opt_c)


def _assert_same(a, b, where="state_dict"):
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: {set(a) ^ set(b)}"
        for key in a:
            _assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _without_differentiable(state_dict):
    """torch's ``Optimizer.__setstate__`` adds ``differentiable`` to the defaults at load, and our loader fills every
    group with the defaults it lacks, so a loaded ``ProjectedOptimizer`` has that group key and a fresh one not
    (``test_a_loaded_optimizer_has_the_group_keys_of_a_fresh_one``)."""
    for group in state_dict["param_groups"]:
        group.pop("differentiable", None)
    return state_dict


# -- state_dict round trip --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_round_trip_continues_bit_for_bit(kind):
    """torch's test_state_dict_deterministic: a copy loaded from the state dict (through torch.save and
    ``weights_only=True``) steps as the original, and ends with the same state dict."""
    (params_a, opt_a), (params_c, opt_c) = _resumed(kind)
    _assert_params_equal(params_a, params_c)
    _assert_same(_without_differentiable(opt_a.state_dict()), _without_differentiable(opt_c.state_dict()))


@pytest.mark.parametrize("kind", KINDS)
def test_a_loaded_optimizer_has_the_group_keys_of_a_fresh_one(kind):
    (_, opt_a), (_, opt_c) = _resumed(kind)
    assert [set(g) for g in opt_a.param_groups] == [set(g) for g in opt_c.param_groups]


@pytest.mark.parametrize("kind", KINDS)
def test_python_number_step_counters_load(kind):
    """torch's test_load_nontensor_step: a state dict whose ``step`` counters are Python numbers (as torch < 1.12
    wrote them) loads, into a fresh optimizer and into the same one, and the run goes on as if uninterrupted."""

    def numbers(state_dict):
        for state in state_dict["state"].values():
            state["step"] = state["step"].item()
        return state_dict

    (params_a, _), (params_c, opt_c) = _resumed(kind, numbers)
    _assert_params_equal(params_a, params_c)
    assert all(isinstance(s["step"], torch.Tensor) for s in opt_c.state.values())
    params, opt = _make(kind)
    _run(opt, params, _grads(KINDS[kind][0], 2))
    opt.load_state_dict(numbers(copy.deepcopy(opt.state_dict())))
    _run(opt, params, _grads(KINDS[kind][0], 1, seed=2))


def test_python_number_counters_of_a_lazy_hessian_load():
    """Sophia's probe count (``hessian_updates``), the other counter the state keeps as a tensor, loads from a
    Python number too."""
    shapes = SMALL
    grads = _grads(shapes, 5)

    def make(params=None):
        params = _params(shapes) if params is None else params
        return params, ProjectedOptimizer(params, lr=LR, rank=4, update_gap=3, preconditioner="lazy_hessian")

    def probe(opt, params, seed):
        g = torch.Generator().manual_seed(seed)
        opt.update_curvature(
            {p: torch.rand(opt.state[p]["exp_avg"].shape, generator=g) for p in params if opt.is_projected(p)}
        )

    def run(opt, params, steps):
        for i in steps:
            opt.step(_closure(opt, params, grads[i]))
            probe(opt, params, seed=10 + i)

    params_a, opt_a = make()
    run(opt_a, params_a, range(5))
    params_b, opt_b = make()
    run(opt_b, params_b, range(3))
    saved = _through_bytes(opt_b.state_dict())
    for state in saved["state"].values():
        for key in ("step", "hessian_updates"):
            if key in state:
                state[key] = state[key].item()
    assert any("hessian_updates" in s for s in saved["state"].values())
    params_c, opt_c = make(_clone_params(params_b))
    opt_c.load_state_dict(saved)
    run(opt_c, params_c, range(3, 5))
    _assert_params_equal(params_a, params_c)
    assert all(isinstance(t, torch.Tensor) for s in opt_c.state.values() for t in s.values())


# -- hooks ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_step_hooks_are_called_once_per_step_with_its_arguments(kind):
    """torch's test_step_pre_hook / test_step_post_hook / test_step_all_hooks: global pre, pre, post, global post,
    once per step, each with (optimizer, args, kwargs) of the call (args include the optimizer); a pre hook may
    replace them; removed hooks are not called."""
    params, opt = _make(kind)
    grads = _grads(KINDS[kind][0], 3)
    calls = []

    def hook(name):
        return lambda o, args, kwargs: calls.append((name, o, args, dict(kwargs)))

    handles = [
        register_optimizer_step_pre_hook(hook("global pre")),
        opt.register_step_pre_hook(hook("pre")),
        opt.register_step_post_hook(hook("post")),
        register_optimizer_step_post_hook(hook("global post")),
    ]
    try:
        first, second = _closure(opt, params, grads[0]), _closure(opt, params, grads[1])
        opt.step(first)
        opt.step(closure=second)
    finally:
        for handle in handles:
            handle.remove()
    order = ["global pre", "pre", "post", "global post"]
    assert [c[0] for c in calls] == order * 2
    assert all(c[1] is opt for c in calls)
    assert all(c[2] == (opt, first) and c[3] == {} for c in calls[:4])
    assert all(c[2] == (opt,) and c[3] == {"closure": second} for c in calls[4:])
    opt.step(_closure(opt, params, grads[2]))
    assert len(calls) == 8

    ran = []
    replacement = _closure(opt, params, grads[0])

    def replace(o, args, kwargs):
        return (o,), {"closure": lambda: ran.append("replacement") or replacement()}

    handle = opt.register_step_pre_hook(replace)
    opt.step(_closure(opt, params, grads[1]))
    handle.remove()
    assert ran == ["replacement"]


def _state_dict_pre_hook(optimizer):
    optimizer.state["test"] = 1


def _state_dict_post_hook(optimizer, state_dict):
    state_dict["ran_state_dict_pre_hook"] = "test" in state_dict["state"]
    state_dict["state"].pop("test", None)
    return state_dict


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_hooks(kind):
    """torch's test_state_dict_pre_hook, test_state_dict_post_hook and test_state_dict_pre_post_hook."""
    params, opt = _make(kind)
    _run(opt, params, _grads(KINDS[kind][0], 1))
    opt.register_state_dict_post_hook(_state_dict_post_hook)
    assert opt.state_dict()["ran_state_dict_pre_hook"] is False
    opt.register_state_dict_pre_hook(_state_dict_pre_hook)
    state_dict = opt.state_dict()
    assert state_dict["ran_state_dict_pre_hook"] is True and "test" not in state_dict["state"]

    _, bare = _make(kind)
    bare.register_state_dict_pre_hook(_state_dict_pre_hook)
    assert bare.state_dict()["state"]["test"] == 1


def _lr_002(optimizer, state_dict):
    state_dict["param_groups"][0]["lr"] = 0.002


def _lr_003_copy(optimizer, state_dict):
    state_dict = copy.deepcopy(state_dict)
    state_dict["param_groups"][0]["lr"] = 0.003
    return state_dict


@pytest.mark.parametrize("kind", KINDS)
def test_load_state_dict_pre_hooks(kind):
    """torch's test_load_state_dict_pre_hook_and_prepend: a pre hook edits the state dict in place or returns a new
    one; ``prepend=True`` runs first."""
    params, opt = _make(kind)
    _run(opt, params, _grads(KINDS[kind][0], 1))
    state_dict = opt.state_dict()
    opt.register_load_state_dict_pre_hook(_lr_002)
    opt.load_state_dict(state_dict)
    assert opt.param_groups[0]["lr"] == 0.002
    opt.register_load_state_dict_pre_hook(_lr_003_copy, prepend=True)
    opt.load_state_dict(state_dict)
    assert opt.param_groups[0]["lr"] == 0.002


@pytest.mark.parametrize("kind", KINDS)
def test_load_state_dict_post_hook_runs_after_the_pre_hooks(kind):
    """A post hook runs once, after loading, with the optimizer as the pre hooks left it; the optimizer steps on."""
    params, opt = _make(kind)
    grads = _grads(KINDS[kind][0], 2)
    _run(opt, params, grads[:1])
    seen = []
    opt.register_load_state_dict_pre_hook(_lr_003_copy)
    opt.register_load_state_dict_post_hook(lambda o: seen.append((o, o.param_groups[0]["lr"])))
    opt.load_state_dict(opt.state_dict())
    assert seen == [(opt, 0.003)]
    _run(opt, params, grads[1:])


@pytest.mark.parametrize("kind", KINDS)
def test_load_state_dict_post_hook_may_write_into_state(kind):
    """torch's test_load_state_dict_post_hook and test_load_state_dict_pre_post_hook, whose hooks put booleans under
    keys that are not parameters into ``optimizer.state``."""
    params, opt = _make(kind)
    _run(opt, params, _grads(KINDS[kind][0], 1))

    def post_hook(optimizer):
        optimizer.state["ran_load_state_dict_pre_hook2"] = optimizer.param_groups[0]["lr"] == 0.003
        optimizer.state["ran_load_state_dict_post_hook"] = True

    opt.register_load_state_dict_post_hook(post_hook)
    opt.load_state_dict(opt.state_dict())
    assert opt.state["ran_load_state_dict_post_hook"] and not opt.state["ran_load_state_dict_pre_hook2"]
    opt.register_load_state_dict_pre_hook(_lr_003_copy)
    opt.load_state_dict(opt.state_dict())
    assert opt.state["ran_load_state_dict_post_hook"] and opt.state["ran_load_state_dict_pre_hook2"]


# -- add_param_group, step(closure), deepcopy -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_add_param_group_steps_the_new_group_as_if_given_at_construction(kind):
    """A group added after some steps (with its own lr and, for ours, rank) is stepped from then on exactly as the
    same group given to the constructor (which adds its groups through ``add_param_group`` too, hence the check of
    the new weights' projection and rank); a parameter already in a group is refused."""
    shapes, build, low_rank = KINDS[kind]
    grads = _grads(shapes, 5)
    options = {"lr": LR / 2, **low_rank}
    head, tail = len(shapes) // 2, slice(len(shapes) // 2, None)

    params_a = _params(shapes)
    opt_a = build([{"params": params_a[:head]}, {"params": params_a[tail], **options}])
    params_b = _params(shapes)
    opt_b = build(params_b[:head])
    for opt in (opt_a, opt_b):
        if isinstance(opt, LayerwiseProjectedOptimizer):
            opt.attach()
    # Both see gradients only for the first group's parameters during the first two steps.
    for g in grads[:2]:
        for opt, params in ((opt_a, params_a), (opt_b, params_b)):
            opt.step(_closure(opt, params[:head], g[:head]))
    opt_b.add_param_group({"params": params_b[tail], **options})
    assert opt_b.param_groups[-1]["lr"] == LR / 2
    before = [p.detach().clone() for p in params_b[tail]]
    for g in grads[2:]:
        for opt, params in ((opt_a, params_a), (opt_b, params_b)):
            opt.step(_closure(opt, params, g))
    assert all(not torch.equal(p, q) for p, q in zip(params_b[tail], before))
    if "rank" in options:  # its weights are projected, at the group's own rank
        weights = [p for p in params_b[tail] if p.ndim == 2]
        assert weights and all(opt_b.is_projected(p) and opt_b.layer_rank(p) == options["rank"] for p in weights)
    _assert_params_equal(params_a, params_b)
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt_b.add_param_group({"params": params_b[:1]})


@pytest.mark.parametrize(
    "options,match",
    [
        ({"rank": 0}, "Invalid rank"),
        ({"projector": "nope"}, "projector"),
        ({"betas": (1.5, 0.9)}, "beta"),
        ({"state_bits": 4}, "state_bits"),
        ({"residual": "fira", "moments": "sideways"}, "moments"),
    ],
)
@pytest.mark.parametrize("kind", OURS)
def test_add_param_group_validates_the_options(kind, options, match):
    params, opt = _make(kind)
    with pytest.raises(ValueError, match=match):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(20, 30))], **options})


@pytest.mark.parametrize("kind", KINDS)
def test_step_returns_the_closure_loss_and_runs_it_with_grad_enabled(kind):
    params, opt = _make(kind)
    inner = _closure(opt, params, _grads(KINDS[kind][0], 1)[0])
    seen = []

    def closure():
        seen.append(torch.is_grad_enabled())
        seen.append(inner())
        return seen[-1]

    with torch.no_grad():
        loss = opt.step(closure)
    assert seen[0] is True and loss is seen[1]
    sentinel = object()
    assert opt.step(lambda: sentinel) is sentinel


@pytest.mark.parametrize("kind", KINDS)
def test_deepcopy_steps_identically(kind):
    """torch's test_deepcopy_copies_all_public_attrs, and the copy steps as the original (a layer-wise copy is
    detached: it is attached as a strategy would)."""
    shapes = KINDS[kind][0]
    grads = _grads(shapes, 7)
    params, opt = _make(kind)
    _run(opt, params, grads[:4])
    twin = copy.deepcopy(opt)

    def public(o):
        return {k for k in o.__dict__ if not k.startswith("_")}

    assert public(twin) == public(opt)
    if isinstance(twin, LayerwiseProjectedOptimizer):
        twin.attach()
    twin_params = _all_params(twin)
    assert all(p is not q for p, q in zip(twin_params, params))
    _run(opt, params, grads[4:])
    _run(twin, twin_params, grads[4:])
    _assert_params_equal(params, twin_params)
