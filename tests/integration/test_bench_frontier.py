"""The frontier study's harness (benchmarks/bench_frontier.py, bench_tuned.py): equal-memory ranks and the lr grid
widened past its edge."""

from __future__ import annotations

import sys
from types import SimpleNamespace

from tests import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_frontier as frontier  # noqa: E402
import bench_tuned  # noqa: E402


def test_the_equal_memory_dct_rank_is_the_largest_within_svds_bytes():
    """Small ByteLM at SVD rank 16: the DCT rank found holds no more state than SVD, one rank more would; and its
    bytes are what a by-hand count predicts: the same moments at rank r per weight, r int64 indices in place of a
    d x r float32 P, plus the shared d x d bases (d = 128 and 352)."""
    svd = frontier.state_bytes("small", rank=16, projector="svd")
    r = frontier.equal_memory_rank("small", 16)
    assert frontier.state_bytes("small", rank=r, projector="dct") <= svd
    assert frontier.state_bytes("small", rank=r + 1, projector="dct") > svd
    dct16 = frontier.state_bytes("small", rank=16, projector="dct")
    # 4 blocks x (q, k, v, o: P 128 x 16; gate, up: 352 x 128 -> P 128 x 16; down 128 x 352 -> P 128 x 16)
    p_bytes = 4 * 7 * 128 * 16 * 4
    index_bytes = 4 * 7 * 16 * 8
    shared = (128 * 128) * 4
    assert svd - dct16 == p_bytes - index_bytes - shared


def _args(widen: int) -> SimpleNamespace:
    return SimpleNamespace(methods=["m"], lrs=[1e-3, 3e-3, 1e-2], seeds=[0], tune_steps=1, widen=widen)


def _fake_runs(monkeypatch, loss_of):
    tried = []

    def run(name, lr, seed, steps, args):
        tried.append(lr)
        return SimpleNamespace(not_run="", diverged=False, val_loss=loss_of(lr))

    monkeypatch.setattr(bench_tuned, "_run", run)
    return tried


def test_the_grid_is_widened_while_the_best_lr_is_on_its_edge(monkeypatch):
    tried = _fake_runs(monkeypatch, lambda lr: abs(lr - 0.05))  # best at 0.05: beyond the grid's top
    best = bench_tuned.tune(_args(widen=2), log=lambda *_: None)
    assert len(tried) == 5 and tried[3] == 1e-2 * 1e-2 / 3e-3 and best["m"] == tried[3]  # 0.033, then 0.11: inside


def test_the_grid_is_not_widened_where_the_best_is_inside_or_widen_is_zero(monkeypatch):
    tried = _fake_runs(monkeypatch, lambda lr: abs(lr - 3e-3))
    assert bench_tuned.tune(_args(widen=2), log=lambda *_: None)["m"] == 3e-3 and len(tried) == 3
    tried = _fake_runs(monkeypatch, lambda lr: abs(lr - 0.05))
    assert bench_tuned.tune(_args(widen=0), log=lambda *_: None)["m"] == 1e-2 and len(tried) == 3


def test_every_memory_point_runs_three_seeds_and_only_the_grid_is_screened():
    """The equal-memory table compares the best SVD and DCT configuration at each point over every seed, so the
    configurations it may pick are never screened; the gap x moments grid's other cells are (seed 0, tuned lr), unless
    promoted."""
    tables = frontier.configs("small")
    screened = frontier.screened(tables)
    for name in tables["svd"] + tables["dct"] + ["adamw"]:
        assert name not in screened
    grid = tables["dct_grid"]
    assert {n for n in grid if n.endswith(("-g10-rotate", "-g50-keep", "-g100-keep"))}.isdisjoint(screened)
    assert len([n for n in grid if n in screened]) == len(grid) - 3 == 12
    order = sorted(tables["adamw"] + tables["svd"] + tables["dct"] + grid, key=lambda n: frontier.priority(n, tables))
    assert order[0] == "adamw" and all(n in screened for n in order[-12:])
    assert "dct-r39-g200-keep" not in frontier.screened(tables, promoted=["dct-r39-g200-keep"])


def test_a_refresh_is_amortised_over_its_gap():
    """By hand: 300 ms forward+backward, a 5 ms step, a 85 ms refresh step every 50: 300 + 5 + 80 / 50 = 306.6 ms."""
    assert abs(frontier.amortised(0.300, 0.005, 0.085, 50) - 0.3066) < 1e-12
    assert frontier.amortised(0.300, 0.005, 0.004, 10) == 0.305  # a refresh timed faster than a step adds nothing


def test_timing_runs_every_configuration_and_writes_its_file(tmp_path, monkeypatch):
    """``--time`` on two configurations, a few steps: a positive figure each, in the results file."""
    monkeypatch.setattr(frontier, "RESULTS", tmp_path)
    args = frontier.parse_args(["--model", "small", "--time-steps", "10", "--batch-size", "2"])
    tables = frontier.configs("small")
    names = ["svd-r16-g200-keep", "svd-r16-g50-keep"]
    assert all(n in tables["svd"] for n in names)
    timing = frontier.time_configs(args, names)
    assert set(timing) == {*names, *(f"{n}/optimizer" for n in names)} and all(t > 0 for t in timing.values())
    assert all(timing[n] > timing[f"{n}/optimizer"] for n in names)  # the step holds the forward and backward too
    assert (tmp_path / "frontier_small_timing.json").exists()


def test_differences_are_judged_against_the_spread_and_seed_by_seed():
    """Hand-made rows: overlapping ranges are 'within the spread', yet one higher on every seed says so, paired."""
    a = {"val_min": 1.512, "val_max": 1.559, "seeds": 3, "val_losses": [1.559, 1.512, 1.537]}
    b = {"val_min": 1.450, "val_max": 1.518, "seeds": 3, "val_losses": [1.518, 1.450, 1.483]}
    assert frontier._apart(a, b) == "within the spread; paired +0.052, higher on 3 of 3 seeds"
    c = {"val_min": 1.60, "val_max": 1.70, "seeds": 1, "val_losses": [1.60]}
    assert frontier._apart(c, b) == "higher, beyond the spread"
