"""benchmarks/gpu_suite.py: its CPU smoke path end to end, how it finds the CUDA-only tests, what a run cut short
keeps on disk, and how the sync check records a sync (with a stand-in for CUDA's sync debug mode: no GPU here).

The smoke run trains the demo ByteLM for 2 steps in five configurations, steps every sync-check row and times the
optimizer step on a tiny block; nothing here asserts a time. No peer needs to be installed: galore-torch may be a
"not run" row.
"""

from __future__ import annotations

import contextlib
import json
import sys
import warnings

import pytest
import torch

from lightning_lowrank.optim.projection.projectors import RandomProjector
from lightning_lowrank.optim.state.host_ints import read_int
from tests import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_suite  # noqa: E402

SYNC_TEXT = "called a synchronizing CUDA operation"  # what torch raises (error mode) or warns (warn mode)


def test_the_cuda_only_tests_are_found_by_their_skipif(tmp_path):
    ids = gpu_suite.cuda_test_ids()
    assert "tests/optim/state/test_moments8bit.py::test_cuda_matches_cpu" in ids
    assert "tests/optim/test_optimizer_api.py::test_a_cuda_refresh_is_timed_with_events_read_only_when_asked" in ids
    tests = tmp_path / "tests"
    tests.mkdir()
    (tests / "test_a.py").write_text(
        "import pytest, torch, sys\n"
        "@pytest.mark.skipif(not torch.cuda.is_available(), reason='GPU')\n"
        "def test_gpu(): pass\n"
        "@pytest.mark.skipif(sys.platform == 'win32', reason='posix')\n"
        "def test_posix(): pass\n"
        "def test_plain(): pass\n"
        "@pytest.mark.skipif(torch.cuda.device_count() < 2, reason='two GPUs')\n"
        "class TestTwo:\n"
        "    def test_x(self): pass\n"
    )
    (tests / "test_b.py").write_text(
        "import pytest, torch\npytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason='GPU')]\n"
        "def test_y(): pass\n"
    )
    (tests / "helpers.py").write_text("import pytest, torch\npytestmark = pytest.mark.skipif(True, reason='cuda')\n")
    assert gpu_suite.cuda_test_ids(tests) == [
        "tests/test_a.py::test_gpu",
        "tests/test_a.py::TestTwo",
        "tests/test_b.py",
    ]


def _numbers(row: dict, keys: tuple[str, ...]) -> None:
    for key in keys:
        assert isinstance(row[key], (int, float)) and row[key] >= 0, (row.get("name") or row.get("config"), key)


