"""The optimizer-step benchmark's bookkeeping: state bytes, amortisation, "not run" rows, the JSON it writes.

No peer needs to be installed (CI has none) and nothing here asserts a time.
"""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import pytest
import torch

from tests import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_optimizer_step as bench  # noqa: E402
import peers  # noqa: E402

SHAPES = [(3, 5), (4, 2)]


def _params() -> list[torch.nn.Parameter]:
    params = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


@pytest.mark.parametrize("flags", [{"foreach": True}, {"foreach": False}])
def test_state_bytes_of_adamw_is_two_moments_and_a_step_per_weight(flags):
    opt = torch.optim.AdamW(_params(), **flags)
    opt.step()
    expected = sum(2 * m * n * 4 + 4 for m, n in SHAPES)  # exp_avg, exp_avg_sq (fp32), a 0-d fp32 step
    assert peers.state_bytes(opt) == expected
    assert peers.state_bytes(opt, logical=True) == expected


def test_state_bytes_finds_tensors_in_projector_objects_and_on_the_optimizer():
    (p,) = _params()[:1]
    opt = torch.optim.SGD([p], lr=0.1)
    full_factor = torch.zeros(10, 10)
    opt.state[p] = {
        "step": 3,  # a Python int, as GaLore keeps it: not a tensor, not counted
        "exp_avg": torch.zeros(3, 2),
        "projector": SimpleNamespace(ortho_matrix=full_factor[:, :2], rank=2, cache=[torch.zeros(5)]),
    }
    opt.Q = torch.zeros(4, 4, dtype=torch.float64)  # a shared basis held by the optimizer (DCTAdamW's Q)
    held = 3 * 2 * 4 + 10 * 10 * 4 + 5 * 4 + 4 * 4 * 8
    logical = 3 * 2 * 4 + 10 * 2 * 4 + 5 * 4 + 4 * 4 * 8
    assert peers.state_bytes(opt) == held
    assert peers.state_bytes(opt, logical=True) == logical


def test_amortised_cost_and_cycle_length():
    assert bench.amortised(refresh=100.0, ordinary=1.0, gap=200) == pytest.approx((100 + 199) / 200)
    assert bench.amortised(refresh=5.0, ordinary=5.0, gap=200) == pytest.approx(5.0)
    for reps, refreshes in [(30, 3), (4, 1), (3, 1), (10, 4)]:
        gap = bench.cycle_length(reps, refreshes)
        assert gap % 2 == 1 and (gap - 1) * refreshes >= reps


def test_a_peer_that_cannot_be_imported_is_a_not_run_row(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "galore_torch", None)  # import galore_torch now raises ImportError

    def broken_import(name, *args, **kwargs):
        raise ImportError("No module named 'bitsandbytes'")

    monkeypatch.setattr(peers.importlib, "import_module", broken_import)
    with pytest.raises(peers.PeerUnavailable, match="not installed"):
        peers.galore([], peers.PeerConfig(rank=2, update_gap=3), torch.device("cpu"))
    monkeypatch.delitem(sys.modules, "fira", raising=False)
    monkeypatch.setattr(peers.importlib.util, "find_spec", lambda name: SimpleNamespace(submodule_search_locations=[]))
    with pytest.raises(peers.PeerUnavailable, match="bitsandbytes"):
        peers.fira([], peers.PeerConfig(rank=2, update_gap=3), torch.device("cpu"))


def test_failures_become_rows_and_the_json_has_every_row(monkeypatch, tmp_path):
    def raises_type_error(params, cfg, device):
        raise TypeError("unexpected keyword argument 'proj_type'")

    class Exploding(torch.optim.SGD):
        def step(self, closure=None):
            raise RuntimeError("Torch not compiled with CUDA enabled")

    monkeypatch.setitem(sys.modules, "galore_torch", None)
    monkeypatch.setitem(peers.BUILDERS, "fira", raises_type_error)
    monkeypatch.setitem(peers.BUILDERS, "apollo", lambda params, cfg, device: peers.Built(Exploding(params, lr=0.1)))
    out = tmp_path / "bench.json"
    bench.main(["--quick", "--only", "galore", "fira", "apollo", "--json", str(out)])
    rows = {r["name"]: r for r in json.loads(out.read_text())["presets"]["60M"]["rows"]}
    assert list(rows) == ["adamw", "galore", "fira", "apollo"]  # the reference always runs, first
    assert rows["adamw"]["status"] == "ok"
    assert rows["galore"] == {"name": "galore", "status": "not run", "reason": rows["galore"]["reason"]}
    assert "not installed" in rows["galore"]["reason"]
    assert rows["fira"]["reason"].startswith("construction failed: TypeError")
    assert rows["apollo"]["reason"] == "step() failed: RuntimeError: Torch not compiled with CUDA enabled"


