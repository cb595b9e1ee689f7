"""Checkpoints written by earlier versions resume as they must (issue 24, "What must not change").

The fixtures (tests/fixtures/checkpoints, written by tests/fixtures/make_checkpoints.py from a ``git archive`` of the
writing commit) hold a seeded model and ``ProjectedOptimizer`` after 4 steps (update_gap 3: a refresh inside), the
batches of 4 more steps (across another refresh) and the weights the writer reached after them. Each is loaded with
``torch.load(weights_only=True)`` and resumed by the package under test over those 4 steps.

* ``main_*``: written by main at b68acba (the code before the issue-24 restructure). They must resume bit for bit.
* ``v0.1.0_*``: written by 48c10d7, "0.1.0". pyproject has said 0.1.0 since the first commit and there is no tag; the
  first landing on main (stop 9: issues 2, 3 and 4 resolved together, issue 5 half done) ended at 93fcf3f, f7463ec or
  48c10d7 (the last commit before issue 5's second half, a5fcdb6), which write byte-identical fixtures. It is the
  oldest version with every option set here (svd, dct, 8-bit state, random projector, Fira); the first commit
  (4bc1ecc) had only ProjectedAdamW with svd/dct. No later commit resumed them bit for bit: a5fcdb6 up to fd574c7
  (exclusive) could not load them (KeyError on the options added since).

  They do NOT resume bit for bit against their writer on b68acba, for documented changes, so they are held to how
  b68acba resumes them (``v0.1.0_*.resumed.pt``, bit for bit) and to their writer within a few float32 ulps:
  - svd, dct, 8bit, random64: issue 14 steps a group's dense Adam(W) parameters through torch's functional Adam
    (foreach) and its projected Adam(W) layers in one multi-tensor pass with the decoupled decay fused into the
    back-projection (``addmm_(beta=1 - lr * wd)``): the same math, rounded differently (max 6e-8, |w| <= 0.4).
    With those two paths replaced by the one-layer path, all four resume bit for bit (checked by hand at b68acba).
  - fira: resumed with ``adam_form="torch"`` (0.1.0's form; ``None`` means transformers' form with Fira now); the
    norm-growth limiter was rewritten as Fira's formula (c2a96d9); within 5e-8.
  - random (float32): bases are drawn in float32 since 3537cea (0.1.0 drew in float64 and cast; CHANGELOG: "runs are
    not bit-identical to earlier versions"), so only the ``resumed.pt`` reference holds; ``random64`` (float64
    weights, still drawn in float64) covers the projector against the writer.

Bit for bit on the writer's platform only: each fixture carries a plain-torch canary, and a machine whose torch
computes other bits for it skips (rather than fails) these tests.
"""

import pytest
import torch

from tests import ROOT
from tests.fixtures.make_checkpoints import (
    CHANGED_DEFAULTS,
    RESUME_OPTIONS,
    RESUMED_SUFFIX,
    build_model,
    param_groups,
    platform_canary,
    resume,
)

FIXTURES = ROOT / "tests" / "fixtures" / "checkpoints"
CONFIGS = ("svd", "dct", "8bit", "random", "random64", "fira")
MAIN_COMMIT = "b68acbaa0779b1d15449b186795539dc3243357f"
TORCH_ADDED_GROUP_KEYS = ("differentiable",)
# Group options added after the fixtures were written: a loaded group takes their default (the behaviour it was
# saved with), and nothing else.
ADDED_GROUP_OPTIONS = {
    "protected_refresh": "complement",  # only protected weights read it; the fixtures have none
    "ns_dtype": "bfloat16",
    "ns_coefficients": (3.4445, -4.7750, 2.0315),
    "ns_steps": 5,
    "adjust_lr_fn": None,
    "trion_scaling": None,
    "svd_signs": "none",
}
V010_COMMIT = "48c10d76a6fe4ee26d29ba3ccfc31f68bf662269"


def _load(name: str) -> dict:
    fixture = torch.load(FIXTURES / name, weights_only=True)
    if not torch.equal(fixture["canary"], platform_canary()):
        pytest.skip(f"{name}: this machine's torch computes other bits than the writer's ({fixture['meta']['torch']})")
    return fixture


