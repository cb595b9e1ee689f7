"""The convergence benchmark's harness: peers get exactly the weights our strategy projects, and rows are honest."""

import math
import sys
from pathlib import Path

import pytest
import torch

from tests import ROOT

sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "examples")]
bench = pytest.importorskip("bench_convergence")


def test_peer_model_projects_the_strategy_selection_and_keeps_groups_and_schedule():
    seen = {}

    def fake_peer(groups, **kwargs):
        seen.update(groups=groups, kwargs=kwargs)
        return torch.optim.SGD(groups, lr=kwargs["lr"])

    model = bench.PeerByteLM(bench.ByteLMConfig(), lr=0.02, warmup_steps=4, max_steps=10)
    model.make_peer = fake_peer
    config = model.configure_optimizers()
    groups = seen["groups"]
    # Written out by hand from ByteLM's modules: every attention and MLP Linear, not the head or the embedding.
    expected = {
        p for block in model.layers for m in block.modules() if isinstance(m, torch.nn.Linear) for p in [m.weight]
    }
    projected = {p for g in groups if g.get("low") for p in g["params"]}
    assert projected == expected and len(expected) == 4 * 7  # q, k, v, o, gate, up, down per block
    everything = [p for g in groups for p in g["params"]]
    assert len(everything) == len(set(everything)) == len(list(model.parameters()))
    decay = {p for g in groups if g["weight_decay"] == 0.1 for p in g["params"]}
    assert decay == {p for p in model.parameters() if p.ndim >= 2}
    assert seen["kwargs"] == {"lr": 0.02, "betas": (0.9, 0.95), "eps": 1e-8}
    scheduler = config["lr_scheduler"]["scheduler"]
    assert scheduler.optimizer is config["optimizer"]
    assert scheduler.get_last_lr()[0] == pytest.approx(0.02 * 1 / 4)  # warmup step 1 of 4


def test_a_missing_peer_is_a_not_run_row_and_ratios_divide_by_adamw(monkeypatch):
    def unavailable(*args):
        raise bench.peers.PeerUnavailable("galore_torch is not installed")

    monkeypatch.setattr(bench, "peer_factory", unavailable)
    args = bench.parse_args(["--quick"])
    result = bench.train("galore", bench.RUNS["galore"], data=None, args=args)
    assert result.not_run == "galore_torch is not installed"
    adamw = bench.Result("adamw", bench.RUNS["adamw"], [3.0] * 10, val_loss=2.0, state_bytes=1000)
    ours = bench.Result("ours-svd", bench.RUNS["ours-svd"], [3.0] * 10, val_loss=2.5, state_bytes=250)
    rows = bench.table([adamw, ours, result]).splitlines()
    assert "| 2.500 | 1.250 |" in rows[3] and "| 0.250 |" in rows[3]
    assert "| galore | not run: galore_torch is not installed |" in rows[4]


def test_the_tuned_study_picks_each_methods_best_lr_and_averages_seeds(monkeypatch):
    """``bench_tuned``: the lr with the lowest seed-0 validation loss (a diverged one never), then the mean, min and
    max over seeds, over tuned AdamW's mean: checked against numbers made up here."""
    tuned = pytest.importorskip("bench_tuned")
    made_up = {  # (method, lr, seed) -> validation loss
        ("adamw", 1e-3, 0): 3.0, ("adamw", 1e-2, 0): 2.0, ("adamw", 1e-2, 1): 2.2,
        ("ours-dct", 1e-3, 0): 2.5, ("ours-dct", 1e-2, 0): math.nan, ("ours-dct", 1e-3, 1): 2.7,
    }  # fmt: skip

    def fake_run(name, lr, seed, steps, args):
        return bench.Result(name, bench.RUNS[name], [1.0] * steps, made_up[(name, lr, seed)], 100, float(steps))

    monkeypatch.setattr(tuned, "_run", fake_run)
    args = tuned.parse_args(["--methods", "adamw", "ours-dct", "--lrs", "1e-3", "1e-2", "--tune-steps", "2"])
    grid = {}
    lrs = tuned.tune(args, log=lambda *_: None, grid=grid)
    assert lrs == {"adamw": 1e-2, "ours-dct": 1e-3}  # ours-dct diverged at 1e-2 (NaN): never chosen
    assert tuned.tuning_table(grid, [1e-3, 1e-2]).splitlines()[2:] == [
        "| adamw | 3.0000 | **2.0000** |",
        "| ours-dct | **2.5000** | diverged |",
    ]
    results = {name: [fake_run(name, lr, seed, 4, args) for seed in (0, 1)] for name, lr in lrs.items()}
    rows = {r["name"]: r for r in tuned.summarise(results, lrs)}
    assert rows["adamw"]["val_mean"] == pytest.approx(2.1) and rows["adamw"]["vs_adamw"] == pytest.approx(1.0)
    assert (rows["ours-dct"]["val_min"], rows["ours-dct"]["val_max"]) == (2.5, 2.7)
    assert rows["ours-dct"]["vs_adamw"] == pytest.approx(2.6 / 2.1)
    assert rows["ours-dct"]["seconds_per_step"] == pytest.approx(1.0)
    assert rows["ours-dct"]["ppl_vs_adamw"] == pytest.approx(math.exp(0.5))  # mean loss 2.6 against 2.1
    line = tuned.table(list(rows.values()), {"galore": "why"}).splitlines()[3]
    assert "| 2.6000 (2.5000 - 2.7000) | 1.238 | 1.649 |" in line and "| 1.000 (1.000 - 1.000) |" in line


