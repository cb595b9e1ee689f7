"""The refresh schedule alone (plain Python) and driven by real refreshes of synthetic gradient streams."""

import pytest
import torch

from lightning_lowrank.optim import ProjectedAdamW
from lightning_lowrank.schedule import RefreshPolicy, RefreshSchedule


def _drive(schedule, opt, w, grads, name="w"):
    """What the callback does around each optimizer step."""
    for G in grads:
        if "step" in opt.state[w] and schedule.is_due(name, int(opt.state[w]["step"])):
            opt.request_refresh([w])
        w.grad = G
        opt.step()
        for info in opt.last_refreshes.values():
            schedule.record(name, info.step, info.similarity, info.seconds)


def _stream(kind, steps, d=64, n=80, r=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(d, r, generator=g)).Q
    for _ in range(steps):
        if kind == "fixed":  # same column space every step, new coefficients
            yield U @ torch.randn(r, n, generator=g) + 1e-3 * torch.randn(d, n, generator=g)
        else:  # unrelated directions every step
            yield torch.randn(d, n, generator=g)


@pytest.mark.parametrize("similarity", ["principal", "leading"])
def test_adaptive_gap_grows_for_a_fixed_subspace_and_stays_for_a_rotating_one(similarity):
    gaps = {}
    for kind in ("fixed", "rotating"):
        w = torch.nn.Parameter(torch.zeros(64, 80))  # in 64 dims unrelated directions have |cos| ~ 0.1
        opt = ProjectedAdamW([w], rank=3, projector="svd")
        opt.external_schedule()
        schedule = RefreshSchedule(RefreshPolicy(every=2, adaptive=True, queue_size=3, gamma_proj=2, max_gap=16))
        if similarity == "leading":
            original = schedule.record
            schedule.record = lambda name, step, sim, sec, _o=original, _opt=opt, _w=w: _o(
                name, step, _opt.last_refreshes[_w].leading_similarity, sec
            )
        _drive(schedule, opt, w, _stream(kind, 120))
        gaps[kind] = schedule.layers["w"]
    fixed, rotating = gaps["fixed"], gaps["rotating"]
    assert fixed.gap == 16  # doubled 2 -> 4 -> 8 -> 16 and capped
    assert rotating.gap == 2
    assert fixed.refreshes < rotating.refreshes == 60
    assert RefreshSchedule(RefreshPolicy(every=2)).skipped("w", 0) == 0


def test_fixed_gap_warmup_and_skipped_count():
    schedule = RefreshSchedule(RefreshPolicy(every=10, warmup=4, warmup_every=2))
    done = []
    for step in range(30):
        if schedule.is_due("a", step):
            schedule.record("a", step, similarity=0.9, seconds=0.5)
            done.append(step)
    assert done == [0, 2, 4, 14, 24]  # every 2 during the first 4 updates, then every 10
    layer = schedule.layers["a"]
    assert layer.refreshes == 5 and layer.seconds == 2.5 and layer.gap == 10
    assert schedule.skipped("a", 30) == 0  # a fixed 10-step gap would have done 3
    lazy = RefreshSchedule(RefreshPolicy(every=10, adaptive=True, queue_size=1, max_gap=40))
    for step in range(100):
        if lazy.is_due("a", step):
            lazy.record("a", step, similarity=1.0, seconds=0.0)
    # The first refresh has nothing to compare with, so it never enters the queue (as in Q-GaLore): refreshes at
    # 0, 10 (gap -> 20), 30 (-> 40), 70 (capped at 40), 110 would be next: 4 done where a fixed gap does 10.
    assert lazy.layers["a"].refreshes == 4 and lazy.skipped("a", 100) == 6


@pytest.mark.parametrize(
    "rule,done,gap",
    [
        # Q-GaLore: the next refresh is the next multiple of the gap (from the warm-up's end), the queue is kept so
        # the gap doubles at each refresh once full, and nothing caps it. 15 -> 19, not 23: 16 is a multiple of 8.
        ("qgalore", [0, 1, 2, 3, 7, 11, 15, 19, 35, 67, 131], 128),
        # Ours: gap after the last refresh, the queue starts over after a growth, capped at 16 x 4 (not reached).
        ("lazy", [0, 1, 2, 3, 7, 11, 15, 23, 31, 39, 55, 71, 87, 119], 32),
    ],
)
def test_the_two_lazy_rules_after_a_warmup(rule, done, gap):
    # Warm-up refreshes and the first regular one (at update 3) never enter the queue; with a queue of 3 the first
    # growth is at update 15 under both rules.
    policy = RefreshPolicy(every=4, warmup=3, warmup_every=1, adaptive=True, queue_size=3, rule=rule)
    schedule = RefreshSchedule(policy)
    steps = [step for step in range(140) if schedule.is_due("a", step) and schedule.record("a", step, 1.0, 0.0)]
    assert steps == done and schedule.layers["a"].gap == gap


def test_a_refresh_is_counted_once_and_state_round_trips():
    schedule = RefreshSchedule(RefreshPolicy(every=5, adaptive=True))
    assert schedule.record("a", 0, None, 0.1) and not schedule.record("a", 0, None, 0.1)
    schedule.record("a", 5, 0.7, 0.2)
    copy = RefreshSchedule(RefreshPolicy(every=5, adaptive=True))
    copy.load_state_dict(schedule.state_dict())
    assert copy.layers == schedule.layers


def test_per_layer_base_gaps():
    schedule = RefreshSchedule(RefreshPolicy(every=10), base_gaps={"attn": 3})
    schedule.record("attn", 0, None, 0.0)
    schedule.record("mlp", 0, None, 0.0)
    assert schedule.layers["attn"].next_refresh == 3 and schedule.layers["mlp"].next_refresh == 10


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(every=0), "every"),
        (dict(warmup=-1), "warmup"),
        (dict(cos_threshold=1.5), "cos_threshold"),
        (dict(gamma_proj=1.0), "gamma_proj"),
        (dict(queue_size=0), "queue_size"),
        (dict(every=10, max_gap=5), "max_gap"),
        (dict(rule="galore"), "rule must be one of 'lazy', 'qgalore'"),
        (dict(rule="qgalore", max_gap=400), "max_gap=400 contradicts rule='qgalore'"),
    ],
)
def test_bad_policy_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RefreshPolicy(**kwargs)
