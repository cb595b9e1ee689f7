"""The memory report under FSDP2 (issue 16): each rank's bytes, their sum over the ranks, and the planner's ``fsdp``.

Two CPU processes (gloo) shard ``Linear(16, 13)``, Tanh, ``Linear(13, 8)`` with ``fully_shard``: 13 rows split 7 + 6,
8 rows 4 + 4. Every figure is checked against bytes written out here: a rank holds its rows of the parameters, the
gradients and the moments (projected ones: local rows x r, with P on the right), and all of P and the step counters.
"""

from __future__ import annotations

import io
import json
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from rich.console import Console

from lightning_lowrank import plan
from lightning_lowrank.__main__ import main
from lightning_lowrank.memory import account_memory, render_memory_report, sum_over_ranks
from lightning_lowrank.optim import ProjectedOptimizer
from tests.fsdp2_spawn import WORLD, free_port, process_group, shard_linears

pytestmark = pytest.mark.skipif(sys.platform == "win32" or not dist.is_available(), reason="gloo workers")

RANK, F32 = 4, 4  # projection rank, bytes of a float32 (every tensor and every step counter)
SHAPES = ((13, 16), (8, 13))  # the two weights (rows, columns); each Linear has a bias of its rows
SPLITS = {0: (7, 4), 1: (6, 4)}  # the rows each rank holds of the two layers (torch.chunk's split)
SINGLE = (13, 8)  # one process holds all rows


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 13), torch.nn.Tanh(), torch.nn.Linear(13, 8))


def _by_hand(rows: tuple[int, int]) -> dict[str, int]:
    """What a process holding ``rows`` rows of each layer holds (float32, AdamW, rank 4, P on the right)."""
    params = sum(m * (n + 1) for m, (_, n) in zip(rows, SHAPES)) * F32  # weight rows x n, bias rows
    kinds = {
        "projected_moments": sum(2 * m * RANK for m in rows) * F32,  # exp_avg, exp_avg_sq: local rows x r
        "projection": sum(n * RANK for _, n in SHAPES) * F32,  # P: n x r, replicated
        "dense_moments": sum(2 * m for m in rows) * F32,  # the biases' exp_avg, exp_avg_sq
        "scalars": 4 * F32,  # one step per parameter
        "residual": 0,
        "curvature": 0,
        "protected_bases": 0,  # nothing protected
    }
    return {
        "param_bytes": params,
        "grad_bytes": params,
        "optimizer_state_bytes": sum(kinds.values()),
        "baseline_state_bytes": 2 * params + 4 * F32,  # dense AdamW: 2 x the rows it holds, and a step each
        "state_by_kind": kinds,
        "layer_0": 2 * rows[0] * RANK * F32 + 16 * RANK * F32 + F32,  # moments + P (16 x 4) + step
        "layer_0_baseline": 2 * rows[0] * 16 * F32 + F32,
    }


def _summed(*hands: dict[str, int]) -> dict[str, int]:
    out = {k: sum(h[k] for h in hands) for k in hands[0] if k != "state_by_kind"}
    out["state_by_kind"] = {k: sum(h["state_by_kind"][k] for h in hands) for k in hands[0]["state_by_kind"]}
    return out


def _assert_figures(report: dict, hand: dict[str, int]) -> None:
    """``report``: a ``MemoryReport.as_dict()``."""
    for key in ("param_bytes", "grad_bytes", "optimizer_state_bytes", "baseline_state_bytes", "state_by_kind"):
        assert report[key] == hand[key], (key, report[key], hand[key])
    layer = next(layer for layer in report["layers"] if layer["name"] == "0")
    assert layer["shape"] == [13, 16]  # the global shape; the bytes are the rank's
    assert (layer["state_bytes"], layer["baseline_bytes"]) == (hand["layer_0"], hand["layer_0_baseline"])


def _worker(rank: int, port: int, out: str) -> None:
    with process_group(rank, port):
        model = shard_linears(_model())
        base = torch.optim.AdamW(model.parameters(), lr=1e-2)
        opt = ProjectedOptimizer.from_optimizer(base, lambda p: p.ndim == 2, rank=RANK, side="right")
        x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))[rank * 4 : (rank + 1) * 4]
        for _ in range(2):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
        report = account_memory([opt], model.parameters(), {model[0].weight: "0", model[2].weight: "2"}, module=model)
        total = sum_over_ranks(report)
        console = Console(file=io.StringIO(), width=80)
        render_memory_report(report, console, over_ranks=total)
        render_memory_report(total, console)
        result = {"report": report.as_dict(), "total": total.as_dict(), "text": console.file.getvalue()}
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict[int, dict]:
    out = str(tmp_path_factory.mktemp("fsdp2_report"))
    mp.spawn(_worker, args=(free_port(), out), nprocs=WORLD, join=True)
    return {rank: json.load(open(os.path.join(out, f"rank{rank}.json"))) for rank in range(WORLD)}


def test_each_rank_reports_the_bytes_of_its_own_rows(measured):
    for rank, rows in SPLITS.items():
        report = measured[rank]["report"]
        _assert_figures(report, _by_hand(rows))
        assert (report["ranks"], report["summed"]) == (WORLD, False)
    assert measured[0]["report"]["param_bytes"] == (7 * 17 + 4 * 14) * 4 == 700  # 7 + 6 rows: uneven
    assert measured[1]["report"]["param_bytes"] == (6 * 17 + 4 * 14) * 4 == 632