def test_quick_run_end_to_end_writes_the_expected_json(tmp_path):
    out = tmp_path / "bench.json"
    result = bench.main(["--quick", "--only", "adamw", "ours-svd", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result))
    assert {"platform", "cpu_count", "torch", "torch_threads", "date", "device"} <= set(saved["machine"])
    assert saved["config"]["amortise_gap"] == 200 and saved["config"]["reference"] == "adamw"
    preset = saved["presets"]["60M"]
    assert preset["rank"] == 128 and len(preset["weights"]) == 7
    adamw, ours = preset["rows"]
    assert (adamw["name"], ours["name"]) == ("adamw", "ours-svd")
    for key in ("state_bytes", "state_ratio", "step_ms", "step_ratio", "refresh_ms", "amortised_ms", "amortised_ratio"):
        assert ours[key] is not None and ours[key] > 0, key
    assert adamw["refresh_ms"] is None and adamw["state_ratio"] == 1.0
    # Refreshes happened exactly on the steps timed as refreshes.
    assert ours["refresh_check"] == "ok"
    assert len(ours["refresh_ms_samples"]) == 1 and len(ours["step_ms_samples"]) == 4
    # State by hand: AdamW keeps 2 m x n moments; GaLore-style state keeps 2 r x max(m, n) moments and a
    # min(m, n) x r projector; both keep one 0-d fp32 step per weight.
    shapes = [tuple(w["shape"]) for w in preset["weights"]]
    r = preset["rank"]
    assert adamw["state_bytes"] == sum(2 * m * n * 4 + 4 for m, n in shapes)
    assert ours["state_bytes"] == sum((2 * r * max(m, n) + r * min(m, n)) * 4 + 4 for m, n in shapes)


def test_bfloat16_weights_on_the_tiny_block(tmp_path):
    """--dtype bfloat16: the weights and gradients are bf16, so AdamW's moments are bf16 (2 bytes) while ours keep
    float32 moments and P for a half-precision weight (the default state_dtype); --presets tiny is a hidden-64 block."""
    out = tmp_path / "bench.json"
    result = bench.main(
        ["--presets", "tiny", "--reps", "2", "--dtype", "bfloat16", "--only", "ours-svd", "--json", str(out)]
    )
    assert result["config"]["dtype"] == "bfloat16"
    preset = result["presets"]["tiny"]
    assert "bfloat16" in preset["title"] and preset["rank"] == 16
    shapes = [tuple(w["shape"]) for w in preset["weights"]]
    assert sorted(set(shapes)) == [(64, 64), (64, 176), (176, 64)] and len(shapes) == 7
    adamw, ours = preset["rows"]
    r = preset["rank"]
    assert adamw["state_bytes"] == sum(2 * m * n * 2 + 4 for m, n in shapes)
    assert ours["state_bytes"] == sum((2 * r * max(m, n) + r * min(m, n)) * 4 + 4 for m, n in shapes)
    assert ours["refresh_check"] == "ok" and ours["step_ms"] > 0


# -- benchmarks/parity.py ------------------------------------------------------------------------------------------


def test_parity_without_any_peer_gives_not_run_rows_and_renders(monkeypatch, tmp_path):
    import parity

    def unavailable(package, module):
        raise peers.PeerUnavailable(f"{package} is not installed (scripts/bench_env.sh installs it)")

    monkeypatch.setattr(peers, "_import", unavailable)
    monkeypatch.setattr(parity, "_import_sophia", lambda: unavailable("sophia_opt", ""))
    out, md = tmp_path / "parity.json", tmp_path / "parity.md"
    result = parity.main(["--quick", "--json", str(out), "--markdown", str(md)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    rows = result["parameters"] + result["schedule"] + result["dct_indices"]
    assert len(result["parameters"]) == len(parity.param_cases()) and result["schedule"] and result["dct_indices"]
    assert all(r["status"] == "not run" and "not installed" in r["reason"] for r in rows)
    table = md.read_text()
    assert table.count("| not run: ") == len(rows)
    assert "| galore |" in table and "| sophia |" in table and "| stable | tall |" in table


def test_parity_harness_finds_ours_at_float64_against_a_formula():
    """Ours at full rank with rotated momentum is dense SGD with momentum (L2 decay, as torch's) in another
    orthonormal basis, with refreshes every 4 steps: the harness must call it equal to torch.optim.SGD at float64,
    and the float32 floor must be far above that."""
    import parity

    case = parity.ParamCase(
        "sgd",
        "torch.optim.SGD",
        "full-rank svd, rotate",
        lambda dtype, steps: parity.trajectory(
            lambda ps: torch.optim.SGD(ps, lr=parity.LR, momentum=0.9, weight_decay=parity.WD), dtype, steps
        ),
        parity._traj(
            lambda: parity._ours(
                rank=16, projector="svd", moments="rotate", rule="sgd", momentum=0.9, decoupled_weight_decay=False
            )
        ),
    )
    row = parity.run_param_case(case, steps=parity.QUICK_STEPS)
    assert row["status"] == "ok" and row["verdict"] == "at float64", row
    assert row["max_rel_diff"] <= 1e-12 < 1e-8 < row["float32_floor"]
    assert len(row["per_step"]) == parity.QUICK_STEPS