def _assert_equal(final: dict, expected: dict) -> None:
    assert final.keys() == expected.keys()
    for name, weight in final.items():
        assert torch.equal(weight, expected[name]), f"{name}: max |diff| {(weight - expected[name]).abs().max()}"


@pytest.mark.parametrize("config", CONFIGS)
def test_main_checkpoint_resumes_bit_for_bit(config):
    fixture = _load(f"main_{config}.pt")
    assert fixture["meta"]["commit"] == MAIN_COMMIT
    _assert_equal(resume(fixture, RESUME_OPTIONS.get(f"main_{config}")), fixture["final"])


@pytest.mark.parametrize("config", CONFIGS)
def test_main_checkpoint_loads_as_it_was_saved(config):
    """The loaded optimizer's ``state_dict()`` is the saved one: every key, value, dtype and bit (its groups may gain
    what torch's own loader adds: ``Optimizer.__setstate__`` puts ``differentiable`` in the defaults, and a loaded
    group takes the defaults it lacks)."""
    from lightning_lowrank.optim import ProjectedOptimizer

    fixture = _load(f"main_{config}.pt")
    meta = fixture["meta"]
    model = build_model(meta["model"], getattr(torch, meta["dtype"].removeprefix("torch.")))
    groups = param_groups(model, meta["model"], {**CHANGED_DEFAULTS, **meta["options"]})
    opt = ProjectedOptimizer(groups, lr=meta["lr"], weight_decay=meta["weight_decay"])
    opt.load_state_dict(fixture["optimizer"])
    loaded = opt.state_dict()
    for group in loaded["param_groups"]:
        for key in TORCH_ADDED_GROUP_KEYS:
            group.pop(key, None)
        for key, default in ADDED_GROUP_OPTIONS.items():  # a torch option of another rule is not added at all
            assert group.pop(key, default) == default, key
    _assert_same(loaded, fixture["optimizer"], "state_dict")


def _assert_same(a, b, where: str) -> None:
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.device == b.device and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("config", CONFIGS)
def test_v010_checkpoint_resumes_as_main_resumed_it(config):
    fixture = _load(f"v0.1.0_{config}.pt")
    reference = torch.load(FIXTURES / f"v0.1.0_{config}{RESUMED_SUFFIX}", weights_only=True)
    assert fixture["meta"]["commit"] == V010_COMMIT and reference["meta"]["commit"] == MAIN_COMMIT
    options = RESUME_OPTIONS.get(f"v0.1.0_{config}", {})
    assert reference["meta"]["options"] == options
    _assert_equal(resume(fixture, options), reference["final"])


@pytest.mark.parametrize("config", [c for c in CONFIGS if c != "random"])
def test_v010_checkpoint_resumes_within_ulps_of_its_writer(config):
    """Not bit for bit (the module doc says why): within 1e-6 of the writer's float32 weights (|w| ~ 0.1-0.3, the
    differences seen are <= 6e-8), 1e-12 of float64 ones; a wrong load (moments, P, counters) is far outside that."""
    fixture = _load(f"v0.1.0_{config}.pt")
    final = resume(fixture, RESUME_OPTIONS.get(f"v0.1.0_{config}"))
    for name, weight in final.items():
        atol = 1e-12 if weight.dtype == torch.float64 else 1e-6
        torch.testing.assert_close(weight, fixture["final"][name], rtol=0, atol=atol, msg=name)


@pytest.mark.parametrize("key", ["exp_avg", "proj"])
def test_a_one_ulp_change_of_the_saved_state_changes_the_result(key):
    """The fixtures are not vacuous: the resumed steps read the loaded moments and subspace."""
    fixture = _load("main_svd.pt")
    saved = fixture["optimizer"]["state"][0][key]
    flat = saved.view(-1)
    flat[0] = torch.nextafter(flat[0], torch.tensor(float("inf")))
    final = resume(fixture)
    assert any(not torch.equal(final[n], fixture["final"][n]) for n in final)