def test_the_moments_halve_and_p_is_replicated(measured):
    single = _by_hand(SINGLE)
    assert single["optimizer_state_bytes"] == 1320  # one process: moments 672, P 464, bias moments 168, steps 16
    kinds = [measured[rank]["report"]["state_by_kind"] for rank in SPLITS]
    assert [k["projected_moments"] for k in kinds] == [352, 320]  # 672 split 7:6 and 4:4 by rows
    assert sum(k["projected_moments"] + k["dense_moments"] for k in kinds) == 672 + 168
    assert [k["projection"] for k in kinds] == [464, 464]  # all of P on each rank
    assert [measured[rank]["report"]["optimizer_state_bytes"] for rank in SPLITS] == [920, 880]
    # saved against what dense AdamW would hold on the same rank: 2 x its 700 B of rows and 4 steps
    assert measured[0]["report"]["saving_bytes"] == 2 * 700 + 4 * F32 - 920


def test_sum_over_ranks_adds_the_ranks_up_on_every_rank(measured):
    hand = _summed(*(_by_hand(rows) for rows in SPLITS.values()))
    assert hand["param_bytes"] == _by_hand(SINGLE)["param_bytes"] == 1332
    assert hand["optimizer_state_bytes"] == 1320 + 464 + 16  # one process's, plus a second copy of P and steps
    for rank in SPLITS:
        total = measured[rank]["total"]
        _assert_figures(total, hand)
        assert (total["ranks"], total["summed"]) == (WORLD, True)
        modules = {m["name"]: m for m in total["modules"]}
        assert modules["0"]["param_bytes"] == 13 * 17 * F32 and modules["0"]["kind"] == "Linear"  # not FSDPLinear


def test_the_report_says_whose_bytes_it_shows(measured):
    text = " ".join(measured[0]["text"].split())  # rich wraps long lines
    assert "Per rank (FSDP2, 2 ranks)" in text and "layer shapes are global" in text
    assert "All 2 ranks together: parameters 1.30 KiB" in text  # 1332 B
    assert (
        "Summed over 2 ranks: what each holds, added up" in text
        and "Low-rank optimizer memory: 2 layers, per rank" in text
    )


def test_the_plan_for_two_ranks_is_what_the_ranks_measure(measured):
    result = plan(_model(), "adamw", rank=RANK, fsdp=WORLD)
    report, total = result.report.as_dict(), result.total.as_dict()
    _assert_figures(report, _by_hand(SPLITS[0]))  # rank 0's: ceil(13 / 2) = 7 rows
    _assert_figures(total, _summed(*(_by_hand(rows) for rows in SPLITS.values())))
    for key in ("param_bytes", "grad_bytes", "optimizer_state_bytes", "baseline_state_bytes", "layers", "modules"):
        assert report[key] == measured[0]["report"][key], key
        assert total[key] == measured[0]["total"][key], key
    assert result.lowrank_bytes == 2 * 700 + 920


def test_the_plan_for_three_ranks_by_hand():
    """13 rows on 3 ranks: 5 + 5 + 3; 8 rows: 3 + 3 + 2. Per rank is rank 0's, the largest."""
    result = plan(_model(), "adamw", rank=RANK, fsdp=3)
    _assert_figures(result.report.as_dict(), _by_hand((5, 3)))
    _assert_figures(result.total.as_dict(), _summed(_by_hand((5, 3)), _by_hand((5, 3)), _by_hand((3, 2))))
    assert result.total.param_bytes == 1332 and result.total.projector_bytes == 3 * 464
    text = "\n".join(result.verdict())
    assert "per rank (FSDP2, 3 ranks)" in text and "In total over 3 ranks" in text


def test_the_plan_refuses_what_lowrank_fsdp_refuses():
    with pytest.raises(ValueError, match="side='left'"):
        plan(_model(), "adamw", rank=RANK, fsdp=2, side="left")
    with pytest.raises(ValueError, match="layerwise=True is not supported with fsdp"):
        plan(_model(), "adamw", rank=RANK, fsdp=2, layerwise=True)
    with pytest.raises(ValueError, match="state_bits"):
        plan(_model(), "adamw", rank=RANK, fsdp=2, state_bits=8)
    with pytest.raises(ValueError, match="online_pca"):
        plan(_model(), "adamw", rank=RANK, fsdp=2, projector="online_pca")
    with pytest.raises(ValueError, match="positive number of ranks"):
        plan(_model(), "adamw", rank=RANK, fsdp=0)


def test_cli_plans_fsdp(capsys):
    argv = ["plan", "--model", "tests.memory.test_fsdp2_report:_model", "--optimizer", "adamw", "--rank", "4"]
    assert main([*argv, "--fsdp", "2"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert "FSDP2 on 2 ranks" in out and "Per rank (FSDP2, 2 ranks)" in out
    assert "Parameters: 700 B" in out and "Optimizer state: 920 B" in out  # rank 0's 7 + 4 rows
    assert "All 2 ranks together: parameters 1.30 KiB" in out and "In total over 2 ranks" in out
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--fsdp", "2", "--layerwise"])
    assert exit_info.value.code == 2 and "not supported with fsdp" in capsys.readouterr().err
