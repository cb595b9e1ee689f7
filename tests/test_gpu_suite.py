"""benchmarks/gpu_suite.py: its CPU smoke path end to end, and how it finds the CUDA-only tests.

The smoke run trains the demo ByteLM for 2 steps in five configurations and times the optimizer step on a tiny
block; nothing here asserts a time. No peer needs to be installed: galore-torch may be a "not run" row.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_suite  # noqa: E402


def test_the_cuda_only_tests_are_found_by_their_skipif(tmp_path):
    ids = gpu_suite.cuda_test_ids()
    assert "tests/test_moments8bit.py::test_cuda_matches_cpu" in ids
    assert "tests/test_optimizer_api.py::test_a_cuda_refresh_is_timed_with_events_read_only_when_asked" in ids
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

    # 2. Both dtypes, every optimizer a row; those that ran have their figures, AdamW is the reference.
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

    # 3. Every configuration trained; the low-rank ones hold less optimizer state than AdamW, counted on the tensors
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