def test_the_tuned_study_cache_skips_finished_runs_and_keeps_settings_apart(monkeypatch, tmp_path):
    """``--cache``: a finished run is appended once and read back (not retrained) by a later process; a run with
    another batch size is another run. A NaN loss survives the round trip."""
    tuned = pytest.importorskip("bench_tuned")
    trained = []

    def fake_train(name, lr, seed, steps, args):
        trained.append((name, lr, seed, steps, args.batch_size))
        return bench.Result(name, bench.RUNS[name], [1.5, math.nan], 2.25 + seed, 640, 3.0)

    monkeypatch.setattr(tuned, "_train", fake_train)
    cache = str(tmp_path / "runs.jsonl")
    args = tuned.parse_args(["--methods", "ours-dct", "--cache", cache, "--batch-size", "4"])
    first = tuned._run("ours-dct", 3e-3, 1, 7, args)
    again = tuned._run("ours-dct", 3e-3, 1, 7, args)
    assert trained == [("ours-dct", 3e-3, 1, 7, 4)]
    assert (again.val_loss, again.state_bytes, again.seconds, again.run.lr) == (3.25, 640, 3.0, 3e-3)
    assert again.losses[0] == 1.5 and math.isnan(again.losses[1]) and again.diverged == first.diverged
    tuned._run("ours-dct", 3e-3, 1, 7, tuned.parse_args(["--cache", cache, "--batch-size", "8"]))
    assert trained[-1] == ("ours-dct", 3e-3, 1, 7, 8)
    assert len(Path(cache).read_text().splitlines()) == 2


def test_the_medium_byte_lm_is_the_5m_parameter_model_of_the_tuned_study():
    """``SIZES["medium"]``: embedding and untied head 256 x 256 each; per block four 256 x 256 attention weights,
    three 256 x 704 MLP weights and two norms; a final norm. Counted by hand here, not by the model."""
    byte_lm = pytest.importorskip("byte_lm")
    d, hidden, blocks = 256, 704, 6
    by_hand = 2 * 256 * d + blocks * (4 * d * d + 3 * d * hidden + 2 * d) + d
    model = byte_lm.ByteLM(byte_lm.SIZES["medium"])
    assert sum(p.numel() for p in model.parameters()) == by_hand == 4_951_296


def test_the_adamw_split_control_trains_projected_weights_at_scale_times_lr():
    """The control: torch AdamW, the weights a recipe would project at 0.25 x lr. Adam's first step moves each
    coordinate by lr (m / sqrt(v) = 1 for a constant gradient), so a zero weight lands at -lr by hand."""
    w, e = torch.nn.Parameter(torch.zeros(4, 4)), torch.nn.Parameter(torch.zeros(4))
    make = bench.peer_factory("adamw-split", bench.RUNS["adamw-split"], None)
    groups = [{"params": [e], "weight_decay": 0.0}, {"params": [w], "weight_decay": 0.1, "low": True}]
    opt = make(groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-12)
    assert type(opt) is torch.optim.AdamW and [g["lr"] for g in opt.param_groups] == [1e-2, 2.5e-3]
    w.grad, e.grad = torch.ones(4, 4), torch.ones(4)
    opt.step()
    torch.testing.assert_close(w.detach(), torch.full((4, 4), -2.5e-3))
    torch.testing.assert_close(e.detach(), torch.full((4,), -1e-2))