def test_the_smoke_run_on_cpu_writes_every_section_with_numbers(tmp_path):
    threads = torch.get_num_threads()
    try:
        result = gpu_suite.main(["--smoke", "--device", "cpu", "--threads", "1", "--out-dir", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    saved = json.loads((tmp_path / "gpu_suite_cpu.json").read_text())
    assert saved == json.loads(json.dumps(result, default=str))
    assert set(gpu_suite.SECTIONS) <= set(saved) and set(gpu_suite.SECTIONS) <= set(saved["seconds"])
    assert saved["machine"]["device"] == "cpu" and saved["machine"]["torch"] == torch.__version__
    for section in gpu_suite.SECTIONS:
        assert "error" not in saved[section], saved[section]

    # 1. The CUDA-only tests ran in pytest; without CUDA every one of them is skipped.
    tests = saved["cuda_tests"]
    assert tests["status"] == "ok" and len(tests["node_ids"]) >= 2
    if not torch.cuda.is_available():
        assert tests["skipped"] == tests["total"] >= 2 and tests["passed"] == tests["failed"] == 0

    # 2. Every sync-check row ran on the tiny block (fused, random, projector_bits, layer-wise DDP among them);
    # on a CPU none is checked, and the section says why.
    sync = saved["sync_check"]
    assert "skipped on a CPU" in sync["check"] and sync["checked_steps"] == 0
    (preset,) = sync["presets"].values()
    rows = {r["name"]: r for r in preset["rows"]}
    assert list(rows) == list(gpu_suite.SYNC_ROWS)
    for name in ("svd-fused", "random", "svd-pbits8", "online_pca-pbits4", "layerwise-ddp", "random-resumed"):
        assert name in rows
    for row in rows.values():
        assert row["status"] == "ok", row
        assert "skipped" in row["sync"] and row["sync"]["checked_steps"] == 0
        _numbers(row, ("step_ms", "state_bytes", "state_ratio"))
    assert rows["torch-adamw"]["state_ratio"] == 1.0 and rows["random"]["state_ratio"] < rows["svd"]["state_ratio"]
    assert rows["svd-pbits8"]["state_bytes"] < rows["svd"]["state_bytes"]
    assert rows["layerwise-ddp"]["optimizer"] == "LayerwiseProjectedOptimizer"
    assert not torch.distributed.is_initialized()  # the ddp row's group of one is gone

    # 3. Both dtypes, every optimizer a row; those that ran have their figures, AdamW is the reference.
    tables = saved["optimizer_step"]["tables"]
    assert set(tables) == {"float32", "bfloat16"}
    for dtype, table in tables.items():
        assert table["config"]["dtype"] == dtype
        (preset,) = table["presets"].values()
        rows = {r["name"]: r for r in preset["rows"]}
        assert list(rows) == list(gpu_suite.STEP_OPTIMIZERS)
        for name, row in rows.items():
            if name == "galore" and row["status"] != "ok":
                continue  # galore-torch is not installed everywhere (CI)
            assert row["status"] == "ok", row
            _numbers(row, ("state_bytes", "state_ratio", "step_ms", "step_ratio", "amortised_ms"))
        assert rows["adamw"]["state_ratio"] == 1.0 and rows["ours-svd"]["state_ratio"] < 1.0

    # 4. Every configuration trained; the low-rank ones hold less optimizer state than AdamW, counted on the tensors
    # and by the memory report alike, and the report's dense baseline is what the AdamW run held.
    train = saved["training_memory"]
    assert "CPU" in train["peak_source"] and train["precision"] == "bf16-true"
    rows = train["configs"]
    assert list(rows) == list(gpu_suite.TRAIN_CONFIGS)
    for row in rows.values():
        assert "error" not in row, row
        assert row["steps"] == gpu_suite.MODES["smoke"]["steps"] and row["report_agrees"]
        _numbers(row, ("state_bytes", "param_bytes", "grad_bytes", "live_bytes", "max_rss_bytes", "seconds"))
    adamw = rows["adamw"]
    assert adamw["optimizer"] == "AdamW" and adamw["projected_layers"] == 0
    for name in [n for n in rows if n.startswith("lowrank-")]:
        assert rows[name]["projected_layers"] > 0
        assert rows[name]["state_bytes"] < adamw["state_bytes"], name
        assert rows[name]["state_ratio"] < 1.0
        assert rows[name]["report_baseline_state_bytes"] == adamw["state_bytes"]
    assert rows["lowrank-svd-8bit"]["state_bytes"] < rows["lowrank-svd"]["state_bytes"]
    assert rows["lowrank-svd-bf16state"]["state_bytes"] < rows["lowrank-svd"]["state_bytes"]
    assert rows["lowrank-svd-layerwise"]["grad_bytes"] < rows["lowrank-svd"]["grad_bytes"]

    table = (tmp_path / "gpu_suite_cpu.md").read_text()
    assert "CPU run" in table and "torch " + torch.__version__ in table
    assert table.count("| lowrank-") == 5 and table.count("| adamw-fused |") == 2
    assert "| layerwise-ddp | LayerwiseProjectedOptimizer |" in table and "| svd-fused |" in table
    assert table.count("not checked (CPU)") == len(gpu_suite.SYNC_ROWS) and "cut short" not in table
    for dtype in ("float32", "bfloat16"):  # each preset's own JSON, in --out-dir
        part = json.loads((tmp_path / f"gpu_suite_cpu_step_{dtype}_tiny.json").read_text())
        assert part["presets"]["tiny"]["rows"] == tables[dtype]["presets"]["tiny"]["rows"]


# -- a run cut short keeps what finished --------------------------------------------------------------------------


class Killed(BaseException):
    """What a time limit does to the run: nothing after it is written (not an Exception the suite would catch)."""


def test_each_step_table_is_on_disk_before_the_next_one_starts(tmp_path, monkeypatch):
    real = gpu_suite.bench_optimizer_step.main
    calls = []

    def main(argv):
        calls.append(argv)
        if len(calls) == 1:
            return real(argv)
        # The float32 table is done: its preset JSON and the suite's own files hold it already.
        saved = json.loads((tmp_path / "gpu_suite_cpu.json").read_text())
        assert saved["optimizer_step"]["tables"]["float32"]["presets"]["tiny"]["rows"]
        assert (tmp_path / "gpu_suite_cpu_step_float32_tiny.json").exists()
        raise Killed

    monkeypatch.setattr(gpu_suite.bench_optimizer_step, "main", main)
    args = ["--smoke", "--device", "cpu", "--threads", "1", "--out-dir", str(tmp_path), "--sections"]
    threads = torch.get_num_threads()
    try:
        with pytest.raises(Killed):
            gpu_suite.main([*args, "optimizer_step"])
    finally:
        torch.set_num_threads(threads)
    assert len(calls) == 2 and "bfloat16" in calls[1]
    saved = json.loads((tmp_path / "gpu_suite_cpu.json").read_text())
    assert set(saved["optimizer_step"]["tables"]) == {"float32"} and "optimizer_step" not in saved["seconds"]
    table = (tmp_path / "gpu_suite_cpu.md").read_text()
    assert "Optimizer step on LLaMA layer shapes (cut short" in table and "| ours-svd |" in table
    assert not list(tmp_path.glob("*.tmp"))


def test_an_error_in_a_section_keeps_its_finished_part_and_the_next_sections(tmp_path, monkeypatch):
    def sync_rows(args, out, save):
        out["presets"] = {"tiny": {"title": "t", "rows": []}}
        save()
        raise ValueError("after the first table")

    def tests(args, out, save):
        out.update(node_ids=[], status="ok")

    monkeypatch.setitem(gpu_suite.RUNNERS, "sync_check", sync_rows)
    monkeypatch.setitem(gpu_suite.RUNNERS, "cuda_tests", tests)
    result = gpu_suite.main(
        ["--smoke", "--device", "cpu", "--out-dir", str(tmp_path), "--sections", "sync_check", "cuda_tests"]
    )
    saved = json.loads((tmp_path / "gpu_suite_cpu.json").read_text())
    assert saved == json.loads(json.dumps(result, default=str))
    assert saved["sync_check"]["presets"] == {"tiny": {"title": "t", "rows": []}}
    assert saved["sync_check"]["error"] == "ValueError: after the first table"
    assert saved["cuda_tests"]["status"] == "ok"


def test_the_full_cuda_run_makes_the_quick_pass_first(tmp_path, monkeypatch):
    """A lease cut off during the full pass still leaves the quick pass's files; the CUDA tests run once."""
    seen = []

    def runner(section):
        def run(args, out, save):
            seen.append((section, args.mode, args.name))
            out["mode"] = args.mode

        return run

    for section in gpu_suite.SECTIONS:
        monkeypatch.setitem(gpu_suite.RUNNERS, section, runner(section))
    gpu_suite.main(["--device", "cpu", "--out-dir", str(tmp_path), "--sections", "cuda_tests", "sync_check"])
    assert seen == [
        ("cuda_tests", "quick", "gpu_suite_cpu_quick"),
        ("sync_check", "quick", "gpu_suite_cpu_quick"),
        ("sync_check", "full", "gpu_suite_cpu"),
    ]
    quick = json.loads((tmp_path / "gpu_suite_cpu_quick.json").read_text())
    full = json.loads((tmp_path / "gpu_suite_cpu.json").read_text())
    assert quick["mode"] == quick["sync_check"]["mode"] == "quick" and full["sync_check"]["mode"] == "full"
    assert full["cuda_tests"] == {"mode": "quick", "from": "the quick pass"}
    seen.clear()
    gpu_suite.main(["--device", "cpu", "--out-dir", str(tmp_path), "--no-quick-first", "--sections", "sync_check"])
    assert seen == [("sync_check", "full", "gpu_suite_cpu")]


# -- the sync check, with a stand-in for CUDA's sync debug mode -------------------------------------------------


class FakeSyncDebug:
    """Stands in for ``cuda_sync_debug``: while a mode is on, reading a ``DeviceInt`` is a sync, which raises
    (``"error"``) or warns (``"warn"``) with torch's message, as ``int()`` of a CUDA tensor does."""

    def __init__(self):
        self.mode = None

    @contextlib.contextmanager
    def __call__(self, mode):
        self.mode = mode
        try:
            yield
        finally:
            self.mode = None


class DeviceInt:
    """An integer on the "device": reading it syncs while the fake debug mode is on."""

    def __init__(self, debug, value=3):
        self.debug, self.value = debug, value

    def __int__(self):
        if self.debug.mode == "error":
            raise RuntimeError(SYNC_TEXT)
        if self.debug.mode == "warn":
            warnings.warn(SYNC_TEXT, stacklevel=2)
        return self.value


def test_a_sync_is_caught_and_recorded_with_where_in_the_package_it_happened():
    debug = FakeSyncDebug()

    def step():  # two reads per step through the package's host-int reader: each a sync on a GPU
        read_int(DeviceInt(debug))
        read_int(DeviceInt(debug))

    report = gpu_suite.check_syncs(step, 3, debug)
    assert report["synced"] and report["message"] == SYNC_TEXT
    assert (
        report["where"][0].startswith("lightning_lowrank/optim/state/host_ints.py:")
        and "in read_int" in report["where"][0]
    )
    assert report["syncs_per_step"] == 2  # the warn pass counted every one
    (site,) = report["sites"]
    assert site["per_step"] == 2 and site["where"][0] == report["where"][0]
    assert debug.mode is None  # the mode is off again


def test_steps_without_a_sync_report_none_and_other_errors_are_not_taken_for_one():
    debug = FakeSyncDebug()
    assert gpu_suite.check_syncs(lambda: read_int(torch.tensor(2)), 2, debug) == {"checked_steps": 2, "synced": False}

    def crash():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    with pytest.raises(RuntimeError, match="illegal memory access"):
        gpu_suite.check_syncs(crash, 2, debug)
    assert debug.mode is None
    assert gpu_suite.is_sync_error(RuntimeError(SYNC_TEXT)) and not gpu_suite.is_sync_error(ValueError(SYNC_TEXT))


def test_each_sync_check_row_is_recorded_and_the_next_rows_still_run(tmp_path, monkeypatch):
    """The random projector made to sync when it builds P (as drawing it on the host would on a GPU), a row that
    crashes: each is that row's finding, the rows around them are clean, and each row is on disk before the next."""
    debug = FakeSyncDebug()
    monkeypatch.setattr(gpu_suite, "sync_debug_for", lambda device: debug)
    matrix = RandomProjector.matrix

    def syncing_matrix(self, param, state, ctx):
        read_int(DeviceInt(debug))
        return matrix(self, param, state, ctx)

    monkeypatch.setattr(RandomProjector, "matrix", syncing_matrix)
    rows = {
        "torch-adamw": {"torch": "foreach"},
        "random": {"projector": "random"},
        "broken": {"projector": "no-such-projector"},
        "layerwise-random": {"projector": "random", "layerwise": True},
        "svd": {"projector": "svd"},
    }
    monkeypatch.setattr(gpu_suite, "SYNC_ROWS", rows)
    run_row = gpu_suite.run_sync_row
    on_disk = []

    def recorded(name, *args):
        saved = json.loads((tmp_path / "gpu_suite_cpu.json").read_text())
        on_disk.append([r["name"] for p in saved["sync_check"].get("presets", {}).values() for r in p["rows"]])
        return run_row(name, *args)

    monkeypatch.setattr(gpu_suite, "run_sync_row", recorded)
    gpu_suite.main(["--smoke", "--device", "cpu", "--out-dir", str(tmp_path), "--sections", "sync_check"])
    assert on_disk == [list(rows)[:i] for i in range(len(rows))]
    saved = json.loads((tmp_path / "gpu_suite_cpu.json").read_text())
    assert saved["sync_check"]["checked_steps"] == gpu_suite.MODES["smoke"]["sync_steps"]
    got = {r["name"]: r for r in saved["sync_check"]["presets"]["tiny"]["rows"]}
    assert list(got) == list(rows)
    for name in ("torch-adamw", "svd"):
        assert got[name]["status"] == "ok" and got[name]["sync"]["synced"] is False
    for name in ("random", "layerwise-random"):
        sync = got[name]["sync"]
        assert got[name]["status"] == "ok" and sync["synced"] and sync["message"] == SYNC_TEXT, name
        assert "in read_int" in sync["where"][0] and sync["syncs_per_step"] >= 7  # seven projected weights
    assert got["broken"]["status"] == "failed" and "no-such-projector" in got["broken"]["error"]
    table = (tmp_path / "gpu_suite_cpu.md").read_text()
    assert table.count("| **synced**: " + SYNC_TEXT) == 2 and "no sync in 2 steps" in table
    assert "| broken |" in table and "**failed**" in table and "Every sync (warn mode)" in table
